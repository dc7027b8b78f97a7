// Per-token int8 activation quantization, optionally fused with RMSNorm (one row per block).
//
// Bit-exact with engine/quant.py: every fp32 operation is an explicitly IEEE-rounded intrinsic in
// the reference's order, the RMS sum of squares is accumulated in fp64 (exact squares, so the
// parallel order cannot change the fp32 mean), and rounding is rint (half to even).
//
// The row is read once, 16 bytes per load, all loads issued up front into registers (kVecs
// vectors per thread), then reduced and quantized from registers: a row costs one memory latency,
// not one per element. Rows too long for that, or whose length is not a multiple of a vector,
// take a plain strided loop.

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"
#include "launch.cuh"

namespace bitnet {
namespace {

constexpr int kVecs = 4;          // 16-byte vectors per thread in the register path
constexpr int kMaxThreads = 512;  // so rows up to 4 * 512 vectors (16384 bf16) stay in registers

template <typename T>
__device__ __forceinline__ float load_float(const T* p, int i) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(p[i]);
  else return p[i];
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

// The shared tail of both kernels: scale from the row max, then rint into int8.
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

// Register path: T is bf16 (8 per vector) or fp32 (4 per vector); k is a multiple of the vector.
template <typename T, bool kNorm>
__global__ void __launch_bounds__(kMaxThreads) quantize_vec_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                                            int k, int k_stride, float eps,
                                                            int8_t* __restrict__ x_q, float* __restrict__ scale) {
  constexpr int E = 16 / sizeof(T);
  __shared__ double dscratch[32];
  __shared__ float fscratch[32];
  allow_next_kernel();
  float v[kVecs][E];
  const int nvec = k / E;
  wait_for_previous_kernel();
  const uint4* row = reinterpret_cast<const uint4*>(x + (size_t)blockIdx.x * k);
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int vi = threadIdx.x + j * blockDim.x;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (vi < nvec) raw = __ldg(row + vi);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < E; ++i) v[j][i] = load_float(e, i);
  }
  if constexpr (kNorm) {
    double sum_sq = 0.0;
#pragma unroll
    for (int j = 0; j < kVecs; ++j)
#pragma unroll
      for (int i = 0; i < E; ++i) sum_sq += (double)v[j][i] * (double)v[j][i];
    const float inv_rms = inv_rms_from(block_reduce(sum_sq, add, dscratch), k, eps);
    const uint4* wrow = reinterpret_cast<const uint4*>(weight);
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const int vi = threadIdx.x + j * blockDim.x;
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (vi < nvec) raw = __ldg(wrow + vi);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < E; ++i) v[j][i] = __fmul_rn(__fmul_rn(v[j][i], inv_rms), load_float(e, i));
    }
  }
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < kVecs; ++j)
#pragma unroll
    for (int i = 0; i < E; ++i) amax = fmaxf(amax, fabsf(v[j][i]));
  const float s = quant_scale(block_reduce(amax, max_abs, fscratch));
  int8_t* out = x_q + (size_t)blockIdx.x * k_stride;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int vi = threadIdx.x + j * blockDim.x;
    if (vi < nvec) {
#pragma unroll
      for (int i = 0; i < E; ++i) out[vi * E + i] = quant_value(v[j][i], s);
    }
  }
  for (int i = k + threadIdx.x; i < k_stride; i += blockDim.x) out[i] = 0;  // the GEMM's zero padding
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
}

// Fallback for any k: strided loops, the row re-read from cache in each pass.
template <typename T, bool kNorm>
__global__ void __launch_bounds__(256) quantize_loop_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                                            int k, int k_stride, float eps,
                                                            int8_t* __restrict__ x_q, float* __restrict__ scale) {
  __shared__ double dscratch[32];
  __shared__ float fscratch[32];
  allow_next_kernel();
  wait_for_previous_kernel();
  const T* row = x + (size_t)blockIdx.x * k;
  float inv_rms = 1.0f;
  if constexpr (kNorm) {
    double sum_sq = 0.0;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      const double v = load_float(row, i);
      sum_sq += v * v;
    }
    inv_rms = inv_rms_from(block_reduce(sum_sq, add, dscratch), k, eps);
  }
  auto value = [&](int i) {
    const float v = load_float(row, i);
    if constexpr (kNorm) return __fmul_rn(__fmul_rn(v, inv_rms), load_float(weight, i));
    else return v;
  };
  float amax = 0.0f;
  for (int i = threadIdx.x; i < k; i += blockDim.x) amax = fmaxf(amax, fabsf(value(i)));
  const float s = quant_scale(block_reduce(amax, max_abs, fscratch));
  int8_t* out = x_q + (size_t)blockIdx.x * k_stride;
  for (int i = threadIdx.x; i < k_stride; i += blockDim.x) out[i] = i < k ? quant_value(value(i), s) : 0;
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
}

template <typename T, bool kNorm>
cudaError_t launch_typed(const void* x, const void* weight, int m, int k, int k_stride, float eps, int8_t* x_q,
                         float* scale, cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(weight);
  constexpr int E = 16 / sizeof(T);
  const int nvec = k / E;
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && (!kNorm || reinterpret_cast<uintptr_t>(weight) % 16 == 0);
  if (k % E == 0 && nvec <= kVecs * kMaxThreads && aligned) {
    int threads = 32;  // the fewest warps that hold the row in kVecs vectors each
    while (threads * kVecs < nvec) threads *= 2;
    return launch_pdl(quantize_vec_kernel<T, kNorm>, dim3(m), dim3(threads), 0, stream, xt, wt, k, k_stride, eps, x_q,
                      scale);
  }
  return launch_pdl(quantize_loop_kernel<T, kNorm>, dim3(m), dim3(256), 0, stream, xt, wt, k, k_stride, eps, x_q,
                    scale);
}

template <bool kNorm>
cudaError_t launch(const void* x, const void* weight, DType dtype, int m, int k, int k_stride, float eps,
                   int8_t* x_q, float* scale, cudaStream_t stream) {
  if (m <= 0 || k <= 0 || k_stride < k) return cudaErrorInvalidValue;
  if (dtype == DType::kBFloat16)
    return launch_typed<__nv_bfloat16, kNorm>(x, weight, m, k, k_stride, eps, x_q, scale, stream);
  if (dtype == DType::kFloat32) return launch_typed<float, kNorm>(x, weight, m, k, k_stride, eps, x_q, scale, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t quantize_rows(const void* x, DType x_dtype, int m, int k, int k_stride, int8_t* x_q, float* scale,
                          cudaStream_t stream) {
  return launch<false>(x, nullptr, x_dtype, m, k, k_stride, 0.0f, x_q, scale, stream);
}

cudaError_t rmsnorm_quantize_rows(const void* x, const void* weight, DType x_dtype, int m, int k, int k_stride,
                                  float eps, int8_t* x_q, float* scale, cudaStream_t stream) {
  return launch<true>(x, weight, x_dtype, m, k, k_stride, eps, x_q, scale, stream);
}

}  // namespace bitnet
