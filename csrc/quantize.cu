// Per-token int8 activation quantization, optionally fused with RMSNorm (one row per block); and
// RMSNorm alone, for the final norm in front of the LM head.
//
// Bit-exact with engine/quant.py: every fp32 operation is an explicitly IEEE-rounded intrinsic in
// the reference's order, the RMS sum of squares is accumulated in fp64 (exact squares, so the
// parallel order cannot change the fp32 mean), and rounding is rint (half to even).
//
// The row is read once, 16 bytes per load, all loads issued up front into registers (kRowVecs
// vectors per thread), then reduced and quantized from registers: a row costs one memory latency,
// not one per element. Rows too long for that, or whose length is not a multiple of a vector,
// take a plain strided loop.

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels.h"
#include "launch.cuh"
#include "quant_math.cuh"

namespace bitnet {
namespace {


// Register path: T is bf16 (8 per vector) or fp32 (4 per vector); k is a multiple of the vector.
template <typename T, bool kNorm>
__global__ void __launch_bounds__(kRowMaxThreads) quantize_vec_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                                            int k, int k_stride, float eps,
                                                            int8_t* __restrict__ x_q, float* __restrict__ scale) {
  constexpr int E = 16 / sizeof(T);
  allow_next_kernel();
  uint4 gain[kRowVecs] = {};
  if constexpr (kNorm) load_gain_registers(weight, k, gain);  // a weight: before the wait
  float v[kRowVecs][E];
  wait_for_previous_kernel();
  load_row_registers(x + (size_t)blockIdx.x * k, k, v);
  quantize_row_registers<kNorm, T>(v, gain, k, k_stride, eps, x_q + (size_t)blockIdx.x * k_stride, scale + blockIdx.x);
}

// Fallback for any k: strided loops, the row re-read from cache in each pass.
template <typename T, bool kNorm>
__global__ void __launch_bounds__(256) quantize_loop_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                                            int k, int k_stride, float eps,
                                                            int8_t* __restrict__ x_q, float* __restrict__ scale) {
  allow_next_kernel();
  wait_for_previous_kernel();
  const T* row = x + (size_t)blockIdx.x * k;
  quantize_row_strided<kNorm>([&](int i) { return load_fresh(row, i); }, [&](int i) { return load_float(weight, i); },
                              k, k_stride, eps, x_q + (size_t)blockIdx.x * k_stride, scale + blockIdx.x);
}

// RMSNorm alone (the final norm before the LM head): rows of T -> rows of T, register path.
template <typename T>
__global__ void __launch_bounds__(kRowMaxThreads) rmsnorm_vec_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                                                  int k, float eps, T* __restrict__ out) {
  constexpr int E = 16 / sizeof(T);
  allow_next_kernel();
  uint4 gain[kRowVecs];
  load_gain_registers(weight, k, gain);  // a weight: before the wait
  float v[kRowVecs][E];
  wait_for_previous_kernel();
  load_row_registers(x + (size_t)blockIdx.x * k, k, v);
  normalize_row_registers<T>(v, gain, k, eps);
  uint4* row = reinterpret_cast<uint4*>(out + (size_t)blockIdx.x * k);
#pragma unroll
  for (int j = 0; j < kRowVecs; ++j) {
    const int vi = threadIdx.x + j * blockDim.x;
    if (vi < k / E) {  // one 16-byte store per vector (see quantize_row_registers)
      uint4 packed;
      T* e = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int i = 0; i < E; ++i) e[i] = to_dtype<T>(v[j][i]);
      row[vi] = packed;
    }
  }
}

// Any k: strided loops, the row re-read from cache in each pass.
template <typename T>
__global__ void __launch_bounds__(256) rmsnorm_loop_kernel(const T* __restrict__ x, const T* __restrict__ weight, int k,
                                                           float eps, T* __restrict__ out) {
  __shared__ double dscratch[32];
  allow_next_kernel();
  wait_for_previous_kernel();
  const T* row = x + (size_t)blockIdx.x * k;
  double sum_sq = 0.0;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const double v = load_fresh(row, i);
    sum_sq += v * v;
  }
  const float inv_rms = inv_rms_from(block_reduce(sum_sq, add, dscratch), k, eps);
  for (int i = threadIdx.x; i < k; i += blockDim.x)
    out[(size_t)blockIdx.x * k + i] = to_dtype<T>(__fmul_rn(__fmul_rn(load_fresh(row, i), inv_rms), load_float(weight, i)));
}

template <typename T>
cudaError_t launch_rmsnorm(const void* x, const void* weight, int m, int k, float eps, void* out, cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(weight);
  T* o = static_cast<T*>(out);
  if (const int threads = register_row_threads<T>(k, x, weight, out))
    return launch_pdl(rmsnorm_vec_kernel<T>, dim3(m), dim3(threads), 0, stream, m, xt, wt, k, eps, o);
  return launch_pdl(rmsnorm_loop_kernel<T>, dim3(m), dim3(256), 0, stream, m, xt, wt, k, eps, o);
}

template <typename T, bool kNorm>
cudaError_t launch_typed(const void* x, const void* weight, int m, int k, int k_stride, float eps, int8_t* x_q,
                         float* scale, cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(weight);
  if (const int threads = int8_rows_aligned(x_q, k_stride) ? register_row_threads<T>(k, x, kNorm ? weight : nullptr) : 0)
    return launch_pdl(quantize_vec_kernel<T, kNorm>, dim3(m), dim3(threads), 0, stream, m, xt, wt, k, k_stride, eps,
                      x_q, scale);
  return launch_pdl(quantize_loop_kernel<T, kNorm>, dim3(m), dim3(256), 0, stream, m, xt, wt, k, k_stride, eps, x_q,
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

cudaError_t rmsnorm_rows(const void* x, const void* weight, DType dtype, int m, int k, float eps, void* out,
                         cudaStream_t stream) {
  if (m <= 0 || k <= 0) return cudaErrorInvalidValue;
  if (dtype == DType::kBFloat16) return launch_rmsnorm<__nv_bfloat16>(x, weight, m, k, eps, out, stream);
  if (dtype == DType::kFloat32) return launch_rmsnorm<float>(x, weight, m, k, eps, out, stream);
  return cudaErrorInvalidValue;
}

cudaError_t rmsnorm_quantize_rows(const void* x, const void* weight, DType x_dtype, int m, int k, int k_stride,
                                  float eps, int8_t* x_q, float* scale, cudaStream_t stream) {
  return launch<true>(x, weight, x_dtype, m, k, k_stride, eps, x_q, scale, stream);
}

}  // namespace bitnet
