// The small fused steps around the decode step's projections:
//   rope_kv_write              q|k|v -> roped q, roped k and v written into the KV cache (one launch)
//   act_rmsnorm_quantize_rows  gate|up -> relu^2(gate) * up (or silu) -> FFN sub-norm -> int8 (one launch)
// Both are bit-exact with the reference ops (engine/ops.py) for relu^2: every fp32 product and sum is
// an IEEE-rounded intrinsic in the reference's order (no FMA contraction), the norm and quantization
// are quant_math.cuh's, shared with quantize.cu. Values held on the device (positions, slots) never
// change a launch: out-of-range rows are skipped by the kernel, so the launches replay in CUDA graphs.

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels.h"
#include "launch.cuh"
#include "quant_math.cuh"
#include "rope_kv.cuh"

namespace bitnet {
namespace {

constexpr int kRopeThreads = 256;

// Grid (rows, ceil(items / threads)): rope_kv.cuh's items, one per thread.
template <typename T>
__global__ void __launch_bounds__(kRopeThreads) rope_kv_kernel(const T* __restrict__ qkv, const int64_t* positions,
                                                               const int64_t* slots, const float* __restrict__ cos,
                                                               const float* __restrict__ sin, int table_len,
                                                               int heads, KVCacheLayer cache, T* __restrict__ q_out) {
  allow_next_kernel();
  rope_kv_item(qkv, positions, slots, cos, sin, table_len, heads, cache, q_out, blockIdx.x,
               blockIdx.y * blockDim.x + threadIdx.x, true);
}

// Register path: the row's f products held in kRowVecs 16-byte vectors per thread (f a multiple of E).
template <typename T, Activation kAct>
__global__ void __launch_bounds__(kRowMaxThreads) act_quant_vec_kernel(const T* __restrict__ gate_up,
                                                                    const T* __restrict__ weight, int f, int k_stride,
                                                                    float eps, int8_t* __restrict__ x_q,
                                                                    float* __restrict__ scale) {
  constexpr int E = 16 / sizeof(T);
  allow_next_kernel();
  uint4 gain[kRowVecs];
  load_gain_registers(weight, f, gain);  // a weight: before the wait
  float v[kRowVecs][E];
  wait_for_previous_kernel();
  load_gated_row_registers<kAct>(gate_up + (size_t)blockIdx.x * 2 * f, f, v);
  quantize_row_registers<true, T>(v, gain, f, k_stride, eps, x_q + (size_t)blockIdx.x * k_stride, scale + blockIdx.x);
}

// Any f: strided loops, gate and up re-read from cache in each pass.
template <typename T, Activation kAct>
__global__ void __launch_bounds__(256) act_quant_loop_kernel(const T* __restrict__ gate_up, const T* __restrict__ weight,
                                                             int f, int k_stride, float eps, int8_t* __restrict__ x_q,
                                                             float* __restrict__ scale) {
  allow_next_kernel();
  wait_for_previous_kernel();
  const T* gate = gate_up + (size_t)blockIdx.x * 2 * f;
  const T* up = gate + f;
  quantize_row_strided<true>([&](int i) { return gated<kAct>(load_fresh(gate, i), load_fresh(up, i)); },
                             [&](int i) { return load_float(weight, i); }, f, k_stride, eps,
                             x_q + (size_t)blockIdx.x * k_stride, scale + blockIdx.x);
}

template <typename T>
cudaError_t launch_rope(const void* qkv, int rows, int heads, const int64_t* positions, const int64_t* slots,
                        const float* cos, const float* sin, int table_len, const KVCacheLayer& cache, void* q_out,
                        cudaStream_t stream) {
  const int items = rope_kv_items(heads, cache);
  const dim3 grid(rows, ceil_div(items, kRopeThreads));
  return launch_pdl(rope_kv_kernel<T>, grid, dim3(kRopeThreads), 0, stream, rows, static_cast<const T*>(qkv), positions,
                    slots, cos, sin, table_len, heads, cache, static_cast<T*>(q_out));
}

template <typename T, Activation kAct>
cudaError_t launch_act(const void* gate_up, const void* weight, int m, int f, int k_stride, float eps, int8_t* x_q,
                       float* scale, cudaStream_t stream) {
  const T* x = static_cast<const T*>(gate_up);
  const T* w = static_cast<const T*>(weight);
  if (const int threads = int8_rows_aligned(x_q, k_stride) ? register_row_threads<T>(f, x, w) : 0)
    return launch_pdl(act_quant_vec_kernel<T, kAct>, dim3(m), dim3(threads), 0, stream, m, x, w, f, k_stride, eps, x_q,
                      scale);
  return launch_pdl(act_quant_loop_kernel<T, kAct>, dim3(m), dim3(256), 0, stream, m, x, w, f, k_stride, eps, x_q,
                    scale);
}

template <typename T>
cudaError_t launch_act_typed(const void* gate_up, const void* weight, Activation act, int m, int f, int k_stride,
                             float eps, int8_t* x_q, float* scale, cudaStream_t stream) {
  if (act == Activation::kReLU2)
    return launch_act<T, Activation::kReLU2>(gate_up, weight, m, f, k_stride, eps, x_q, scale, stream);
  if (act == Activation::kSiLU)
    return launch_act<T, Activation::kSiLU>(gate_up, weight, m, f, k_stride, eps, x_q, scale, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t rope_kv_write(const void* qkv, DType dtype, int rows, int heads, const int64_t* positions,
                          const int64_t* slots, const float* cos, const float* sin, int table_len,
                          const KVCacheLayer& cache, void* q_out, cudaStream_t stream) {
  if (rows <= 0 || heads <= 0 || cache.kv_heads <= 0 || cache.head_dim < 2 || cache.head_dim % 2 != 0 ||
      cache.max_len <= 0 || cache.slots <= 0 || table_len <= 0)
    return cudaErrorInvalidValue;
  if (dtype == DType::kBFloat16)
    return launch_rope<__nv_bfloat16>(qkv, rows, heads, positions, slots, cos, sin, table_len, cache, q_out, stream);
  if (dtype == DType::kFloat32)
    return launch_rope<float>(qkv, rows, heads, positions, slots, cos, sin, table_len, cache, q_out, stream);
  return cudaErrorInvalidValue;
}

cudaError_t act_rmsnorm_quantize_rows(const void* gate_up, const void* weight, DType dtype, Activation activation,
                                      int m, int f, int k_stride, float eps, int8_t* x_q, float* scale,
                                      cudaStream_t stream) {
  if (m <= 0 || f <= 0 || k_stride < f) return cudaErrorInvalidValue;
  if (dtype == DType::kBFloat16)
    return launch_act_typed<__nv_bfloat16>(gate_up, weight, activation, m, f, k_stride, eps, x_q, scale, stream);
  if (dtype == DType::kFloat32)
    return launch_act_typed<float>(gate_up, weight, activation, m, f, k_stride, eps, x_q, scale, stream);
  return cudaErrorInvalidValue;
}

}  // namespace bitnet
