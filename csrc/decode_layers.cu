// Every layer of a decode step (one token for each of up to 8 sequences) in one persistent kernel.
//
// Why: the op-by-op step launches 11 kernels per layer, each a short dependent chain of
// latency-bound work; at batch 1 the launch gaps, not the bytes, set the step time. Here one
// cooperative launch (one block per SM, all resident) runs the layers as phases separated by a grid
// barrier, and the weights of each projection are copied into shared memory phases ahead, so HBM
// streams them while the grid does other work.
//
// Status: opt-in (BITNET_FUSED_DECODE=1). On an H100 a phase costs about what the kernel it replaces
// costs and a barrier about what a launch gap costs, so it is still slower than the op-by-op step
// (README, "GPU runtime"; bench/profile_decode.py prints the phases from the timeline below).
//
// Phases of a layer (a barrier after each):
//   1. input RMSNorm + int8 quantization of x, then the q|k|v GEMV          -> qkv
//   2. RoPE of q and k, k and v written into the cache                      -> q, cache
//   3. attention split blocks (decode_attention.cuh), kUnits per block      -> partials
//   4. attention combine, one (row, head) per block                         -> attn
//   5. attention sub-norm + quantization, o GEMV + residual x               -> h
//   6. post-attention norm + quantization, gate|up GEMV                     -> gate_up
//   7. act(gate) * up + FFN sub-norm + quantization, down GEMV + residual h -> x
// The norms are computed by every block for itself (a row is a few KB, read from L2), which saves a
// phase each; the GEMV blocks then read their activations from shared memory.
//
// Numbers: the same device code as the op-by-op kernels (quant_math.cuh, rope_kv.cuh,
// decode_attention.cuh with the same split count) and the same integer dot products and epilogue
// as w2a8_gemm.cu: the step's outputs are bit-identical to the op-by-op step's.
//
// GEMV work split: block b owns row tiles b, b + G, b + 2G, ... (G blocks); its items (tile, K
// chunk) go round-robin to its warps, each adding its MMA results into the block's shared int32
// accumulators (exact, so the order is free), and the owner block applies the epilogue.

#include <cuda_bf16.h>

#include <algorithm>

#include "decode_attention.cuh"
#include "gemm_common.cuh"
#include "kernels.h"
#include "launch.cuh"
#include "quant_math.cuh"
#include "rope_kv.cuh"

namespace bitnet {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256;  // 8 warps, one block per SM: up to 255 registers a thread, no spills
constexpr int kWarps = kThreads / 32;
constexpr int kUnits = kThreads / attention::kThreads;  // attention split blocks side by side
constexpr int kVecs = 4;        // norm rows held in registers: up to kVecs * kThreads * 8 elements
constexpr int kMaxTiles = 16;   // row tiles a block owns in one projection
enum Proj { kQKV = 0, kO = 1, kGateUp = 2, kDown = 3 };

struct Projection {
  const uint4* w;
  int n, ntiles, nchunks;
  Segments seg;
};

struct Args {
  const DecodeLayer* layers;
  DecodeShape shape;
  int m, nqkv;
  const bf16* x_in;
  bf16* x;  // the output, and each layer's input after the first
  const int64_t* positions;
  const int64_t* slots;
  const float* cos;
  const float* sin;
  int table_len;
  bf16* k_cache;
  bf16* v_cache;
  size_t layer_elems;  // elements of one layer's K (or V) cache
  int cache_slots, max_len;
  bf16 *h, *qkv, *q, *attn, *gate_up;
  attention::SplitArgs split;
  attention::CombineArgs combine;
  unsigned long long* barrier;  // the barrier's arrival count (grid_sync)
  unsigned long long* timeline;  // optional: per block, the time each phase ends and the next begins
};

__device__ __forceinline__ unsigned long long load_acquire(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long add_release(unsigned long long* p, unsigned long long v) {
  unsigned long long old;
  asm volatile("atom.add.release.gpu.global.u64 %0, [%1], %2;" : "=l"(old) : "l"(p), "l"(v) : "memory");
  return old;
}

// Every block of the grid arrives before any leaves; writes before it are visible after it (data
// written by other blocks is still read through L2: load_fresh, __ldcg). One 64-bit counter that
// only grows, across barriers and launches: every launch has G blocks passing the same barriers, so
// the arrivals at one barrier take the tickets of one multiple of G, and a block leaves once the
// count reaches the end of its ticket's multiple. One atomic per block, nothing to reset, no wrap
// in practice (2^64 arrivals).
__device__ __forceinline__ void grid_sync(unsigned long long* count) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned long long ticket = add_release(count, 1ull);
    const unsigned long long target = (ticket / gridDim.x + 1) * gridDim.x;
    while (load_acquire(count) < target) {
    }
  }
  __syncthreads();
}

constexpr int kPhases = kDecodePhases;

// With a timeline: this block's time stamp `which` of phase `phase` of layer l (kernels.h says which).
__device__ __forceinline__ void mark(const Args& a, int l, int phase, int which) {
  if (a.timeline != nullptr && threadIdx.x == 0) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    a.timeline[((size_t)(l * kPhases + phase) * 4 + which) * gridDim.x + blockIdx.x] = t;
  }
}

// The end of phase `phase` of layer l: the grid barrier, stamped on arrival (0) and departure (1).
__device__ __forceinline__ void end_phase(const Args& a, int l, int phase) {
  mark(a, l, phase, 0);
  grid_sync(a.barrier);
  mark(a, l, phase, 1);
}

__device__ __forceinline__ void named_sync(int id) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(attention::kThreads) : "memory");
}

__device__ __forceinline__ Projection projection(const Args& a, const DecodeLayer& layer, int p) {
  const DecodeShape& s = a.shape;
  const int n = p == kQKV ? a.nqkv : p == kGateUp ? 2 * s.ffn : s.hidden;
  const int k = p == kDown ? s.ffn : s.hidden;
  return {reinterpret_cast<const uint4*>(layer.weight[p]), n, ceil_div(n, kTileRows), ceil_div(k, kChunkK),
          layer.segments[p]};
}

__device__ __forceinline__ int tiles_of_block(int ntiles) {
  return ntiles > (int)blockIdx.x ? (ntiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
}

// Weight staging: the block's tiles of a projection (each a contiguous run of nchunks 512-byte
// chunks in the tiled layout) are copied into shared memory with cp.async, phases before the GEMV
// that reads them, so HBM streams them while the grid does other work: o, gate|up and down are
// issued at the start of the attention phases (where most blocks idle), the next layer's q|k|v as
// soon as gate|up is done with its buffer. Each copy is one cp.async group.
__device__ __forceinline__ void stage(const Projection& p, uint4* buf) {
  const int per_tile = p.nchunks * 32, total = tiles_of_block(p.ntiles) * per_tile;  // 16-byte pieces
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int i = idx / per_tile, rest = idx - i * per_tile;
    const uint4* src = p.w + (size_t)(blockIdx.x + i * gridDim.x) * per_tile + rest;
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(buf + idx));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Wait for all of this thread's copies but the `pending` newest groups, then for the block's.
template <int kPending>
__device__ __forceinline__ void wait_staged() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
  __syncthreads();
}

struct Smem {
  int8_t* x;    // [8][k_stride] this phase's quantized activations
  int* acc;     // [kMaxTiles][32 lanes][4] the owned tiles' int32 sums, zero between GEMVs
  float* xs;    // [8] activation scales
  int* xsum;    // [8] sum of each row's int8 activations
  float* attn;  // kUnits split-unit scratch areas (aliases x)
  uint4* a;     // staged q|k|v, then gate|up weights
  uint4* b;     // staged o weights
  uint4* c;     // staged down weights
};

// One item: the MMA of a tile's chunk with the 8 rows' activations, added to the shared sums.
__device__ __forceinline__ void mma_item(const Projection& p, int item, const uint4 w, const Smem& s, int m,
                                         int k_stride) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int i = item / p.nchunks, c = item - i * p.nchunks;
  uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;
  if (g < m) {
    const uint4* src = reinterpret_cast<const uint4*>(s.x + g * k_stride + c * kChunkK + 32 * q);
    lo = src[0], hi = src[1];
  }
  const uint32_t xv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  const uint32_t wv[4] = {w.x, w.y, w.z, w.w};
  int acc[4] = {0, 0, 0, 0};
#pragma unroll
  for (int st = 0; st < 4; ++st) {
    mma_ternary(acc, ternary_a(wv[st]), xv[2 * st], xv[2 * st + 1]);
  }
  unscale_rows(acc);
  int* dst = s.acc + (i * 32 + lane) * 4;
#pragma unroll
  for (int e = 0; e < 4; ++e) atomicAdd(dst + e, acc[e]);
}

// out[tok, row] for the block's tiles: (sum c*x - sum x) * w_scale / x_scale (+ residual), rounded
// once, exactly w2a8_gemm.cu's epilogue. Activations: s.x, s.xs, s.xsum (norm_rows); weights: staged
// (stage, wait_staged). On return every warp is done reading `staged`.
__device__ __forceinline__ void gemv(const Projection& p, const uint4* staged, const Smem& s, int m,
                                     const bf16* residual, bf16* out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int tiles = tiles_of_block(p.ntiles), items = tiles * p.nchunks, k_stride = p.nchunks * kChunkK;
#pragma unroll 4
  for (int item = warp; item < items; item += kWarps) mma_item(p, item, staged[item * 32 + lane], s, m, k_stride);
  __syncthreads();
  for (int e = threadIdx.x; e < tiles * 128; e += kThreads) {
    const int i = e >> 7, ln = (e >> 2) & 31, reg = e & 3;
    const int row = (blockIdx.x + i * gridDim.x) * kTileRows + (ln >> 2) + 8 * (reg >> 1);
    const int tok = 2 * (ln & 3) + (reg & 1);
    const int sum = s.acc[e];
    s.acc[e] = 0;
    if (row < p.n && tok < m) {
      const int dot = sum - s.xsum[tok];
      float y = __fdiv_rn(__fmul_rn(static_cast<float>(dot), segment_scale(p.seg, row)), s.xs[tok]);
      if (residual != nullptr) y = __fadd_rn(y, __bfloat162float(ldcg_ordered(residual + (size_t)tok * p.n + row)));
      out[(size_t)tok * p.n + row] = __float2bfloat16_rn(y);
    }
  }
}

// The m rows of src (k elements each; with kGated, gate|up rows of 2k whose act(gate) * up is taken)
// through RMSNorm with `gain` and int8 quantization into shared memory, exactly quant_math.cuh's
// register path (as quantize.cu and decode.cu run it), then each row's sum of int8 values.
template <bool kGated, Activation kAct>
__device__ __forceinline__ void norm_rows(const bf16* src, const bf16* gain_w, int k, int k_stride, float eps, int m,
                                          const Smem& s) {
  constexpr int E = 8;
  uint4 gain[kVecs];
  load_gain_registers<kVecs>(gain_w, k, gain);
  if (threadIdx.x < 8) s.xsum[threadIdx.x] = 0;
  for (int b = 0; b < m; ++b) {
    float v[kVecs][E];
    if constexpr (kGated) load_gated_row_registers<kAct, kVecs, E>(src + (size_t)b * 2 * k, k, v);
    else load_row_registers<kVecs, E>(src + (size_t)b * k, k, v);
    quantize_row_registers<true, bf16>(v, gain, k, k_stride, eps, s.x + b * k_stride, s.xs + b);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  for (int b = 0; b < m; ++b) {
    const int* words = reinterpret_cast<const int*>(s.x + b * k_stride);
    int sum = 0;
    for (int w = threadIdx.x; w < k_stride / 4; w += kThreads) sum = __dp4a(words[w], 0x01010101, sum);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) atomicAdd(s.xsum + b, sum);
  }
  __syncthreads();
}

// decode_attention.cu's split for this head size (the same code and template arguments, so the same
// bits): kMmaD = 64 or 128, the tensor-core split; 0, the SIMT split with scalar loads.
struct ScalarSplit {
  static constexpr int LPK = 32, EPL = attention::kMaxHeadDim / 32, KPG = 4;
};
constexpr int kUnitWarps = attention::kThreads / 32;

template <int GT, int kMmaD>
constexpr int split_smem_floats(int head_dim) {
  if constexpr (kMmaD > 0) return attention::mma_split_smem_floats<kMmaD, GT, kUnitWarps>();
  else return attention::split_smem_floats<ScalarSplit::LPK, GT, ScalarSplit::KPG, attention::kThreads>(head_dim);
}

// Shared memory of a block: the quantized rows (aliased by the attention units' scratch), the three
// weight staging buffers, the GEMV sums, the rows' scales and int8 sums.
struct SmemLayout {
  int a, b, c, acc, xs, total;  // byte offsets; x (and attention) at 0
};

__host__ __device__ inline int staged_size(int n, int k, int grid) {
  return ceil_div(ceil_div(n, kTileRows), grid) * ceil_div(k, kChunkK) * 512;
}

__host__ __device__ inline SmemLayout smem_layout(const DecodeShape& s, int m, int grid, int attn_bytes) {
  const int nqkv = (s.heads + 2 * s.kv_heads) * s.head_dim;
  const int stride = ceil_div(s.hidden > s.ffn ? s.hidden : s.ffn, kChunkK) * kChunkK;
  const int qkv = staged_size(nqkv, s.hidden, grid), gate_up = staged_size(2 * s.ffn, s.hidden, grid);
  auto up16 = [](int v) { return (v + 15) / 16 * 16; };
  SmemLayout l;
  l.a = up16(m * stride > attn_bytes ? m * stride : attn_bytes);
  l.b = l.a + (qkv > gate_up ? qkv : gate_up);
  l.c = l.b + staged_size(s.hidden, s.hidden, grid);
  l.acc = l.c + staged_size(s.hidden, s.ffn, grid);
  l.xs = l.acc + kMaxTiles * 128 * (int)sizeof(int);
  l.total = l.xs + 16 * (int)sizeof(float);
  return l;
}

template <int GT, int kMmaD, Activation kAct>
__global__ void __launch_bounds__(kThreads, 1) decode_layers_kernel(Args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DecodeShape& sh = a.shape;
  const int m = a.m;
  const int hid_stride = ceil_div(sh.hidden, kChunkK) * kChunkK, ffn_stride = ceil_div(sh.ffn, kChunkK) * kChunkK;
  const int unit_floats = split_smem_floats<GT, kMmaD>(sh.head_dim);
  const SmemLayout lay = smem_layout(sh, m, gridDim.x, kUnits * unit_floats * (int)sizeof(float));
  Smem s;
  s.x = reinterpret_cast<int8_t*>(smem_raw);
  s.attn = reinterpret_cast<float*>(smem_raw);
  s.a = reinterpret_cast<uint4*>(smem_raw + lay.a);
  s.b = reinterpret_cast<uint4*>(smem_raw + lay.b);
  s.c = reinterpret_cast<uint4*>(smem_raw + lay.c);
  s.acc = reinterpret_cast<int*>(smem_raw + lay.acc);
  s.xs = reinterpret_cast<float*>(smem_raw + lay.xs);
  s.xsum = reinterpret_cast<int*>(s.xs + 8);
  for (int i = threadIdx.x; i < kMaxTiles * 128; i += kThreads) s.acc[i] = 0;

  const int unit = threadIdx.x / attention::kThreads, unit_tid = threadIdx.x % attention::kThreads;
  float* unit_smem = s.attn + unit * unit_floats;
  const int split_units = m * a.split.kv_heads * a.split.passes * a.split.splits;
  stage(projection(a, a.layers[0], kQKV), s.a);
  __syncthreads();

  for (int l = 0; l < sh.layers; ++l) {
    const DecodeLayer& layer = a.layers[l];
    const bool last = l + 1 == sh.layers;
    const bf16* x_in = l == 0 ? a.x_in : a.x;
    const KVCacheLayer cache{a.k_cache + l * a.layer_elems, a.v_cache + l * a.layer_elems, a.cache_slots,
                             sh.kv_heads, a.max_len, sh.head_dim};
    // 1. norm, q|k|v (staged: nothing newer)
    norm_rows<false, kAct>(x_in, static_cast<const bf16*>(layer.norm[0]), sh.hidden, hid_stride, sh.eps, m, s);
    mark(a, l, 0, 2);
    wait_staged<0>();
    gemv(projection(a, layer, kQKV), s.a, s, m, nullptr, a.qkv);
    mark(a, l, 0, 3);
    end_phase(a, l, 0);
    // 2. RoPE, cache write. After each block's own work in phases 2-4 (where most blocks idle), the
    // layer's other weights start streaming in: gate|up (A is free again), o, down.
    const int items = rope_kv_items(sh.heads, cache);
    for (int idx = blockIdx.x * kThreads + threadIdx.x; idx < m * items; idx += gridDim.x * kThreads)
      rope_kv_item(a.qkv, a.positions, a.slots, a.cos, a.sin, a.table_len, sh.heads, cache, a.q, idx / items,
                   idx % items, false);
    stage(projection(a, layer, kGateUp), s.a);
    end_phase(a, l, 1);
    // 3. attention splits: kUnits at a time per block, consecutive units on different blocks
    for (int u = unit * gridDim.x + blockIdx.x; u < split_units; u += gridDim.x * kUnits) {
      const int split = u % a.split.splits, rest = u / a.split.splits;
      const int y = rest % (a.split.kv_heads * a.split.passes), b = rest / (a.split.kv_heads * a.split.passes);
      const auto* k = static_cast<const bf16*>(cache.k);
      const auto* v = static_cast<const bf16*>(cache.v);
      const auto sync = [&] { named_sync(1 + unit); };
      if constexpr (kMmaD > 0)
        attention::attention_split_mma_unit<kMmaD, GT, kUnitWarps>(a.q, k, v, a.split, split, y, b, unit_tid, unit_smem,
                                                                   sync, false);
      else
        attention::attention_split_unit<bf16, ScalarSplit::LPK, ScalarSplit::EPL, false, GT, ScalarSplit::KPG,
                                        attention::kThreads>(a.q, k, v, a.split, split, y, b, unit_tid, unit_smem,
                                                             sync, false);
      named_sync(1 + unit);  // the unit's shared memory is reused by the next
    }
    stage(projection(a, layer, kO), s.b);
    end_phase(a, l, 2);
    // 4. attention combine
    for (int u = blockIdx.x; u < m * sh.heads; u += gridDim.x) {
      attention::attention_combine_unit<bf16, false>(a.attn, a.combine, u % sh.heads, u / sh.heads, nullptr, false);
      __syncthreads();
    }
    stage(projection(a, layer, kDown), s.c);
    end_phase(a, l, 3);
    // 5. sub-norm, o + residual (staged: gate|up, o; down may still stream)
    norm_rows<false, kAct>(a.attn, static_cast<const bf16*>(layer.norm[1]), sh.hidden, hid_stride, sh.eps, m, s);
    mark(a, l, 4, 2);
    wait_staged<1>();
    gemv(projection(a, layer, kO), s.b, s, m, x_in, a.h);
    mark(a, l, 4, 3);
    end_phase(a, l, 4);
    // 6. post-attention norm, gate|up; then A takes the next layer's q|k|v
    norm_rows<false, kAct>(a.h, static_cast<const bf16*>(layer.norm[2]), sh.hidden, hid_stride, sh.eps, m, s);
    mark(a, l, 5, 2);
    gemv(projection(a, layer, kGateUp), s.a, s, m, nullptr, a.gate_up);
    mark(a, l, 5, 3);
    if (!last) stage(projection(a, a.layers[l + 1], kQKV), s.a);
    end_phase(a, l, 5);
    // 7. act * up, FFN sub-norm, down + residual (staged: down; the next q|k|v may still stream)
    norm_rows<true, kAct>(a.gate_up, static_cast<const bf16*>(layer.norm[3]), sh.ffn, ffn_stride, sh.eps, m, s);
    mark(a, l, 6, 2);
    if (last) wait_staged<0>();
    else wait_staged<1>();
    gemv(projection(a, layer, kDown), s.c, s, m, a.h, a.x);
    mark(a, l, 6, 3);
    if (!last) end_phase(a, l, 6);
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
}

size_t aligned256(size_t bytes) { return (bytes + 255) / 256 * 256; }

struct Scratch {
  size_t h, qkv, q, attn, gate_up, workspace, total;
};

Scratch scratch_layout(const DecodeShape& s, int m, int splits) {
  const size_t e = sizeof(bf16);
  Scratch r{};
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off += aligned256(bytes);
    return at;
  };
  r.h = take((size_t)m * s.hidden * e);
  r.qkv = take((size_t)m * (s.heads + 2 * s.kv_heads) * s.head_dim * e);
  r.q = take((size_t)m * s.heads * s.head_dim * e);
  r.attn = take((size_t)m * s.heads * s.head_dim * e);
  r.gate_up = take((size_t)m * 2 * s.ffn * e);
  r.workspace = take(decode_attention_workspace_bytes(m, s.heads, s.head_dim, splits));
  r.total = off;
  return r;
}

int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 0;
  return sms;
}

template <int GT, int kMmaD>
size_t smem_bytes(const DecodeShape& s, int m, int grid) {
  return smem_layout(s, m, grid, kUnits * split_smem_floats<GT, kMmaD>(s.head_dim) * (int)sizeof(float)).total;
}

template <int GT, int kMmaD, Activation kAct>
cudaError_t launch(const Args& args, cudaStream_t stream) {
  auto kernel = decode_layers_kernel<GT, kMmaD, kAct>;
  const size_t smem = smem_bytes<GT, kMmaD>(args.shape, args.m, sm_count());
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorCooperativeLaunchTooLarge;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(sm_count());
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeCooperative;  // all blocks resident at once: the grid barrier needs it
  attribute[0].val.cooperative = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args);
}

int split_count(const DecodeShape& s, int m, int cache_slots, int max_len) {
  const KVCacheLayer c{nullptr, nullptr, cache_slots, s.kv_heads, max_len, s.head_dim};
  return decode_attention_splits(m, s.heads, c);  // what the op-by-op step uses: the same partials
}

}  // namespace

const char* decode_layers_unsupported(const DecodeShape& s, int m) {
  if (m < 1 || m > 8) return "batches of 1 to 8 rows only";
  if (s.layers < 1 || s.hidden < 1 || s.ffn < 1 || s.heads < 1 || s.kv_heads < 1 || s.heads % s.kv_heads != 0)
    return "invalid shape";
  if (s.heads * s.head_dim != s.hidden) return "heads * head_dim must equal the hidden size";
  if (s.hidden % 8 != 0 || s.ffn % 8 != 0) return "hidden and intermediate sizes must be multiples of 8";
  if (std::max(s.hidden, s.ffn) > kVecs * kThreads * 8) return "rows too long for the register norm";
  if (attention::heads_per_pass(s.heads / s.kv_heads) != 4) return "only GQA groups of 3 or 4 query heads";
  if (s.head_dim % 2 != 0 || s.head_dim > attention::kMaxHeadDim) return "head_dim must be even and at most 256";
  if (s.head_dim == 64) return "head_dim 64 (decode_attention.cu's vector path for it is not built in)";
  if (s.activation != Activation::kReLU2) return "only the relu^2 MLP";
  const int sms = sm_count();
  if (sms < 1) return "no CUDA device";
  const int widest = std::max((s.heads + 2 * s.kv_heads) * s.head_dim, 2 * s.ffn);
  if (ceil_div(ceil_div(widest, kTileRows), sms) > kMaxTiles) return "projections too tall for this GPU's SM count";
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return "no CUDA device";
  const size_t smem = std::max({smem_bytes<4, 128>(s, 8, sms), smem_bytes<4, 64>(s, 8, sms), smem_bytes<4, 0>(s, 8, sms)});
  if (smem + 2048 > (size_t)optin) return "the weights a block stages do not fit in shared memory";
  return nullptr;
}

int decode_layers_blocks() { return sm_count(); }

size_t decode_layers_scratch_bytes(const DecodeShape& s, int m, int cache_slots, int max_len) {
  return scratch_layout(s, m, split_count(s, m, cache_slots, max_len)).total;
}

cudaError_t decode_layers(const DecodeLayer* layers, const DecodeShape& s, int m, const void* x_in, void* x_out,
                          const int64_t* positions, const int64_t* slots, const float* cos, const float* sin,
                          int table_len, void* k_cache, void* v_cache, int cache_slots, int max_len, void* scratch,
                          unsigned long long* barrier, unsigned long long* timeline, cudaStream_t stream) {
  if (decode_layers_unsupported(s, m) != nullptr) return cudaErrorInvalidValue;
  const int splits = split_count(s, m, cache_slots, max_len);
  const Scratch lay = scratch_layout(s, m, splits);
  char* base = static_cast<char*>(scratch);
  Args a{};
  a.layers = layers;
  a.shape = s;
  a.m = m;
  a.nqkv = (s.heads + 2 * s.kv_heads) * s.head_dim;
  a.x_in = static_cast<const bf16*>(x_in);
  a.x = static_cast<bf16*>(x_out);
  a.positions = positions, a.slots = slots, a.cos = cos, a.sin = sin, a.table_len = table_len;
  a.k_cache = static_cast<bf16*>(k_cache), a.v_cache = static_cast<bf16*>(v_cache);
  a.layer_elems = (size_t)cache_slots * s.kv_heads * max_len * s.head_dim;
  a.cache_slots = cache_slots, a.max_len = max_len;
  a.h = reinterpret_cast<bf16*>(base + lay.h);
  a.qkv = reinterpret_cast<bf16*>(base + lay.qkv);
  a.q = reinterpret_cast<bf16*>(base + lay.q);
  a.attn = reinterpret_cast<bf16*>(base + lay.attn);
  a.gate_up = reinterpret_cast<bf16*>(base + lay.gate_up);
  const attention::Workspace ws = attention::carve(base + lay.workspace, m, s.heads, s.head_dim, splits);
  const int group = s.heads / s.kv_heads, gt = attention::heads_per_pass(group);
  a.split = attention::SplitArgs{slots, positions, s.heads, s.kv_heads, group, ceil_div(group, gt), max_len,
                                 cache_slots, s.head_dim, splits,
                                 static_cast<float>(attention::kLog2e / std::sqrt(static_cast<double>(s.head_dim))),
                                 ws, false};
  a.combine = attention::CombineArgs{slots, positions, s.heads, max_len, cache_slots, s.head_dim, splits, ws,
                                     nullptr, 0.0f, 0, nullptr, nullptr};
  a.barrier = barrier;
  a.timeline = timeline;
  // decode_attention.cu's choice of split kernel, so the partials are the same
  const bool mma = attention::mma_split_applies(a.q, k_cache, v_cache, s.head_dim);
  if (mma && s.head_dim == 128) return launch<4, 128, Activation::kReLU2>(a, stream);
  if (mma) return launch<4, 64, Activation::kReLU2>(a, stream);
  return launch<4, 0, Activation::kReLU2>(a, stream);
}

}  // namespace bitnet
