// The greedy pick: the index of each row's first largest fp32 logit, as torch.argmax(dim=-1), in two
// launches of the decode step's chain: blocks reduce chunks of a row to one 64-bit key each, then one
// block per row takes the largest key. Torch needs five small kernels for the same two steps
// (engine/sampling.py argmax_rows on the CPU), 14-16 us of a batch-1 step on an H100.
//
// A key orders (value, index) as torch.argmax does: the larger value, and of equal values the smaller
// index. The value's fp32 bits are mapped to an unsigned order (negatives flipped), -0 counts as +0
// and every NaN as larger than anything (torch.argmax returns a row's first NaN); the low 32 bits hold
// ~index.

#include <cstdint>

#include "kernels.h"
#include "launch.cuh"
#include "quant_math.cuh"

namespace bitnet {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // loads of a thread issued before the first comparison

__device__ __forceinline__ unsigned long long argmax_key(float value, int index) {
  uint32_t u = __float_as_uint(__fadd_rn(value, 0.0f));  // -0 + 0 = +0
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  if (value != value) u = 0xffffffffu;  // NaN
  return ((unsigned long long)u << 32) | (0xffffffffu - (uint32_t)index);
}

__device__ __forceinline__ unsigned long long key_max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// grid (chunks, rows): block c of row r -> keys[r][c], the best key of the row's elements
// [c * chunk, (c + 1) * chunk).
__global__ void __launch_bounds__(kThreads) chunk_keys_kernel(const float* __restrict__ logits, int v, int chunk,
                                                             unsigned long long* __restrict__ keys) {
  __shared__ unsigned long long scratch[kThreads / 32];
  allow_next_kernel();
  wait_for_previous_kernel();  // the logits are the previous kernel's output
  const float* row = logits + (size_t)blockIdx.y * v;
  const int begin = blockIdx.x * chunk, end = min(begin + chunk, v);
  unsigned long long best = 0;
  for (int i0 = begin + threadIdx.x; i0 < end; i0 += kUnroll * kThreads) {
    float x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) x[u] = i0 + u * kThreads < end ? __ldcg(row + i0 + u * kThreads) : 0.0f;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i0 + u * kThreads < end) best = key_max(best, argmax_key(x[u], i0 + u * kThreads));
  }
  best = block_reduce(best, key_max, scratch);
  if (threadIdx.x == 0) keys[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = best;
}

// One block per row: the largest of its `chunks` keys -> ids[row].
__global__ void __launch_bounds__(kThreads) row_pick_kernel(const unsigned long long* __restrict__ keys, int chunks,
                                                           int64_t* __restrict__ ids) {
  __shared__ unsigned long long scratch[kThreads / 32];
  allow_next_kernel();
  wait_for_previous_kernel();
  const unsigned long long* row = keys + (size_t)blockIdx.x * chunks;
  unsigned long long best = 0;
  for (int i = threadIdx.x; i < chunks; i += kThreads) best = key_max(best, __ldcg(row + i));
  best = block_reduce(best, key_max, scratch);
  if (threadIdx.x == 0) ids[blockIdx.x] = (int64_t)(0xffffffffu - (uint32_t)(best & 0xffffffffu));
}

}  // namespace

int argmax_chunk(int v) {
  // about 128 chunks of a 2B-4T row (1,024 logits each: four loads per thread), never more than
  // 65,535 blocks along the grid's x
  const int chunk = kUnroll * kThreads;
  return (v + chunk - 1) / chunk <= 65535 ? chunk : (v + 65534) / 65535;
}

cudaError_t argmax_rows(const float* logits, int m, int v, unsigned long long* keys, int64_t* ids,
                        cudaStream_t stream) {
  if (m <= 0 || v <= 0 || m > 65535) return cudaErrorInvalidValue;
  const int chunk = argmax_chunk(v), chunks = ceil_div(v, chunk);
  cudaError_t err =
      launch_pdl(chunk_keys_kernel, dim3(chunks, m), dim3(kThreads), 0, stream, m, logits, v, chunk, keys);
  if (err != cudaSuccess) return err;
  return launch_pdl(row_pick_kernel, dim3(m), dim3(kThreads), 0, stream, m,
                    static_cast<const unsigned long long*>(keys), chunks, ids);
}

}  // namespace bitnet
