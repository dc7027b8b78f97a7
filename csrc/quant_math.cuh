// The exact fp32 numerics of RMSNorm + int8 activation quantization (and of the MLP activation in
// front of the FFN sub-norm), shared by every kernel that produces GEMM inputs (quantize.cu,
// decode.cu, decode_attention.cu) so that all of them agree bit
// for bit with engine/quant.py: IEEE-rounded intrinsics in the reference's order (no FMA
// contraction), the RMS sum of squares in fp64 (exact squares, so the parallel order cannot change
// the fp32 mean), rint (half to even).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "kernels.h"
#include "launch.cuh"

namespace bitnet {

template <typename T>
__device__ __forceinline__ float load_float(const T* p, int i) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(p[i]);
  else return p[i];
}

// Element i of what an earlier kernel wrote, through L2 (ld.global.cg). Kernels start before the
// previous one ends (launch.cuh), and the allocator hands the same memory to many buffers in turn:
// an L1 or read-only-cache line of an address, loaded by an earlier kernel on this SM, may be stale.
template <typename T>
__device__ __forceinline__ float load_fresh(const T* p, int i) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(ldcg_ordered(p + i));
  else return ldcg_ordered(p + i);
}

// fp32 -> the activation dtype, round to nearest even (what torch's .to(dtype) does)
template <typename T>
__device__ __forceinline__ T to_dtype(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return v;
}

// Reduce over the block; `identity` fills the lanes past the last warp (0 for sums and for max |x|).
template <typename V, typename Op>
__device__ V block_reduce(V v, Op op, V* scratch, V identity = V(0)) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : identity;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  v = scratch[0];
  __syncthreads();  // scratch may be reused by the caller
  return v;
}

__device__ __forceinline__ double add(double a, double b) { return a + b; }
__device__ __forceinline__ float max_abs(float a, float b) { return fmaxf(a, b); }

// scale from the row max, then rint into int8
__device__ __forceinline__ float quant_scale(float amax) {
  return __fmul_rn(127.0f, __frcp_rn(fmaxf(amax, 1e-5f)));  // torch's 127 / t: reciprocal, then multiply
}
__device__ __forceinline__ int8_t quant_value(float v, float s) {
  return static_cast<int8_t>(min(max(__float2int_rn(__fmul_rn(v, s)), -128), 127));
}
__device__ __forceinline__ float inv_rms_from(double sum_sq, int k, float eps) {
  const float mean_sq = __double2float_rn(__ddiv_rn(sum_sq, (double)k));
  return __frcp_rn(__fsqrt_rn(__fadd_rn(mean_sq, eps)));
}

// The register path of the row kernels (quantize.cu, decode.cu): one row per block, kRowVecs 16-byte
// vectors per thread, so rows of up to kRowVecs * kRowMaxThreads vectors (16384 bf16) stay in registers.
// Two vectors a thread rather than four or eight (2B-4T rows: 160 and 448 threads): the per-thread
// share of the row after the dependency wait is smaller (measured, not modelled). H100 decode steps at
// batch 1 / 8 (512 tokens): 1,037-1,040 / 1,205-1,209 us against 1,050-1,056 / 1,218-1,219 with four
// and 1,143 / 1,307 with eight; one vector a thread (up to 1,024 threads) 1,050 / 1,228 (README).
// Exactly the warps the row needs, not the next power of two (256 and 512 threads before, their
// extra warps idle but in every barrier): batch 1 level, batch 8 1,141-1,143 us against 1,145, batch
// 64 3,184-3,186 against 3,202-3,205 (H100 graph replay, in turns).
constexpr int kRowVecs = 2;
constexpr int kRowMaxThreads = 1024;

// Threads for a row of k elements of T on the register path (the fewest warps that hold it), or 0
// when the row does not fit it: k not a whole number of vectors, too long, or a pointer not 16-byte
// aligned (nullptr counts as aligned). The caller then takes its strided-loop kernel.
template <typename T>
inline int register_row_threads(int k, const void* a, const void* b = nullptr, const void* c = nullptr) {
  constexpr int E = 16 / sizeof(T);
  const int nvec = k / E;
  for (const void* p : {a, b, c})
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 0;
  if (k % E != 0 || nvec > kRowVecs * kRowMaxThreads) return 0;
  return 32 * ceil_div(nvec, 32 * kRowVecs);
}

// Whether int8 rows at `out`, k_stride bytes apart, take the register path's vector stores.
inline bool int8_rows_aligned(const int8_t* out, int k_stride) {
  return reinterpret_cast<uintptr_t>(out) % 16 == 0 && k_stride % 16 == 0;
}

// A row of k elements of T (16-byte aligned, k a multiple of E) into the block's registers in the
// layout quantize_row_registers takes; zeros past the row. Every load is issued before any use.
template <int kVecs, int E, typename T>
__device__ __forceinline__ void load_row_registers(const T* __restrict__ row, int k, float (&v)[kVecs][E]) {
  static_assert(E * sizeof(T) == 16, "one 16-byte vector of T per E elements");
  const uint4* src = reinterpret_cast<const uint4*>(row);
  const int nvec = k / E;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int vi = threadIdx.x + j * blockDim.x;
    const uint4 raw = vi < nvec ? __ldcg(src + vi) : make_uint4(0, 0, 0, 0);  // (load_fresh)
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < E; ++i) v[j][i] = load_float(e, i);
  }
}

// act(gate) * up in fp32, each step rounded as the reference's separate torch ops round it
template <Activation kAct>
__device__ __forceinline__ float gated(float gate, float up) {
  if constexpr (kAct == Activation::kSiLU) {
    return __fmul_rn(__fdiv_rn(gate, __fadd_rn(1.0f, expf(-gate))), up);  // x / (1 + exp(-x)), then * up
  } else {
    const float r = gate < 0.0f ? 0.0f : gate;  // relu (NaN stays NaN, as in torch)
    return __fmul_rn(__fmul_rn(r, r), up);      // relu(gate).square() * up
  }
}

// act(gate) * up of one gate|up row (gate: f elements, up: the f after them) into registers, as
// load_row_registers lays a row out. gated(0, 0) = 0 past the row: it adds nothing to the norm.
template <Activation kAct, int kVecs, int E, typename T>
__device__ __forceinline__ void load_gated_row_registers(const T* __restrict__ gate_up, int f, float (&v)[kVecs][E]) {
  static_assert(E * sizeof(T) == 16, "one 16-byte vector of T per E elements");
  const uint4* gate = reinterpret_cast<const uint4*>(gate_up);
  const int nvec = f / E;
  const uint4* up = gate + nvec;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int vi = threadIdx.x + j * blockDim.x;
    uint4 g = make_uint4(0, 0, 0, 0), u = g;
    if (vi < nvec) {
      g = __ldcg(gate + vi);  // (load_fresh)
      u = __ldcg(up + vi);
    }
    const T* ge = reinterpret_cast<const T*>(&g);
    const T* ue = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < E; ++i) v[j][i] = gated<kAct>(load_float(ge, i), load_float(ue, i));
  }
}

// The RMSNorm gain (k elements of T, 16-byte aligned) as raw vectors in load_row_registers' layout.
// Weights never change during a forward, so kernels load it before waiting for the previous kernel.
template <int kVecs, typename T>
__device__ __forceinline__ void load_gain_registers(const T* __restrict__ weight, int k, uint4 (&gain)[kVecs]) {
  constexpr int E = 16 / sizeof(T);
  const uint4* w = reinterpret_cast<const uint4*>(weight);
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int vi = threadIdx.x + j * blockDim.x;
    gain[j] = vi < k / E ? __ldg(w + vi) : make_uint4(0, 0, 0, 0);
  }
}

// rmsnorm(row) * gain for a row held in registers as load_row_registers lays it out: the mean of
// squares summed in fp64, 1 / sqrt(mean + eps) IEEE-rounded in fp32, then two rounded products.
template <typename T, int kVecs, int E>
__device__ __forceinline__ void normalize_row_registers(float (&v)[kVecs][E], const uint4 (&gain)[kVecs], int k,
                                                        float eps) {
  static_assert(E * sizeof(T) == 16, "one 16-byte vector of T per E elements");
  __shared__ double dscratch[32];
  double sum_sq = 0.0;
#pragma unroll
  for (int j = 0; j < kVecs; ++j)
#pragma unroll
    for (int i = 0; i < E; ++i) sum_sq += (double)v[j][i] * (double)v[j][i];
  const float inv_rms = inv_rms_from(block_reduce(sum_sq, add, dscratch), k, eps);
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const T* e = reinterpret_cast<const T*>(&gain[j]);
#pragma unroll
    for (int i = 0; i < E; ++i) v[j][i] = __fmul_rn(__fmul_rn(v[j][i], inv_rms), load_float(e, i));
  }
}

// Quantize one row held in registers by the whole block: vector vi = threadIdx.x + j * blockDim.x
// holds elements vi * E .. vi * E + E - 1 in v[j]; k is a multiple of E. With kNorm the row is first
// multiplied by 1 / rms and the gain (load_gain_registers, of T). Writes k_stride bytes (zeros past
// k: the GEMM's padding) and, from thread 0, the row's scale.
template <bool kNorm, typename T, int kVecs, int E>
__device__ __forceinline__ void quantize_row_registers(float (&v)[kVecs][E], const uint4 (&gain)[kVecs], int k,
                                                       int k_stride, float eps, int8_t* __restrict__ out,
                                                       float* __restrict__ scale) {
  static_assert(E * sizeof(T) == 16, "one 16-byte vector of T per E elements");
  __shared__ float fscratch[32];
  const int nvec = k / E;
  if constexpr (kNorm) normalize_row_registers<T>(v, gain, k, eps);
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < kVecs; ++j)
#pragma unroll
    for (int i = 0; i < E; ++i) amax = fmaxf(amax, fabsf(v[j][i]));
  const float s = quant_scale(block_reduce(amax, max_abs, fscratch));
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int vi = threadIdx.x + j * blockDim.x;
    // E int8 values in one 8- or 4-byte store, not E byte stores: a row kernel is one block per row,
    // and its byte stores (2,560 for a 2B-4T row) were on the decode step's critical path. H100
    // graph replay, us per step: batch 1 1,005-1,010 against 1,023-1,025, batch 8 1,145-1,148 against
    // 1,164-1,166, batch 64 3,195-3,205 against 3,232-3,245. The caller checks the alignment
    // (int8_rows_aligned).
    if (vi < nvec) {
      uint32_t q[E / 4] = {};
#pragma unroll
      for (int i = 0; i < E; ++i) q[i / 4] |= (uint32_t)(uint8_t)quant_value(v[j][i], s) << (8 * (i % 4));
      if constexpr (E == 8) *reinterpret_cast<uint2*>(out + vi * E) = make_uint2(q[0], q[1]);
      else *reinterpret_cast<uint32_t*>(out + vi * E) = q[0];
    }
  }
  for (int i = k + threadIdx.x; i < k_stride; i += blockDim.x) out[i] = 0;  // the GEMM's zero padding
  if (threadIdx.x == 0) *scale = s;
}

// The same for a row of any length, with strided loops: value(i) returns element i as fp32 and is
// evaluated once per pass (so it re-reads memory), weight(i) the gain as fp32.
template <bool kNorm, typename Value, typename Weight>
__device__ __forceinline__ void quantize_row_strided(Value value, Weight weight, int k, int k_stride, float eps,
                                                     int8_t* __restrict__ out, float* __restrict__ scale) {
  __shared__ double dscratch[32];
  __shared__ float fscratch[32];
  float inv_rms = 1.0f;
  if constexpr (kNorm) {
    double sum_sq = 0.0;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      const double v = value(i);
      sum_sq += v * v;
    }
    inv_rms = inv_rms_from(block_reduce(sum_sq, add, dscratch), k, eps);
  }
  auto normed = [&](int i) {
    const float v = value(i);
    if constexpr (kNorm) return __fmul_rn(__fmul_rn(v, inv_rms), weight(i));
    else return v;
  };
  float amax = 0.0f;
  for (int i = threadIdx.x; i < k; i += blockDim.x) amax = fmaxf(amax, fabsf(normed(i)));
  const float s = quant_scale(block_reduce(amax, max_abs, fscratch));
  for (int i = threadIdx.x; i < k_stride; i += blockDim.x) out[i] = i < k ? quant_value(normed(i), s) : 0;
  if (threadIdx.x == 0) *scale = s;
}

}  // namespace bitnet
