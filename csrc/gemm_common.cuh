// Device helpers shared by the two W2A8 GEMM kernels (w2a8_gemm.cu for decode, w2a8_gemm_large.cu
// for prefill): the int8 tensor-core MMA, dtype conversion, and each output row's segment scale.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace bitnet {

// d += A (16 x 32 s8, row) . B (32 x 8 s8, col), exact int32
__device__ __forceinline__ void mma_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The A fragment of one MMA k-step, from a tile word of 2-bit weight codes (w2a8_gemm.cu's layout:
// bits 2u .. 2u+1 of each byte feed A register u; odd u are rows g + 8). The codes of rows g + 8 are
// masked where they lie (bits 2-3: 4 x the code) instead of shifted down, so an MMA costs five integer
// ops rather than seven; its accumulators d[2] and d[3] (rows g + 8) then hold 4 x their sums, until
// unscale_rows.
struct TernaryA {
  uint32_t a0, a1, a2, a3;
};
__device__ __forceinline__ TernaryA ternary_a(uint32_t word) {
  const uint32_t hi = word >> 4;
  return {word & 0x03030303u, word & 0x0C0C0C0Cu, hi & 0x03030303u, hi & 0x0C0C0C0Cu};
}
__device__ __forceinline__ void mma_ternary(int (&d)[4], const TernaryA& a, uint32_t b0, uint32_t b1) {
  mma_s8(d, a.a0, a.a1, a.a2, a.a3, b0, b1);
}
// The exact sums of accumulators fed by ternary_a: rows g + 8 come back from 4x (an exact shift:
// every term was a multiple of 4)
__device__ __forceinline__ void unscale_rows(int (&d)[4]) {
  d[2] >>= 2;
  d[3] >>= 2;
}

// Weights are read once: stream them past L1.
__device__ __forceinline__ uint4 load_weights(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return v;
}

// The weight scale of output row `row`: fused projections (q|k|v, gate|up) keep their own.
__device__ __forceinline__ float segment_scale(const Segments& seg, int row) {
  float scale = seg.scale[0];
#pragma unroll
  for (int j = 1; j < kMaxSegments; ++j)
    if (j < seg.count && row >= seg.end[j - 1]) scale = seg.scale[j];
  return scale;
}

}  // namespace bitnet
