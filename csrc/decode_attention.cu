// Decode attention (one query token per sequence) over the KV cache: flash decoding in two launches.
//
// Split kernel, grid (splits, kv_heads * passes, batch): a block takes one kv head of one sequence
// and one chunk of its keys, for all the query heads of that kv head's group (GT at a time, so K and
// V are read once per group), and writes an unnormalized partial output, its running max and sum.
// Chunks are cut from the length held on the device (keys 0 .. positions[b]) into `splits` equal
// parts, so short and long sequences both spread over every block, while the grid depends only on
// the shapes: a CUDA graph replays the same launch for any lengths. Blocks past the last chunk exit.
//
// Before waiting for the previous kernel (RoPE, which writes this step's key and value), a block
// reads the lengths and loads its first tile of keys and values, all but this step's own row, which
// it loads after the wait (launch.cuh says why that is safe).
//
// Inside a block, LPK lanes share a key row (16-byte loads for head_dim 64 / 128, scalar loads for
// any other even head_dim <= 256); keys come in tiles of kThreads / LPK * KPG rows whose K and V
// loads are all issued before the first use. Scores go to shared memory, one warp per head updates
// the running softmax (log2 domain), then every lane accumulates p * v for the elements it owns.
//
// Combine kernel, grid (heads, batch): rescales the partials to the global max, divides by the total
// sum and rounds once to the activation dtype. The fused variant then counts finished heads per row;
// the last block of a row runs the attention sub-norm and int8 quantization on the rounded row with
// the same math as quantize.cu (quant_math.cuh), bit for bit.
//
// Numerics: fp32 throughout, like the reference, but in a different summation order and with exp2f:
// results agree with engine.ops.TorchOps.attention to fp32 rounding, not bit for bit.

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels.h"
#include "launch.cuh"
#include "quant_math.cuh"

namespace bitnet {
namespace {

constexpr int kThreads = 128;  // split kernel: 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kCombineThreads = 128;
constexpr int kKeyGranule = 16;       // chunks are multiples of this many keys
constexpr int kBlocksPerSm = 2;       // split-kernel blocks per SM the default split count aims for
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

size_t aligned(size_t bytes) { return (bytes + 255) / 256 * 256; }

Workspace carve(void* base, int batch, int heads, int head_dim, int splits) {
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
int heads_per_pass(int group) {
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

template <typename T, int LPK, int EPL, bool kVec, int GT, int KPG>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                                                                    const T* __restrict__ v_cache, SplitArgs a) {
  constexpr int kGroups = kThreads / LPK;  // key rows side by side
  constexpr int kTile = kGroups * KPG;     // keys per tile
  using Share = RowShare<T, LPK, EPL, kVec, KPG>;
  extern __shared__ float smem[];
  float* s_p = smem;                  // [GT][kTile] scores, then probabilities
  float* s_alpha = s_p + GT * kTile;  // [GT] rescale of the running sums for this tile
  float* s_m = s_alpha + GT;          // [GT] running max
  float* s_l = s_m + GT;              // [GT] running sum
  float* s_red = s_l + GT;            // [kWarps][GT][head_dim] per-warp outputs at the end

  const int split = blockIdx.x, b = blockIdx.z;
  const int kvh = blockIdx.y / a.passes, g0 = (blockIdx.y % a.passes) * GT;
  allow_next_kernel();
  // The lengths and every cache entry but this step's own date from before this step's kernels
  // (launch.cuh): read them, and load the first tile of keys and values, while the previous kernel
  // (RoPE + the write of this step's key and value) finishes.
  const int n_keys = keys_of(a.positions, a.slots, b, a.cache_slots, a.max_len);
  const Chunks ch = chunks_of(n_keys, a.splits);
  const bool active = split < ch.active;
  const int c0 = split * ch.chunk, c1 = min(c0 + ch.chunk, n_keys);
  const int lane_k = threadIdx.x % LPK, key_group = threadIdx.x / LPK;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
  wait_for_previous_kernel();  // q and this step's key and value come from the previous kernel
  if (a.reset_counters && split == 0 && blockIdx.y == 0 && threadIdx.x == 0) a.ws.counters[b] = 0;
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

  float qf[GT][EPL];
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      const int d = Share::elem(lane_k, e);
      qf[g][e] = g < heads_here && d < a.head_dim ? load_fresh(q + ((size_t)b * a.heads + head0 + g) * a.head_dim, d)
                                                  : 0.0f;
    }
  float acc[GT][EPL];
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[g][e] = 0.0f;
  if (threadIdx.x < GT) {
    s_m[threadIdx.x] = -INFINITY;
    s_l[threadIdx.x] = 0.0f;
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
    __syncthreads();
    // online softmax, one warp per head: every tile holds at least one key, so the max is finite
    for (int g = warp; g < GT; g += kWarps) {
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
    __syncthreads();
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
    __syncthreads();  // s_p and s_alpha are rewritten by the next tile
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
  __syncthreads();
  const size_t part0 = ((size_t)b * a.heads + head0) * a.splits + split;  // partial index of head g: + g * splits
  for (int idx = threadIdx.x; idx < heads_here * a.head_dim; idx += kThreads) {
    const int g = idx / a.head_dim, d = idx % a.head_dim;
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += s_red[(w * GT + g) * a.head_dim + d];
    a.ws.o[(part0 + (size_t)g * a.splits) * a.head_dim + d] = o;
  }
  if (threadIdx.x < heads_here) {
    a.ws.m[part0 + (size_t)threadIdx.x * a.splits] = s_m[threadIdx.x];
    a.ws.l[part0 + (size_t)threadIdx.x * a.splits] = s_l[threadIdx.x];
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

template <typename T, bool kNorm>
__global__ void __launch_bounds__(kCombineThreads) attention_combine_kernel(T* __restrict__ out, CombineArgs a) {
  extern __shared__ float s_row[];  // kNorm: the row and the norm weight, staged once in fp32
  __shared__ float s_w[kMaxAttentionSplits];
  __shared__ float scratch[32];
  __shared__ bool s_last;
  const int h = blockIdx.x, b = blockIdx.y;
  allow_next_kernel();
  const Chunks ch = chunks_of(keys_of(a.positions, a.slots, b, a.cache_slots, a.max_len), a.splits);  // (launch.cuh)
  wait_for_previous_kernel();
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

template <typename T, int LPK, int EPL, bool kVec, int GT, int KPG>
cudaError_t launch_split(const T* q, const T* k, const T* v, const SplitArgs& args, int batch, cudaStream_t stream) {
  constexpr int kTile = kThreads / LPK * KPG;
  const size_t smem = (size_t)(GT * kTile + 3 * GT + kWarps * GT * args.head_dim) * sizeof(float);
  const dim3 grid(args.splits, args.kv_heads * args.passes, batch);
  return launch_pdl(attention_split_kernel<T, LPK, EPL, kVec, GT, KPG>, grid, dim3(kThreads), smem, stream, q, k, v,
                    args);
}

// Lanes per key row and elements per lane: 16-byte vectors for the common head sizes, else scalar.
template <typename T, int GT>
cudaError_t launch_split_for_head_dim(const T* q, const T* k, const T* v, const SplitArgs& args, int batch,
                                      cudaStream_t stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(k) % 16 == 0 && reinterpret_cast<uintptr_t>(v) % 16 == 0;
  if (aligned) {
    constexpr int E = 16 / sizeof(T);  // elements per 16-byte vector
    if (args.head_dim == 128) return launch_split<T, 128 / E, E, true, GT, 8>(q, k, v, args, batch, stream);
    if (args.head_dim == 64) return launch_split<T, 64 / E, E, true, GT, 8>(q, k, v, args, batch, stream);
  }
  return launch_split<T, 32, kMaxHeadDim / 32, false, GT, 4>(q, k, v, args, batch, stream);
}

template <typename T>
cudaError_t launch_typed(const T* q, int batch, int heads, const int64_t* slots, const int64_t* positions,
                         const KVCacheLayer& cache, int splits, void* workspace, T* out, const void* norm_weight,
                         float eps, int k_stride, int8_t* x_q, float* scale, cudaStream_t stream) {
  const int group = heads / cache.kv_heads, gt = heads_per_pass(group);
  const Workspace ws = carve(workspace, batch, heads, cache.head_dim, splits);
  const bool fused = norm_weight != nullptr;
  SplitArgs sa{slots, positions, heads, cache.kv_heads, group, (group + gt - 1) / gt, cache.max_len, cache.slots,
               cache.head_dim, splits,
               static_cast<float>(kLog2e / std::sqrt(static_cast<double>(cache.head_dim))), ws,
               fused};
  const T* k = static_cast<const T*>(cache.k);
  const T* v = static_cast<const T*>(cache.v);
  cudaError_t err;
  switch (gt) {
    case 1: err = launch_split_for_head_dim<T, 1>(q, k, v, sa, batch, stream); break;
    case 2: err = launch_split_for_head_dim<T, 2>(q, k, v, sa, batch, stream); break;
    case 4: err = launch_split_for_head_dim<T, 4>(q, k, v, sa, batch, stream); break;
    default: err = launch_split_for_head_dim<T, 8>(q, k, v, sa, batch, stream); break;
  }
  if (err != cudaSuccess) return err;
  CombineArgs ca{slots, positions, heads, cache.max_len, cache.slots, cache.head_dim, splits, ws,
                 norm_weight, eps, k_stride, x_q, scale};
  const dim3 grid(heads, batch);
  if (fused) {
    const size_t smem = 2 * (size_t)heads * cache.head_dim * sizeof(float);
    if (smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(attention_combine_kernel<T, true>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
      if (e != cudaSuccess) return e;
    }
    return launch_pdl(attention_combine_kernel<T, true>, grid, dim3(kCombineThreads), smem, stream,
                      static_cast<T*>(ws.row), ca);
  }
  return launch_pdl(attention_combine_kernel<T, false>, grid, dim3(kCombineThreads), 0, stream, out, ca);
}

bool valid_shape(int batch, int heads, const KVCacheLayer& c, int splits) {
  return batch > 0 && heads > 0 && c.kv_heads > 0 && heads % c.kv_heads == 0 && c.head_dim >= 2 &&
         c.head_dim % 2 == 0 && c.head_dim <= kMaxHeadDim && c.max_len > 0 && c.slots > 0 && splits >= 1 &&
         splits <= kMaxAttentionSplits && batch <= 65535 && heads <= 65535;
}

cudaError_t dispatch(const void* q, DType dtype, int batch, int heads, const int64_t* slots, const int64_t* positions,
                     const KVCacheLayer& cache, int splits, void* workspace, void* out, const void* norm_weight,
                     float eps, int k_stride, int8_t* x_q, float* scale, cudaStream_t stream) {
  if (!valid_shape(batch, heads, cache, splits)) return cudaErrorInvalidValue;
  if (dtype == DType::kBFloat16)
    return launch_typed(static_cast<const __nv_bfloat16*>(q), batch, heads, slots, positions, cache, splits, workspace,
                        static_cast<__nv_bfloat16*>(out), norm_weight, eps, k_stride, x_q, scale, stream);
  if (dtype == DType::kFloat32)
    return launch_typed(static_cast<const float*>(q), batch, heads, slots, positions, cache, splits, workspace,
                        static_cast<float*>(out), norm_weight, eps, k_stride, x_q, scale, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

int decode_attention_splits(int batch, int heads, const KVCacheLayer& cache) {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0)
    sms = 132;
  const int group = cache.kv_heads > 0 ? heads / cache.kv_heads : 1;
  const int passes = ceil_div(group, heads_per_pass(group));
  const int blocks = batch * cache.kv_heads * passes;  // split-kernel blocks per split
  int splits = blocks > 0 ? ceil_div(kBlocksPerSm * sms, blocks) : 1;
  splits = std::min(splits, ceil_div(cache.max_len, kMinKeysPerSplit));
  return std::max(1, std::min(splits, kMaxAttentionSplits));
}

size_t decode_attention_workspace_bytes(int batch, int heads, int head_dim, int splits) {
  const size_t partials = (size_t)batch * heads * splits;
  return aligned(partials * head_dim * sizeof(float)) + 2 * aligned(partials * sizeof(float)) +
         aligned((size_t)batch * sizeof(int)) + aligned((size_t)batch * heads * head_dim * sizeof(float));
}

cudaError_t decode_attention(const void* q, DType dtype, int batch, int heads, const int64_t* slots,
                             const int64_t* positions, const KVCacheLayer& cache, int splits, void* workspace,
                             void* out, cudaStream_t stream) {
  return dispatch(q, dtype, batch, heads, slots, positions, cache, splits, workspace, out, nullptr, 0.0f, 0, nullptr,
                  nullptr, stream);
}

cudaError_t decode_attention_rmsnorm_quantize(const void* q, DType dtype, int batch, int heads, const int64_t* slots,
                                              const int64_t* positions, const KVCacheLayer& cache, int splits,
                                              const void* norm_weight, float eps, int k_stride, void* workspace,
                                              int8_t* x_q, float* scale, cudaStream_t stream) {
  if (norm_weight == nullptr || k_stride < heads * cache.head_dim) return cudaErrorInvalidValue;
  return dispatch(q, dtype, batch, heads, slots, positions, cache, splits, workspace, nullptr, norm_weight, eps,
                  k_stride, x_q, scale, stream);
}

}  // namespace bitnet
