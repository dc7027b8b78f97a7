// Per-token int8 activation quantization, optionally fused with RMSNorm (one row per block).
//
// Bit-exact with engine/quant.py: every fp32 operation is an explicitly IEEE-rounded intrinsic in
// the reference's order, the RMS sum of squares is accumulated in fp64 (exact squares, so the
// parallel order cannot change the fp32 mean), and rounding is rint (half to even).

#include <cuda_bf16.h>

#include <type_traits>

#include "kernels.h"

namespace bitnet {
namespace {

constexpr int kThreads = 256;

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

template <typename T, bool kNorm>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                                            int k, int k_stride, float eps,
                                                            int8_t* __restrict__ x_q, float* __restrict__ scale) {
  __shared__ double dscratch[32];
  __shared__ float fscratch[32];
  const T* row = x + (size_t)blockIdx.x * k;

  float inv_rms = 1.0f;
  if constexpr (kNorm) {
    double sum_sq = 0.0;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      const double v = load_float(row, i);
      sum_sq += v * v;
    }
    sum_sq = block_reduce(sum_sq, [](double a, double b) { return a + b; }, dscratch);
    const float mean_sq = __double2float_rn(__ddiv_rn(sum_sq, (double)k));
    inv_rms = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean_sq, eps)));
  }
  auto value = [&](int i) {
    const float v = load_float(row, i);
    if constexpr (kNorm) return __fmul_rn(__fmul_rn(v, inv_rms), load_float(weight, i));
    else return v;
  };

  float amax = 0.0f;
  for (int i = threadIdx.x; i < k; i += blockDim.x) amax = fmaxf(amax, fabsf(value(i)));
  amax = block_reduce(amax, [](float a, float b) { return fmaxf(a, b); }, fscratch);
  const float s = __fdiv_rn(127.0f, fmaxf(amax, 1e-5f));

  int8_t* out = x_q + (size_t)blockIdx.x * k_stride;
  for (int i = threadIdx.x; i < k_stride; i += blockDim.x) {
    int v = 0;
    if (i < k) v = min(max(__float2int_rn(__fmul_rn(value(i), s)), -128), 127);
    out[i] = static_cast<int8_t>(v);
  }
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
}

template <bool kNorm>
cudaError_t launch(const void* x, const void* weight, DType dtype, int m, int k, int k_stride, float eps,
                   int8_t* x_q, float* scale, cudaStream_t stream) {
  if (m <= 0 || k <= 0 || k_stride < k) return cudaErrorInvalidValue;
  if (dtype == DType::kBFloat16) {
    quantize_kernel<__nv_bfloat16, kNorm><<<m, kThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(weight), k, k_stride, eps, x_q, scale);
  } else if (dtype == DType::kFloat32) {
    quantize_kernel<float, kNorm><<<m, kThreads, 0, stream>>>(
        static_cast<const float*>(x), static_cast<const float*>(weight), k, k_stride, eps, x_q, scale);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
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
