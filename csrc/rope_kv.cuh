// RoPE of q and k and the KV-cache write of one decode row, one item at a time: decode.cu's
// rope_kv_write kernel and the persistent decode kernel (decode_layers.cu) both run it.
#pragma once

#include <cstdint>

#include "kernels.h"
#include "launch.cuh"
#include "quant_math.cuh"

namespace bitnet {

// Items per row: a rotated pair (i, i + D/2) of each q and k head, then each element of v.
__host__ __device__ __forceinline__ int rope_kv_items(int heads, const KVCacheLayer& cache) {
  return (heads + cache.kv_heads) * (cache.head_dim / 2) + cache.kv_heads * cache.head_dim;
}

// Item `item` of row `row`: qkv [rows, (heads + 2 kv_heads) * head_dim] -> roped q in q_out, roped k
// and raw v in the cache at (slots[row], positions[row]). Bit-exact with engine.ops.apply_rope (no
// FMA). A row whose position or slot is out of range writes zeros to q_out and nothing to the cache.
// Consecutive items are consecutive i: coalesced reads and writes.
template <typename T>
__device__ __forceinline__ void rope_kv_item(const T* __restrict__ qkv, const int64_t* positions,
                                             const int64_t* slots, const float* __restrict__ cos,
                                             const float* __restrict__ sin, int table_len, int heads,
                                             const KVCacheLayer& cache, T* __restrict__ q_out, int row, int item,
                                             bool chained) {
  const int d = cache.head_dim, half = d / 2, kvh = cache.kv_heads;
  const int rope_items = (heads + kvh) * half;
  if (item >= rope_items + kvh * d) return;
  // positions, slots and the tables were written before this step's kernels started (see launch.cuh):
  // read them while the previous kernel finishes
  const int64_t pos = positions[row], slot = slots[row];
  const bool valid = pos >= 0 && pos < cache.max_len && pos < table_len && slot >= 0 && slot < cache.slots;
  const int head = item / half, i = item % half;  // rope items: heads [0, heads) are q, then the kv heads of k
  const bool rotate = item < rope_items && valid;
  const float c = rotate ? cos[pos * half + i] : 0.0f, s = rotate ? sin[pos * half + i] : 0.0f;
  if (chained) wait_for_previous_kernel();  // qkv is the previous kernel's output
  const T* x = qkv + (size_t)row * (heads + 2 * kvh) * d;
  // cache entry (slot, kv head h, pos): row ((slot * kvh + h) * max_len + pos)
  auto cache_row = [&](void* base, int h) {
    return static_cast<T*>(base) + (((size_t)slot * kvh + h) * cache.max_len + pos) * d;
  };
  if (item < rope_items) {
    float o1 = 0.0f, o2 = 0.0f;
    if (valid) {
      const float x1 = load_fresh(x + head * d, i), x2 = load_fresh(x + head * d, i + half);
      o1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));  // x1 * c - x2 * s
      o2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));  // x2 * c + x1 * s
    }
    T* dst;
    if (head < heads) {
      dst = q_out + ((size_t)row * heads + head) * d;
    } else {
      if (!valid) return;
      dst = cache_row(cache.k, head - heads);
    }
    dst[i] = to_dtype<T>(o1);
    dst[i + half] = to_dtype<T>(o2);
  } else if (valid) {
    const int e = item - rope_items;  // element e of the row's v heads
    cache_row(cache.v, e / d)[e % d] = ldcg_ordered(x + (heads + kvh) * d + e);
  }
}

}  // namespace bitnet
