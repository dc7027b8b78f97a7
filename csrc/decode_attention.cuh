// The decode attention's two steps as device functions (decode_attention.cu's kernels run them one
// block each; decode_layers.cu runs them as phases of its persistent kernel): see decode_attention.cu.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"
#include "launch.cuh"
#include "quant_math.cuh"

namespace bitnet {
namespace attention {

constexpr int kThreads = 128;      // split block: 4 warps (a unit of decode_layers.cu's blocks)
constexpr int kWideThreads = 256;  // split block of small grids (decode_attention.cu)
constexpr int kCombineThreads = 128;
constexpr int kKeyGranule = 16;       // chunks are multiples of this many keys
constexpr int kBlocksPerSm = 2;       // split-kernel blocks per SM the default split count allows
constexpr int kMinKeysPerSplit = 32;  // no more splits than max_len / this
constexpr int kMinKeysPerChunk = 64;  // at run time, no chunk shorter than this (unless the sequence is)
constexpr int kMaxHeadDim = 256;
constexpr double kLog2e = 1.4426950408889634;

// Keys [0, n) of a sequence in `active` chunks of `chunk` keys. Both kernels use this formula.
struct Chunks {
  int chunk, active;
};
__device__ __forceinline__ Chunks chunks_of(int n_keys, int splits) {
  if (n_keys <= 0) return {kKeyGranule, 0};
  // short sequences use fewer, fuller chunks: less for the combine kernel to merge
  const int even = max((n_keys + splits - 1) / splits, kMinKeysPerChunk);
  const int chunk = (even + kKeyGranule - 1) / kKeyGranule * kKeyGranule;
  return {chunk, (n_keys + chunk - 1) / chunk};
}

// How many cache entries row b attends to: 0 when its position or slot lies outside the cache.
__device__ __forceinline__ int keys_of(const int64_t* positions, const int64_t* slots, int b, int cache_slots,
                                       int max_len) {
  const int64_t pos = positions[b], slot = slots[b];
  if (pos < 0 || pos >= max_len || slot < 0 || slot >= cache_slots) return 0;
  return static_cast<int>(pos) + 1;
}

// The scratch both kernels see, carved from one buffer (256-byte aligned pieces).
struct Workspace {
  float* o;       // [batch, heads, splits, head_dim] unnormalized partial outputs
  float* m;       // [batch, heads, splits] running max of the scores, log2 domain
  float* l;       // [batch, heads, splits] sum of exp2(score - m)
  int* counters;  // [batch] finished heads per row (fused variant)
  void* row;      // [batch, heads * head_dim] the dtype-rounded output (fused variant)
};

inline size_t aligned(size_t bytes) { return (bytes + 255) / 256 * 256; }

inline Workspace carve(void* base, int batch, int heads, int head_dim, int splits) {
  const size_t partials = (size_t)batch * heads * splits;
  char* p = static_cast<char*>(base);
  Workspace ws{};
  ws.o = reinterpret_cast<float*>(p);
  p += aligned(partials * head_dim * sizeof(float));
  ws.m = reinterpret_cast<float*>(p);
  p += aligned(partials * sizeof(float));
  ws.l = reinterpret_cast<float*>(p);
  p += aligned(partials * sizeof(float));
  ws.counters = reinterpret_cast<int*>(p);
  p += aligned((size_t)batch * sizeof(int));
  ws.row = p;
  return ws;
}

// Query heads per pass over K/V: the group size rounded up to 1, 2, 4 or 8 (larger groups take passes).
inline int heads_per_pass(int group) {
  int gt = 1;
  while (gt < group && gt < 8) gt *= 2;
  return gt;
}

// One lane's share of KPG key (or value) rows: EPL elements of each, the ones elem() names.
// Vector layout: lane_k owns elements lane_k * EPL .. + EPL - 1, loaded as raw 16-byte vectors.
// Scalar layout: lane_k owns elements lane_k + LPK * e (< head_dim), converted to fp32 as loaded.
template <typename T, int LPK, int EPL, bool kVec, int KPG>
struct RowShare {
  static constexpr int kRawVecs = kVec ? EPL * (int)sizeof(T) / 16 : 1;
  static_assert(!kVec || EPL * sizeof(T) % 16 == 0, "vector layout needs whole 16-byte vectors");
  uint4 raw[KPG][kRawVecs];
  float val[KPG][kVec ? 1 : EPL];

  static __device__ __forceinline__ int elem(int lane_k, int e) { return kVec ? lane_k * EPL + e : lane_k + LPK * e; }

  // Row i of the share; an invalid row (past the chunk) reads nothing and holds zeros.
  __device__ __forceinline__ void load(int i, const T* __restrict__ row, int lane_k, int head_dim, bool valid) {
    if constexpr (kVec) {
      const uint4* src = reinterpret_cast<const uint4*>(row + lane_k * EPL);
#pragma unroll
      for (int r = 0; r < kRawVecs; ++r) raw[i][r] = valid ? __ldcg(src + r) : make_uint4(0, 0, 0, 0);
    } else {
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        const int d = elem(lane_k, e);
        val[i][e] = valid && d < head_dim ? load_fresh(row, d) : 0.0f;
      }
    }
  }

  __device__ __forceinline__ float get(int i, int e) const {
    if constexpr (kVec) {
      constexpr int kPerVec = 16 / sizeof(T);
      return load_float(reinterpret_cast<const T*>(&raw[i][e / kPerVec]), e % kPerVec);
    } else {
      return val[i][e];
    }
  }
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

struct SplitArgs {
  const int64_t* slots;
  const int64_t* positions;
  int heads, kv_heads, group, passes, max_len, cache_slots, head_dim, splits;
  float scale_log2;  // head_dim^-0.5 * log2(e): scores in the log2 domain, so exp2f
  Workspace ws;
  bool reset_counters;
};

// The floats of shared memory attention_split_unit carves (scores, running max and sum, per-warp outputs).
template <int LPK, int GT, int KPG, int Threads>
constexpr int split_smem_floats(int head_dim) {
  return GT * (Threads / LPK * KPG) + 3 * GT + Threads / 32 * GT * head_dim;
}

// One split block's work: split `split` of row b, kv head pass y (blockIdx.x, .z, .y of the split
// kernel), run by Threads threads numbered tid that synchronize with sync() (the whole block, or one
// named barrier of a larger block: decode_layers.cu). chained: launched behind the previous kernel
// with PDL (launch.cuh), so it waits for it; false inside a kernel that orders its own phases.
template <typename T, int LPK, int EPL, bool kVec, int GT, int KPG, int Threads, typename Sync>
__device__ __forceinline__ void attention_split_unit(const T* __restrict__ q, const T* __restrict__ k_cache,
                                                     const T* __restrict__ v_cache, const SplitArgs& a, int split,
                                                     int y, int b, int tid, float* smem, Sync sync, bool chained) {
  constexpr int kWarpsHere = Threads / 32;
  constexpr int kGroups = Threads / LPK;  // key rows side by side
  constexpr int kTile = kGroups * KPG;     // keys per tile
  using Share = RowShare<T, LPK, EPL, kVec, KPG>;
  float* s_p = smem;                  // [GT][kTile] scores, then probabilities
  float* s_alpha = s_p + GT * kTile;  // [GT] rescale of the running sums for this tile
  float* s_m = s_alpha + GT;          // [GT] running max
  float* s_l = s_m + GT;              // [GT] running sum
  float* s_red = s_l + GT;            // [kWarpsHere][GT][head_dim] per-warp outputs at the end

  const int kvh = y / a.passes, g0 = (y % a.passes) * GT;
  // The lengths and every cache entry but this step's own date from before this step's kernels
  // (launch.cuh): read them, and load the first tile of keys and values, while the previous kernel
  // (RoPE + the write of this step's key and value) finishes.
  const int n_keys = keys_of(a.positions, a.slots, b, a.cache_slots, a.max_len);
  const Chunks ch = chunks_of(n_keys, a.splits);
  const bool active = split < ch.active;
  const int c0 = split * ch.chunk, c1 = min(c0 + ch.chunk, n_keys);
  const int lane_k = tid % LPK, key_group = tid / LPK;
  const int warp = tid / 32, lane = tid % 32;
  const size_t first_row = active ? ((size_t)a.slots[b] * a.kv_heads + kvh) * a.max_len : 0;
  const T* keys = k_cache + first_row * a.head_dim;
  const T* values = v_cache + first_row * a.head_dim;
  const int newest = n_keys - 1;  // this step's key and value: written by the previous kernel
  Share kr, vr;
  auto load_tile = [&](int t0, bool skip_newest) {
#pragma unroll
    for (int i = 0; i < KPG; ++i) {
      const int j = t0 + key_group + kGroups * i;
      kr.load(i, keys + (size_t)j * a.head_dim, lane_k, a.head_dim, j < c1 && !(skip_newest && j == newest));
    }
#pragma unroll
    for (int i = 0; i < KPG; ++i) {
      const int j = t0 + key_group + kGroups * i;
      vr.load(i, values + (size_t)j * a.head_dim, lane_k, a.head_dim, j < c1 && !(skip_newest && j == newest));
    }
  };
  if (active) load_tile(c0, true);
  if (chained) {
    wait_for_previous_kernel();  // q and this step's key and value come from the previous kernel
    // Only now let the next kernels launch: launched at the start, the combine kernel and the ones
    // behind it (down to the o projection, loading its weights) came resident while the splits ran,
    // and the step was slower (README, "GPU runtime").
    allow_next_kernel();
  }
  if (a.reset_counters && split == 0 && y == 0 && tid == 0) a.ws.counters[b] = 0;
  if (!active) return;
#pragma unroll
  for (int i = 0; i < KPG; ++i) {
    const int j = c0 + key_group + kGroups * i;
    if (j == newest && j < c1) {
      kr.load(i, keys + (size_t)j * a.head_dim, lane_k, a.head_dim, true);
      vr.load(i, values + (size_t)j * a.head_dim, lane_k, a.head_dim, true);
    }
  }
  const int heads_here = min(GT, a.group - g0);
  const int head0 = kvh * a.group + g0;

  // this lane's elements of the GT query heads, loaded as the key rows are (RowShare): one 16-byte
  // load per head in the vector layout, all issued before the first use
  float qf[GT][EPL];
  {
    RowShare<T, LPK, EPL, kVec, GT> qr;
    const T* q_rows = q + ((size_t)b * a.heads + head0) * a.head_dim;
#pragma unroll
    for (int g = 0; g < GT; ++g) qr.load(g, q_rows + g * a.head_dim, lane_k, a.head_dim, g < heads_here);
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
      for (int e = 0; e < EPL; ++e) qf[g][e] = qr.get(g, e);
  }
  float acc[GT][EPL];
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[g][e] = 0.0f;
  if (tid < GT) {
    s_m[tid] = -INFINITY;
    s_l[tid] = 0.0f;
  }

  for (int t0 = c0; t0 < c1; t0 += kTile) {
    if (t0 != c0) load_tile(t0, false);
    // scores: partial dot products over each lane's elements, summed over the LPK lanes of a key
#pragma unroll
    for (int i = 0; i < KPG; ++i) {
      const int jt = key_group + kGroups * i;
      float dot[GT];
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        dot[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) dot[g] = fmaf(qf[g][e], kr.get(i, e), dot[g]);
      }
#pragma unroll
      for (int off = LPK / 2; off > 0; off >>= 1)
#pragma unroll
        for (int g = 0; g < GT; ++g) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], off);
      if (lane_k == 0) {
#pragma unroll
        for (int g = 0; g < GT; ++g) s_p[g * kTile + jt] = t0 + jt < c1 ? dot[g] * a.scale_log2 : -INFINITY;
      }
    }
    sync();
    // online softmax, one warp per head: every tile holds at least one key, so the max is finite
    for (int g = warp; g < GT; g += kWarpsHere) {
      float* p = s_p + g * kTile;
      float tile_max = -INFINITY;
      for (int j = lane; j < kTile; j += 32) tile_max = fmaxf(tile_max, p[j]);
      const float m_old = s_m[g];
      const float m_new = fmaxf(m_old, warp_max(tile_max));
      float sum = 0.0f;
      for (int j = lane; j < kTile; j += 32) {
        const float e = exp2f(p[j] - m_new);  // masked keys: exp2(-inf) = 0
        p[j] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      __syncwarp();  // every lane has read s_m[g] before lane 0 replaces it
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);  // 0 on the first tile
        s_alpha[g] = alpha;
        s_l[g] = s_l[g] * alpha + sum;
        s_m[g] = m_new;
      }
    }
    sync();
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      const float alpha = s_alpha[g];
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[g][e] *= alpha;
    }
#pragma unroll
    for (int i = 0; i < KPG; ++i) {
      const int jt = key_group + kGroups * i;
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        const float p = s_p[g * kTile + jt];
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[g][e] = fmaf(p, vr.get(i, e), acc[g][e]);
      }
    }
    sync();  // s_p and s_alpha are rewritten by the next tile
  }

  // lanes with the same lane_k in the key groups of a warp own the same elements: add them up,
  // then across warps in shared memory
#pragma unroll
  for (int off = 16; off >= LPK; off >>= 1)
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], off);
  if (lane < LPK) {
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        const int d = Share::elem(lane_k, e);
        if (d < a.head_dim) s_red[(warp * GT + g) * a.head_dim + d] = acc[g][e];
      }
  }
  sync();
  const size_t part0 = ((size_t)b * a.heads + head0) * a.splits + split;  // partial index of head g: + g * splits
  for (int idx = tid; idx < heads_here * a.head_dim; idx += Threads) {
    const int g = idx / a.head_dim, d = idx % a.head_dim;
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarpsHere; ++w) o += s_red[(w * GT + g) * a.head_dim + d];
    a.ws.o[(part0 + (size_t)g * a.splits) * a.head_dim + d] = o;
  }
  if (tid < heads_here) {
    a.ws.m[part0 + (size_t)tid * a.splits] = s_m[tid];
    a.ws.l[part0 + (size_t)tid * a.splits] = s_l[tid];
  }
}

// d += A (16 x 16 bf16, row) . B (16 x 8 bf16, col), fp32
__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The transpose of an 8 x 8 bf16 matrix held one row pair per lane (lane 4 r + c: row r, cols 2 c, 2 c + 1).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t v) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(v));
  return r;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int w) { return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w; }

__device__ __forceinline__ uint32_t bits_of(__nv_bfloat162 v) { return *reinterpret_cast<const uint32_t*>(&v); }

// Whether decode_attention.cu runs the split of bf16 rows at these addresses on the tensor cores
// (head_dim 64 or 128, 16-byte aligned). decode_layers.cu makes the same choice, so its partials match.
inline bool mma_split_applies(const void* q, const void* k, const void* v, int head_dim) {
  return (head_dim == 64 || head_dim == 128) && reinterpret_cast<uintptr_t>(q) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(k) % 16 == 0 && reinterpret_cast<uintptr_t>(v) % 16 == 0;
}

// The floats of shared memory attention_split_mma_unit uses: per-warp outputs, maxima and sums.
template <int D, int GT, int W>
constexpr int mma_split_smem_floats() {
  return W * GT * D + 2 * W * GT;
}

// The split step on the tensor cores (bf16, head_dim 64 or 128, up to 8 query heads per pass): same
// grid, chunks and partial outputs as attention_split_unit. Each warp takes 16 keys of a chunk at a
// time (tiles of 16 * W keys) and keeps its own online softmax; the warps merge once at the end.
// Transposed products, so that the 16 keys fill the MMA's rows and the (up to 8) query heads its
// columns: S^T = K Q^T, then O^T = V^T P^T. The head dims are permuted alike in K and Q (a dot
// product does not depend on their order) so that each lane loads its key rows as 16-byte vectors;
// P^T's fragment is the score accumulators transposed in registers (movmatrix), and goes in as bf16
// hi + lo parts (two MMAs, about 16 bits of each probability), so the output keeps close to fp32
// accuracy. Run by W warps numbered by tid, with the split kernel's block coordinates (split, y, b),
// as attention_split_unit: sync() synchronizes them, smem holds mma_split_smem_floats floats.
template <int D, int GT, int W, typename Sync>
__device__ __forceinline__ void attention_split_mma_unit(const __nv_bfloat16* __restrict__ q,
                                                         const __nv_bfloat16* __restrict__ k_cache,
                                                         const __nv_bfloat16* __restrict__ v_cache, const SplitArgs& a,
                                                         int split, int y, int b, int tid, float* smem, Sync sync,
                                                         bool chained) {
  static_assert((D == 64 || D == 128) && GT <= 8, "shape of the MMA path");
  constexpr int kKV = D / 32;  // 16-byte vectors of a key row per lane: lane t takes vectors 4 i + t
  constexpr int kVV = D / 64;  // of a value row: lane g takes vectors 8 u + g
  constexpr int kMT = D / 16;  // O^T m-tiles: tile 4 u + w, row g: dim 64 u + 8 g + 2 w, row g + 8: + 1
  float* s_o = smem;              // [W][GT][D] per-warp unnormalized outputs
  float* s_m = s_o + W * GT * D;  // [W][GT]
  float* s_l = s_m + W * GT;      // [W][GT]
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int kvh = y / a.passes, g0 = (y % a.passes) * GT;
  const int n_keys = keys_of(a.positions, a.slots, b, a.cache_slots, a.max_len);
  const Chunks ch = chunks_of(n_keys, a.splits);
  const bool active = split < ch.active;
  const int c0 = split * ch.chunk, c1 = min(c0 + ch.chunk, n_keys);
  const size_t first_row = active ? ((size_t)a.slots[b] * a.kv_heads + kvh) * a.max_len : 0;
  const uint4* keys = reinterpret_cast<const uint4*>(k_cache + first_row * D);
  const uint4* values = reinterpret_cast<const uint4*>(v_cache + first_row * D);
  const int newest = n_keys - 1;  // this step's key and value: written by the previous kernel
  // this lane's keys of a warp tile at `base`: base + g + 8 r for S^T's rows (r = 0, 1), and
  // base + 2 t + (r & 1) + 8 (r >> 1) for P^T's rows (r = 0..3)
  uint4 kr[2][kKV], vr[4][kVV];
  auto load_key = [&](int r, int base, bool skip_newest) {
    const int j = base + g + 8 * r;
    const bool valid = j < c1 && !(skip_newest && j == newest);
#pragma unroll
    for (int i = 0; i < kKV; ++i) kr[r][i] = valid ? __ldcg(keys + (size_t)j * (D / 8) + 4 * i + t) : make_uint4(0, 0, 0, 0);
  };
  auto load_value = [&](int r, int base, bool skip_newest) {
    const int j = base + 2 * t + (r & 1) + 8 * (r >> 1);
    const bool valid = j < c1 && !(skip_newest && j == newest);
#pragma unroll
    for (int u = 0; u < kVV; ++u) vr[r][u] = valid ? __ldcg(values + (size_t)j * (D / 8) + 8 * u + g) : make_uint4(0, 0, 0, 0);
  };
  auto load_tile = [&](int base, bool skip_newest) {
#pragma unroll
    for (int r = 0; r < 2; ++r) load_key(r, base, skip_newest);
#pragma unroll
    for (int r = 0; r < 4; ++r) load_value(r, base, skip_newest);
  };
  // A warp takes the tiles at c0 + 16 warp + 16 W k, last one first: the one that may hold this step's
  // key, which is the chunk's last
  const int first = c0 + 16 * warp;
  const int base0 = first < c1 ? first + (c1 - 1 - first) / (16 * W) * (16 * W) : first;
  if (active && base0 < c1) load_tile(base0, true);
  if (chained) {
    wait_for_previous_kernel();  // q and this step's key and value come from the previous kernel
    allow_next_kernel();         // only now: see attention_split_unit
  }
  if (a.reset_counters && split == 0 && y == 0 && tid == 0) a.ws.counters[b] = 0;
  if (!active) return;
  const int heads_here = min(GT, a.group - g0);
  const int head0 = kvh * a.group + g0;
  // this step's key and value, if in this warp's first tile (the previous kernel wrote them)
  if (base0 <= newest && newest < base0 + 16) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (base0 + g + 8 * r == newest) load_key(r, base0, false);
#pragma unroll
    for (int r = 0; r < 4; ++r)
      if (base0 + 2 * t + (r & 1) + 8 * (r >> 1) == newest) load_value(r, base0, false);
  }
  uint4 qv[kKV];  // column g of Q^T: query head head0 + g, the same dims as kr
  {
    const uint4* q_row = reinterpret_cast<const uint4*>(q + ((size_t)b * a.heads + head0 + g) * D);
#pragma unroll
    for (int i = 0; i < kKV; ++i) qv[i] = g < heads_here ? __ldcg(q_row + 4 * i + t) : make_uint4(0, 0, 0, 0);
  }

  float o[kMT][4];  // O^T: rows g, g + 8 of each m-tile; columns (heads) 2 t, 2 t + 1
#pragma unroll
  for (int j = 0; j < kMT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // heads 2 t + c: running max (log2 domain), same in every lane g
  float l[2] = {0.0f, 0.0f};            // and this lane's share of the sum
  for (int base = base0; base >= first && base < c1; base -= 16 * W) {
    if (base != base0) load_tile(base, false);
    // S^T: two accumulators (even and odd k-steps) halve the chain of dependent MMAs
    float s[2][4] = {};
#pragma unroll
    for (int i = 0; i < kKV; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        mma_bf16(s[h], word_of(kr[0][i], 2 * h), word_of(kr[1][i], 2 * h), word_of(kr[0][i], 2 * h + 1),
                 word_of(kr[1][i], 2 * h + 1), word_of(qv[i], 2 * h), word_of(qv[i], 2 * h + 1));
    // s[.][2 r + c]: key base + g + 8 r, head 2 t + c; past the chunk: -inf
    float p[4];
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const bool valid = base + g + 8 * r < c1;
        p[2 * r + c] = valid ? (s[0][2 * r + c] + s[1][2 * r + c]) * a.scale_log2 : -INFINITY;
        tile_max[c] = fmaxf(tile_max[c], p[2 * r + c]);
      }
#pragma unroll
    for (int c = 0; c < 2; ++c) {
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) tile_max[c] = fmaxf(tile_max[c], __shfl_xor_sync(0xffffffffu, tile_max[c], off));
      const float m_new = fmaxf(m[c], tile_max[c]);  // finite: key `base` is in the chunk
      const float alpha = exp2f(m[c] - m_new);       // 0 on the first tile
      m[c] = m_new;
      p[c] = exp2f(p[c] - m_new);
      p[2 + c] = exp2f(p[2 + c] - m_new);
      l[c] = l[c] * alpha + (p[c] + p[2 + c]);
#pragma unroll
      for (int j = 0; j < kMT; ++j) {
        o[j][c] *= alpha;
        o[j][2 + c] *= alpha;
      }
    }
    // P^T's B fragment (keys 2 t, 2 t + 1 | 2 t + 8, 2 t + 9 of head g) in hi and lo parts
    uint32_t hi[2], lo[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const __nv_bfloat162 h2 = __floats2bfloat162_rn(p[2 * r], p[2 * r + 1]);
      hi[r] = transpose8x8(bits_of(h2));
      lo[r] = transpose8x8(bits_of(__floats2bfloat162_rn(p[2 * r] - __low2float(h2), p[2 * r + 1] - __high2float(h2))));
    }
#pragma unroll
    for (int u = 0; u < kVV; ++u)
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        // A: V^T rows dims 64 u + 8 g + 2 w (low halves) and + 1 (high halves), columns (keys) as P^T's
        const uint32_t v0 = word_of(vr[0][u], w), v1 = word_of(vr[1][u], w);
        const uint32_t v2 = word_of(vr[2][u], w), v3 = word_of(vr[3][u], w);
        const uint32_t a0 = __byte_perm(v0, v1, 0x5410u), a1 = __byte_perm(v0, v1, 0x7632u);
        const uint32_t a2 = __byte_perm(v2, v3, 0x5410u), a3 = __byte_perm(v2, v3, 0x7632u);
        mma_bf16(o[4 * u + w], a0, a1, a2, a3, lo[0], lo[1]);
        mma_bf16(o[4 * u + w], a0, a1, a2, a3, hi[0], hi[1]);
      }
  }
#pragma unroll
  for (int c = 0; c < 2; ++c)
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) l[c] += __shfl_xor_sync(0xffffffffu, l[c], off);
  // merge the warps
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int head = 2 * t + c;
    if (head < GT) {
      float* row = s_o + (warp * GT + head) * D;
#pragma unroll
      for (int u = 0; u < kVV; ++u)
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          row[64 * u + 8 * g + 2 * w] = o[4 * u + w][c];
          row[64 * u + 8 * g + 2 * w + 1] = o[4 * u + w][2 + c];
        }
      if (g == 0) {
        s_m[warp * GT + head] = m[c];
        s_l[warp * GT + head] = l[c];
      }
    }
  }
  sync();
  const size_t part0 = ((size_t)b * a.heads + head0) * a.splits + split;  // partial index of head g: + g * splits
  for (int idx = tid; idx < heads_here * D; idx += W * 32) {
    const int gg = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < W; ++w) mx = fmaxf(mx, s_m[w * GT + gg]);
    float acc = 0.0f;
#pragma unroll
    for (int w = 0; w < W; ++w) acc = fmaf(exp2f(s_m[w * GT + gg] - mx), s_o[(w * GT + gg) * D + d], acc);
    a.ws.o[(part0 + (size_t)gg * a.splits) * D + d] = acc;
  }
  if (tid < heads_here) {
    const int gg = tid;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < W; ++w) mx = fmaxf(mx, s_m[w * GT + gg]);
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < W; ++w) sum = fmaf(exp2f(s_m[w * GT + gg] - mx), s_l[w * GT + gg], sum);
    a.ws.m[part0 + (size_t)gg * a.splits] = mx;
    a.ws.l[part0 + (size_t)gg * a.splits] = sum;
  }
}

struct CombineArgs {
  const int64_t* slots;
  const int64_t* positions;
  int heads, max_len, cache_slots, head_dim, splits;
  Workspace ws;
  // fused sub-norm + quantization (kNorm)
  const void* norm_weight;
  float eps;
  int k_stride;
  int8_t* x_q;
  float* scale;
};

// One combine block's work: head h of row b (blockIdx.x, .y of the combine kernel), by the whole
// block (kCombineThreads threads or more: the extra ones add exact zeros to the reductions, so any
// block size gives the same bits). s_row: kNorm's dynamic shared memory. chained: as above.
template <typename T, bool kNorm>
__device__ __forceinline__ void attention_combine_unit(T* __restrict__ out, const CombineArgs& a, int h, int b,
                                                       float* s_row, bool chained) {
  __shared__ float s_w[kMaxAttentionSplits];
  __shared__ float scratch[32];
  __shared__ bool s_last;
  if (chained) allow_next_kernel();
  const Chunks ch = chunks_of(keys_of(a.positions, a.slots, b, a.cache_slots, a.max_len), a.splits);  // (launch.cuh)
  if (chained) wait_for_previous_kernel();
  // Every load of the partials the first output element needs is issued here, at once: thread s
  // takes split s's max and sum (kCombineThreads >= kMaxAttentionSplits), thread d the partial
  // outputs of element d for the first kEarlySplits splits. Then the reductions and the weighted
  // sum run on registers, not on two more dependent round trips to L2.
  static_assert(kCombineThreads >= kMaxAttentionSplits, "one split per thread");
  constexpr int kEarlySplits = 8;
  const size_t part0 = ((size_t)b * a.heads + h) * a.splits;
  const int s_own = threadIdx.x, d0 = threadIdx.x;
  const bool own = s_own < ch.active;
  const float m_own = own ? __ldcg(a.ws.m + part0 + s_own) : -INFINITY;
  const float l_own = own ? __ldcg(a.ws.l + part0 + s_own) : 0.0f;
  float o_early[kEarlySplits];
#pragma unroll
  for (int s = 0; s < kEarlySplits; ++s)
    o_early[s] = s < ch.active && d0 < a.head_dim ? __ldcg(a.ws.o + (part0 + s) * a.head_dim + d0) : 0.0f;
  const float m = block_reduce(m_own, [](float x, float y) { return fmaxf(x, y); }, scratch, -INFINITY);
  const float w_own = own ? exp2f(m_own - m) : 0.0f;
  if (own) s_w[s_own] = w_own;
  const float l = block_reduce(own ? l_own * w_own : 0.0f, [](float x, float y) { return x + y; }, scratch);  // also publishes s_w
  T* row = out + (size_t)b * a.heads * a.head_dim;
  for (int d = d0; d < a.head_dim; d += blockDim.x) {
    float o = 0.0f;
    int s = 0;
    if (d == d0) {
#pragma unroll
      for (int e = 0; e < kEarlySplits; ++e)
        if (e < ch.active) o = fmaf(o_early[e], s_w[e], o);
      s = kEarlySplits;
    }
#pragma unroll 8
    for (; s < ch.active; ++s) o = fmaf(__ldcg(a.ws.o + (part0 + s) * a.head_dim + d), s_w[s], o);
    row[h * a.head_dim + d] = to_dtype<T>(ch.active > 0 ? __fdiv_rn(o, l) : 0.0f);
  }
  if constexpr (kNorm) {
    // the last head of the row to finish normalizes and quantizes the whole row
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(&a.ws.counters[b], 1) == a.heads - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    // stage the row and the weight in shared memory with independent loads: the norm and the
    // quantization then make three passes over shared memory instead of three latency-bound
    // passes over L2
    const T* weight = static_cast<const T*>(a.norm_weight);
    const int n = a.heads * a.head_dim;
    float* s_weight = s_row + n;
#pragma unroll 8
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      s_row[i] = load_fresh(row, i);  // other blocks of this kernel wrote it
      s_weight[i] = load_float(weight, i);
    }
    __syncthreads();
    quantize_row_strided<true>([&](int i) { return s_row[i]; }, [&](int i) { return s_weight[i]; }, n, a.k_stride,
                               a.eps, a.x_q + (size_t)b * a.k_stride, a.scale + b);
  }
}

}  // namespace attention
}  // namespace bitnet
