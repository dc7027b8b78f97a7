// Host-side entry points of the W2A8 kernels. Plain pointers and CUDA types only: the .cu files
// compile without torch, and bindings.cpp is the one place that knows about tensors.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace bitnet {

// The tiled weight layout the GEMM reads (see w2a8_gemm.cu): 16 output rows x 128 inputs per
// 512-byte tile, 16 bytes per lane of a warp.
constexpr int kTileRows = 16;
constexpr int kChunkK = 128;
constexpr int kMaxSegments = 4;

// Fused projections (q|k|v, gate|up): output rows [end[i-1], end[i]) use scale[i].
struct Segments {
  int count;
  int end[kMaxSegments];
  float scale[kMaxSegments];
};

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kInt32 = 2 };

// Launch configuration of the GEMM; zeros mean "choose for me".
struct GemmConfig {
  int row_tiles_per_block;  // 1, 2 or 4
  int warps;                // 1..16, split the K dimension
};

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// canonical packed codes uint8 [n, ceil(k/4)] -> tiled uint32 [ceil(n/16), ceil(k/128), 32, 4].
// *invalid (device int, zeroed by the caller) becomes nonzero if any 2-bit code is 3.
cudaError_t repack_ternary(const uint8_t* canonical, int n, int k, uint32_t* tiled, int* invalid,
                           cudaStream_t stream);

// out[m, n] = (x_q . W_t - ...) epilogue. x_q: int8 [m, k_stride] with k_stride = ceil(k/128)*128 and
// zeros past k. kInt32 writes the exact dot products; kFloat32 / kBFloat16 write
// acc * scale(row) / x_scale[m] (+ residual[m, n], same dtype as out), rounded once.
cudaError_t w2a8_gemm(const int8_t* x_q, const float* x_scale, int m, const uint32_t* tiled, int n, int k,
                      const Segments& segments, const void* residual, void* out, DType out_dtype,
                      GemmConfig config, cudaStream_t stream);

// x [m, k] (fp32 or bf16) -> x_q int8 [m, k_stride] (zero padded), scale fp32 [m]:
// scale = 127 * (1 / max(|x|, 1e-5)) (torch's 127 / t), x_q = clamp(rint(x * scale), -128, 127).
cudaError_t quantize_rows(const void* x, DType x_dtype, int m, int k, int k_stride, int8_t* x_q, float* scale,
                          cudaStream_t stream);

// The same applied to rmsnorm(x) * weight (weight in x's dtype), without rounding in between:
// mean of squares summed in fp64, 1 / sqrt(mean + eps) IEEE-rounded in fp32 (reciprocal of sqrt).
cudaError_t rmsnorm_quantize_rows(const void* x, const void* weight, DType x_dtype, int m, int k, int k_stride,
                                  float eps, int8_t* x_q, float* scale, cudaStream_t stream);

}  // namespace bitnet
