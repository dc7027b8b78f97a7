// W2A8 GEMM for many tokens (prefill): int8 activations x 2-bit ternary weights on the int8 tensor
// cores, exact int32 dot products, the same tiled weights and padded activation rows as the small-M
// kernel of w2a8_gemm.cu (whose header describes the layout).
//
// Math, as in the small-M kernel: mma.m16n8k32 s8 with A = weight codes c = w + 1 in {0, 1, 2}
// (16 rows x 32 inputs: one word of the tiled layout, shifted and masked into a0..a3) and
// B = activations (8 tokens x 32 inputs: lane (g, q)'s b0, b1 of k-step s are bytes 32q + 8s .. + 7
// of token g's chunk, thanks to the layout's k permutation). sum_k w * x = sum_k c * x - sum_k x,
// so the block also sums each token's activations (dp4a) and subtracts once in the epilogue.
// Both operands land in MMA registers with no moves: a0..a3 are written by the decode, b0, b1 are
// two adjacent words of a 16-byte shared load.
//
// Block tile: kTokens x kRows outputs, K in chunks of 128. Each chunk's activations (kTokens x 128
// bytes) and weights (kRows / 16 tiles of 512 bytes) go to shared memory with cp.async, kStages
// chunks in flight, so every activation byte comes from L2 once per block tile. Warps own
// 64 x 64 (or 32 x 64) sub-tiles and read their operands with 16-byte shared loads; activation rows
// store their eight 16-byte pieces in the order piece ^ (row & 1), so the 8 lanes of each quarter
// warp (rows g, g + 1 of one parity each, pieces 2q + h) hit 32 distinct banks.
// Out-of-range tokens and weight tiles are zero-filled by cp.async (their outputs are not written);
// inputs past k are zeros in x and code 1 (weight 0) in the weights: they add nothing.
//
// Epilogue, from registers: a lane holds rows g, g + 8 x tokens 2q, 2q + 1 of each MMA tile. Token
// sums by shuffles; then two tokens at a time: residual loads first, acc * scale / x_scale with an
// exact division that keeps the reciprocal per token (fast_divide), one rounding, direct stores.
//
// Split K over a thread-block cluster (gridDim.z = cluster size, 2-4): a problem of few block tiles
// (o and down at 512 tokens: 40 tiles of 128 x 256 for 132 SMs) gives each tile's chunks to the
// blocks of a cluster. Each block stages its exact int32 partials in its own shared memory, then the
// block whose rank is warp % splits adds the other blocks' partials of that warp's sub-tile through
// distributed shared memory and runs the epilogue for it: integer sums, so any split is bit-exact.
//
// PDL: the weights of the first stages are requested before waiting for the previous kernel
// (whose output is x); the activations, x_scale and the residual are read after the wait.

#include <cuda_bf16.h>

#include <mutex>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "gemm_common.cuh"
#include "kernels.h"
#include "launch.cuh"

namespace bitnet {
namespace {

constexpr int kPieces = kChunkK / 16;  // 16-byte pieces per activation row of a chunk
constexpr int kTileBytes = 512;        // one 16-row x 128-input weight tile

// A block tile shape: kTokens x kRows outputs, warps arranged WarpsM (tokens) x kWarpsN (rows).
template <int Tokens, int Rows, int WarpsM, int WarpsN, int Stages, int MinBlocks>
struct Tile {
  static constexpr int kTokens = Tokens, kRows = Rows, kWarpsN = WarpsN;
  static constexpr int kStages = Stages, kMinBlocks = MinBlocks;
  static constexpr int kThreads = 32 * WarpsM * WarpsN;
  static constexpr int kWarpTokens = Tokens / WarpsM, kWarpRows = Rows / WarpsN;
  static constexpr int kRowTiles = kWarpRows / kTileRows;  // MMA m-tiles per warp (16 rows each)
  static constexpr int kTokenGroups = kWarpTokens / 8;     // MMA n-tiles per warp (8 tokens each)
  static constexpr int kStageX = Tokens * kChunkK;              // bytes of activations per stage
  static constexpr int kStageW = Rows / kTileRows * kTileBytes;  // bytes of weights per stage
  static constexpr int kSmem = Stages * (kStageX + kStageW);
  static constexpr int kAccPerLane = kRowTiles * kTokenGroups * 4;       // int32 accumulators per lane
  static constexpr int kPartialBytes = kThreads * kAccPerLane * 4;        // a block's partials (split K)
  static constexpr int kSmemSplit = kSmem > kPartialBytes ? kSmem : kPartialBytes;
  // cp.async work per thread and stage: whole rows of 8 pieces, whole tiles of 32 pieces
  static constexpr int kLoadsX = Tokens * kPieces / kThreads, kLoadsW = kStageW / 16 / kThreads;
  static_assert(kWarpTokens % 8 == 0 && kWarpRows % kTileRows == 0, "warp tiles are whole MMA tiles");
  static_assert(kLoadsX * kThreads == Tokens * kPieces && kLoadsW * kThreads * 16 == kStageW, "even cp.async split");
  static_assert((kThreads / kPieces) % 2 == 0, "a thread's activation rows share one parity (one swizzle)");
};

// The shapes w2a8_gemm_large can run (GemmConfig::large_tile = index + 1). 128 x 256 moves the
// fewest L2 bytes per MMA (weights are 4x cheaper than activations per element), but on an H100 the
// 64 x 128 tile, three blocks per SM, is the fastest on every 2B-4T shape (kTileEfficiency).
using TileWide = Tile<128, 256, 2, 4, 4, 1>;    // 8 warps of 64 x 64, 96 KB, 1 block / SM
using TileSquare = Tile<128, 128, 2, 2, 4, 2>;  // 4 warps of 64 x 64, 80 KB, 2 blocks / SM
using TileSmall = Tile<64, 128, 2, 2, 4, 3>;    // 4 warps of 32 x 64, 48 KB, 3 blocks / SM
constexpr int kTileCount = 3;

__device__ __forceinline__ void cp_async_16(uint32_t smem_dst, const void* global_src, bool fill) {
  // src-size 0 reads nothing and writes 16 zero bytes
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst),
               "l"(__cvta_generic_to_global(global_src)), "r"(fill ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

// Thread-block cluster (sm_90+; never launched split elsewhere): barrier (the arrive releases this
// thread's shared writes, the wait acquires the others') and loads from a peer block's shared
// memory at the address of ours.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory"); }
__device__ __forceinline__ uint4 load_peer_shared(uint32_t local_addr, int rank) {
  uint32_t peer;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(peer) : "r"(local_addr), "r"(rank));
  uint4 v;
  asm volatile("ld.shared::cluster.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(peer)
               : "memory");
  return v;
}
#else
__device__ __forceinline__ void cluster_arrive() { __trap(); }
__device__ __forceinline__ void cluster_wait() { __trap(); }
__device__ __forceinline__ uint4 load_peer_shared(uint32_t, int) { __trap(); return {}; }
#endif

// IEEE division a / b (what __fdiv_rn returns) without a reciprocal per element. The sequence is
// the fast path ptxas expands div.rn.f32 into: r = rcp.approx(b) refined by one Newton step, then
// q = a * r, e = fma(-b, q, a) (exact), q + e * r. It is correctly rounded for any r0 within an ulp
// of 1 / b as long as nothing overflows or underflows, which ptxas checks per division (FCHK) and
// the epilogue checks per group of outputs: b and |a| within 2^-60 .. 2^60 (zero excluded) keep
// every intermediate and the quotient normal. Any other group takes __fdiv_rn.
__device__ __forceinline__ float division_reciprocal(float b) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
  return __fmaf_rn(r, __fmaf_rn(-b, r, 1.0f), r);
}
__device__ __forceinline__ bool in_fast_division_range(float smallest, float largest) {
  return (smallest >= 0x1p-60f) & (largest <= 0x1p60f);  // bitwise: no short-circuit branch
}
__device__ __forceinline__ float fast_divide(float a, float b, float r) {
  const float q = __fmul_rn(a, r);
  return __fmaf_rn(r, __fmaf_rn(-b, q, a), q);
}

// This thread's share of a stage's cp.async copies; the sources move by one chunk per stage.
template <class T>
struct StageLoader {
  const int8_t* x_src;  // first activation piece, chunk 0
  size_t x_step;        // between the thread's activation rows (kThreads / 8 rows apart)
  uint32_t x_dst;       // shared offset in a stage
  uint32_t x_inside;    // bit i: the i-th row is a token < m
  const uint4* w_src;   // first weight piece, chunk 0
  size_t w_step;        // between the thread's weight tiles (kThreads / 32 tiles apart)
  uint32_t w_inside;    // bit i: the i-th tile exists

  __device__ StageLoader(const int8_t* x_q, int m, int k_stride, int tok0, const uint4* w, int ntiles, int nchunks,
                         int tile0) {
    const int row = threadIdx.x / kPieces, piece = threadIdx.x % kPieces;
    x_src = x_q + (size_t)(tok0 + row) * k_stride + 16 * piece;
    x_step = (size_t)(T::kThreads / kPieces) * k_stride;
    x_dst = row * kChunkK + 16 * (piece ^ (row & 1));
    x_inside = 0;
#pragma unroll
    for (int i = 0; i < T::kLoadsX; ++i) x_inside |= (tok0 + row + i * (T::kThreads / kPieces) < m) << i;
    const int tile = tile0 + threadIdx.x / 32;
    w_src = w + (size_t)tile * nchunks * 32 + threadIdx.x % 32;
    w_step = (size_t)(T::kThreads / 32) * nchunks * 32;
    w_inside = 0;
#pragma unroll
    for (int i = 0; i < T::kLoadsW; ++i) w_inside |= (tile + i * (T::kThreads / 32) < ntiles) << i;
  }

  // shared addresses of the stage; out-of-range pieces are zero-filled from a valid address
  __device__ __forceinline__ void weights(uint32_t stage_w, int chunk, const uint4* w) const {
#pragma unroll
    for (int i = 0; i < T::kLoadsW; ++i) {
      const bool inside = (w_inside >> i) & 1;
      cp_async_16(stage_w + 16 * (i * T::kThreads + threadIdx.x), inside ? w_src + i * w_step + chunk * 32 : w,
                  inside);
    }
  }
  __device__ __forceinline__ void activations(uint32_t stage_x, int chunk, const int8_t* x_q) const {
#pragma unroll
    for (int i = 0; i < T::kLoadsX; ++i) {
      const bool inside = (x_inside >> i) & 1;
      cp_async_16(stage_x + x_dst + i * (T::kThreads / kPieces) * kChunkK,
                  inside ? x_src + i * x_step + chunk * kChunkK : x_q, inside);
    }
  }
};

template <class T, typename Out>
__global__ void __launch_bounds__(T::kThreads, T::kMinBlocks)
    large_gemm_kernel(const int8_t* __restrict__ x_q, const float* __restrict__ x_scale, int m, int k_stride,
                      const uint4* __restrict__ w, int n, int ntiles, int nchunks, Segments seg,
                      const Out* __restrict__ residual, Out* __restrict__ out) {
  constexpr int RT = T::kRowTiles, TG = T::kTokenGroups, S = T::kStages;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* const stage_x = smem;                   // [S][kTokens][128], pieces swizzled
  uint8_t* const stage_w = smem + S * T::kStageX;  // [S][kRows / 16][32 lanes][16]
  const uint32_t stage_x_addr = static_cast<uint32_t>(__cvta_generic_to_shared(stage_x));
  const uint32_t stage_w_addr = static_cast<uint32_t>(__cvta_generic_to_shared(stage_w));

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int wm = warp / T::kWarpsN, wn = warp % T::kWarpsN;
  const int tok0 = blockIdx.y * T::kTokens;
  const int tile0 = blockIdx.x * (T::kRows / kTileRows);
  const StageLoader<T> loader(x_q, m, k_stride, tok0, w, ntiles, nchunks, tile0);
  // this block's chunks: all of them, or its share of a split (blockIdx.z = rank in the cluster)
  const int splits = gridDim.z, split = blockIdx.z;
  const int c_begin = (int)((long long)nchunks * split / splits);
  const int c_end = (int)((long long)nchunks * (split + 1) / splits);

  allow_next_kernel();
  // prologue: the weights of the first S - 1 chunks do not depend on the previous kernel
#pragma unroll
  for (int s = 0; s < S - 1; ++s)
    if (c_begin + s < c_end) loader.weights(stage_w_addr + s * T::kStageW, c_begin + s, w);
  wait_for_previous_kernel();
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (c_begin + s < c_end) loader.activations(stage_x_addr + s * T::kStageX, c_begin + s, x_q);
    cp_async_commit();  // group s: chunk s (group 0 also holds all prologue weights)
  }

  int acc[RT][TG][4];  // [row tile][token group]: rows g, g + 8 x tokens 2q, 2q + 1
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int j = 0; j < TG; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][j][e] = 0;
  int xsum[TG];  // this lane's part of the activation sum of token g of group j
#pragma unroll
  for (int j = 0; j < TG; ++j) xsum[j] = 0;

  int read_slot = 0, write_slot = S - 1;
  for (int c = c_begin; c < c_end; ++c) {
    cp_async_wait<S - 2>();  // chunk c has landed (for this thread) ...
    __syncthreads();         // ... for every thread, and everyone is done with chunk c - 1's slot
    const int next = c + S - 1;
    if (next < c_end) {
      loader.weights(stage_w_addr + write_slot * T::kStageW, next, w);
      loader.activations(stage_x_addr + write_slot * T::kStageX, next, x_q);
    }
    cp_async_commit();  // possibly empty: keeps one group per chunk
    write_slot = write_slot == S - 1 ? 0 : write_slot + 1;

    const uint8_t* x_tile = stage_x + read_slot * T::kStageX + (wm * T::kWarpTokens + g) * kChunkK;
    const uint4* w_tile = reinterpret_cast<const uint4*>(stage_w + read_slot * T::kStageW) + wn * RT * 32 + lane;
    read_slot = read_slot == S - 1 ? 0 : read_slot + 1;

    uint32_t wv[RT][4];  // word s: the A operands of k-step s
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const uint4 v = w_tile[r * 32];
      wv[r][0] = v.x, wv[r][1] = v.y, wv[r][2] = v.z, wv[r][3] = v.w;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // halves of token g's 32 bytes: k-steps 2h, 2h + 1
      uint32_t xb[TG][4];
#pragma unroll
      for (int j = 0; j < TG; ++j) {
        const uint4 v = *reinterpret_cast<const uint4*>(x_tile + 8 * j * kChunkK + 16 * ((2 * q + h) ^ (g & 1)));
        xb[j][0] = v.x, xb[j][1] = v.y, xb[j][2] = v.z, xb[j][3] = v.w;
      }
      // every warp sums its own tokens: branch-free, cheaper than splitting the sums between warps
#pragma unroll
      for (int j = 0; j < TG; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) xsum[j] = __dp4a(static_cast<int>(xb[j][i]), 0x01010101, xsum[j]);
#pragma unroll
      for (int ss = 0; ss < 2; ++ss) {
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          const TernaryA a = ternary_a(wv[r][2 * h + ss]);
#pragma unroll
          for (int j = 0; j < TG; ++j) mma_ternary(acc[r][j], a, xb[j][2 * ss], xb[j][2 * ss + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();  // only empty groups remain; nothing may be in flight at exit

  // token sums: lanes 4g .. 4g+3 hold the parts of token g; this lane needs tokens 2q and 2q + 1.
  // Subtracted now: acc becomes sum_k w * x over this block's chunks.
#pragma unroll
  for (int j = 0; j < TG; ++j) {
    xsum[j] += __shfl_xor_sync(0xffffffffu, xsum[j], 1);
    xsum[j] += __shfl_xor_sync(0xffffffffu, xsum[j], 2);
    const int token_sum[2] = {__shfl_sync(0xffffffffu, xsum[j], 8 * q), __shfl_sync(0xffffffffu, xsum[j], 8 * q + 4)};
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      unscale_rows(acc[r][j]);
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][j][e] -= token_sum[e & 1];
    }
  }

  if (splits > 1) {  // add the cluster's partials; this block finishes the warps of its rank
    static_assert(T::kAccPerLane % 4 == 0, "partials move as 16-byte vectors");
    int* flat = &acc[0][0][0];
    __syncthreads();  // every warp is done reading the stage buffers that the partials overwrite
    // [kAccPerLane / 4][kThreads] 16-byte vectors: a warp's loads and stores are contiguous
    uint4* staged = reinterpret_cast<uint4*>(smem) + threadIdx.x;
#pragma unroll
    for (int i = 0; i < T::kAccPerLane / 4; ++i)
      staged[i * T::kThreads] = make_uint4(flat[4 * i], flat[4 * i + 1], flat[4 * i + 2], flat[4 * i + 3]);
    cluster_arrive();
    cluster_wait();
    const bool mine = warp % splits == split;
    if (mine) {
      const uint32_t staged_addr = static_cast<uint32_t>(__cvta_generic_to_shared(staged));
      for (int peer = 0; peer < splits; ++peer) {
        if (peer == split) continue;
#pragma unroll
        for (int i = 0; i < T::kAccPerLane / 4; ++i) {
          const uint4 v = load_peer_shared(staged_addr + 16 * i * T::kThreads, peer);
          flat[4 * i] += (int)v.x, flat[4 * i + 1] += (int)v.y, flat[4 * i + 2] += (int)v.z, flat[4 * i + 3] += (int)v.w;
        }
      }
    }
    cluster_arrive();  // done reading the peers' shared memory; they may exit once all have arrived
    if (!mine) {
      cluster_wait();
      return;
    }
  }

  // acc[r][j][2e + t]: row 16r + 8e + g, token 8j + 2q + t of the warp tile
  const int row0 = blockIdx.x * T::kRows + wn * T::kWarpRows + g;
  const int tok_lane = tok0 + wm * T::kWarpTokens + 2 * q;
  if constexpr (std::is_same_v<Out, int>) {
#pragma unroll
    for (int j = 0; j < TG; ++j)
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int tok = tok_lane + 8 * j + t;
        if (tok >= m) continue;
#pragma unroll
        for (int r = 0; r < RT; ++r)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int row = row0 + 16 * r + 8 * e;
            if (row < n) out[(size_t)tok * n + row] = acc[r][j][2 * e + t];
          }
      }
  } else {
    float row_scale[RT][2];
    bool row_inside[RT][2];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        row_scale[r][e] = segment_scale(seg, row0 + 16 * r + 8 * e);
        row_inside[r][e] = row0 + 16 * r + 8 * e < n;
      }
#pragma unroll
    for (int j = 0; j < TG; ++j) {  // two tokens per lane at a time: all their loads first, then the math
      float xs[2], rcp[2], res[2][RT][2], y[2][RT][2];
      float smallest = 0x1p127f, largest = 0.0f;  // of the divisors and |dividends|: the fast path's range
      bool tok_inside[2];
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int tok = tok_lane + 8 * j + t;
        tok_inside[t] = tok < m;
        // through L2 (launch.cuh); lanes past m compute (and never store) a real row
        xs[t] = __ldcg(x_scale + (tok_inside[t] ? tok : m - 1));
        rcp[t] = division_reciprocal(xs[t]);
        smallest = fminf(smallest, xs[t]);
        largest = fmaxf(largest, xs[t]);
        const Out* res_row = residual + (size_t)tok * n + row0;
#pragma unroll
        for (int r = 0; r < RT; ++r)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            res[t][r][e] = residual != nullptr && tok_inside[t] && row_inside[r][e] ? to_float(ldcg_ordered(res_row + 16 * r + 8 * e)) : 0.0f;
            // the reference: (acc * w_scale) / x_scale (+ residual), each step IEEE-rounded fp32
            y[t][r][e] = __fmul_rn(static_cast<float>(acc[r][j][2 * e + t]), row_scale[r][e]);
            smallest = fminf(smallest, fabsf(y[t][r][e]));
            largest = fmaxf(largest, fabsf(y[t][r][e]));
          }
      }
      if (__all_sync(0xffffffffu, in_fast_division_range(smallest, largest))) {  // one path for the warp
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int r = 0; r < RT; ++r)
#pragma unroll
            for (int e = 0; e < 2; ++e) y[t][r][e] = fast_divide(y[t][r][e], xs[t], rcp[t]);
      } else {
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int r = 0; r < RT; ++r)
#pragma unroll
            for (int e = 0; e < 2; ++e) y[t][r][e] = __fdiv_rn(y[t][r][e], xs[t]);
      }
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        Out* out_row = out + (size_t)(tok_lane + 8 * j + t) * n + row0;
#pragma unroll
        for (int r = 0; r < RT; ++r)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float v = residual != nullptr ? __fadd_rn(y[t][r][e], res[t][r][e]) : y[t][r][e];
            if (tok_inside[t] && row_inside[r][e]) out_row[16 * r + 8 * e] = from_float<Out>(v);
          }
      }
    }
  }
  if (splits > 1) cluster_wait();  // no block leaves while a peer may still read its partials
}

template <class T, typename Out>
cudaError_t launch(const int8_t* x_q, const float* x_scale, int m, const uint32_t* tiled, int n, int k,
                   const Segments& seg, const void* residual, void* out, int splits, cudaStream_t stream) {
  const int ntiles = ceil_div(n, kTileRows), nchunks = ceil_div(k, kChunkK);
  const dim3 grid(ceil_div(n, T::kRows), ceil_div(m, T::kTokens), splits);
  return launch_pdl_cluster(large_gemm_kernel<T, Out>, grid, dim3(T::kThreads), splits > 1 ? T::kSmemSplit : T::kSmem,
                            stream, dim3(1, 1, splits), m, x_q, x_scale, m, nchunks * kChunkK,
                            reinterpret_cast<const uint4*>(tiled), n, ntiles, nchunks, seg,
                            static_cast<const Out*>(residual), static_cast<Out*>(out));
}

constexpr int kMaxDevices = 64;

// Blocks of this kernel resident at once on the whole GPU: alone (splits = 1: SMs x blocks per SM)
// or in clusters of `splits` blocks (what fits the GPCs); 0 where the tile or the cluster does not
// fit (no clusters before sm_90). Also raises the kernel's dynamic shared memory limit past the
// default 48 KB (no stream work: capture-safe).
template <class T, typename Out>
int resident_blocks(int device, int sms, int splits) {
  const auto kernel = large_gemm_kernel<T, Out>;
  int resident = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemSplit) != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it, the tile is just unavailable
    return 0;
  }
  if (splits == 1) {
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, T::kThreads, T::kSmem) == cudaSuccess)
      resident = per_sm * sms;
  } else {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(1, 1, splits);
    config.blockDim = dim3(T::kThreads);
    config.dynamicSmemBytes = T::kSmemSplit;
    cudaLaunchAttribute cluster[1];
    cluster[0].id = cudaLaunchAttributeClusterDimension;
    cluster[0].val.clusterDim.x = 1, cluster[0].val.clusterDim.y = 1, cluster[0].val.clusterDim.z = splits;
    config.attrs = cluster;
    config.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess) resident = clusters * splits;
  }
  if (resident <= 0) cudaGetLastError();
  return resident > 0 ? resident : 0;
}

// What the choice of tile and split needs to know of a GPU.
struct Residency {
  int resident[kTileCount][kMaxSplits + 1];  // [tile - 1][splits]: blocks resident at once, 0 unavailable
  int per_sm[kTileCount];                    // blocks of the tile per SM, alone
};

template <class T, typename Out>
void measure_tile(int device, int sms, int (&resident)[kMaxSplits + 1], int& per_sm) {
  resident[0] = 0;
  for (int s = 1; s <= kMaxSplits; ++s) resident[s] = resident_blocks<T, Out>(device, sms, s);
  per_sm = resident[1] / sms;
}

template <typename Out>
Residency measure(int device) {
  Residency r{};
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    cudaGetLastError();
    return r;  // nothing available: the caller reports it
  }
  measure_tile<TileWide, Out>(device, sms, r.resident[0], r.per_sm[0]);
  measure_tile<TileSquare, Out>(device, sms, r.resident[1], r.per_sm[1]);
  measure_tile<TileSmall, Out>(device, sms, r.resident[2], r.per_sm[2]);
  return r;
}

// Measured once per device (and output type): the launches that follow read a table, where asking
// again would cost each of them 12 queries, 9 of them failing on a GPU without clusters.
template <typename Out>
Residency residency(int device) {
  if (device < 0 || device >= kMaxDevices) return measure<Out>(device);
  static std::once_flag once[kMaxDevices];
  static Residency table[kMaxDevices];
  std::call_once(once[device], [device] { table[device] = measure<Out>(device); });
  return table[device];
}

// Relative throughput of each tile shape when an SM holds at least 8 warps, fitted to H100 sweeps
// (bench/kernels.py --prefill-only --sweep): at 2,048 tokens, where waves are many, three 64 x 128
// blocks per SM beat one 128 x 256 block by 1.09-1.17x and two 128 x 128 blocks by 1.08-1.12x,
// although their warps decode twice the weights per MMA: 12 warps hide more latency than 8.
constexpr double kTileEfficiency[kTileCount] = {0.89, 0.93, 1.0};
constexpr double kFewWarpsEfficiency = 0.75;  // under 8 warps per SM: one warp per scheduler hides little
// A block's fixed costs in units of one chunk's main-loop time: filling the pipeline and the
// epilogue; and, per peer of a split, staging and adding partials through the cluster (fitted to
// the same sweeps: splits of 2 pay at 512 tokens for o and down and at 1,024 for down, 3 and 4 nowhere)
constexpr double kBlockOverheadChunks = 2.0;
constexpr double kSplitOverheadChunks = 2.0;

struct TileShape {
  int tokens, rows, warps;
};
constexpr TileShape kShapes[kTileCount] = {{TileWide::kTokens, TileWide::kRows, TileWide::kThreads / 32},
                                           {TileSquare::kTokens, TileSquare::kRows, TileSquare::kThreads / 32},
                                           {TileSmall::kTokens, TileSmall::kRows, TileSmall::kThreads / 32}};

struct Choice {
  int tile, splits;  // tile 0: none fits
};

// The least estimated time = blocks on the busiest SM x work per block / efficiency. Wave
// quantization dominates the choice (2560 rows x 2048 tokens is 160 wide tiles on 132 SMs), and few
// tiles (2560 rows x 512 tokens: 40) leave SMs idle unless K is split.
// resident[t][s]: blocks of tile t + 1 resident on the GPU in clusters of s (0: unavailable);
// forced_tile / forced_splits: 0 to choose.
Choice choose(int m, int n, int nchunks, const int (&resident)[kTileCount][kMaxSplits + 1],
              const int (&per_sm)[kTileCount], int forced_tile, int forced_splits) {
  Choice best{0, 1};
  double best_cost = 0;
  for (int t = 0; t < kTileCount; ++t) {
    if (forced_tile != 0 && forced_tile != t + 1) continue;
    for (int s = 1; s <= kMaxSplits; ++s) {
      if ((forced_splits != 0 && forced_splits != s) || (forced_splits == 0 && s > nchunks)) continue;
      if (resident[t][s] < 1 || per_sm[t] < 1) continue;
      const TileShape& shape = kShapes[t];
      const long long blocks = (long long)ceil_div(m, shape.tokens) * ceil_div(n, shape.rows) * s;
      const double sms = (double)resident[t][s] / per_sm[t];  // SMs that clusters of s can use
      const long long busiest = (long long)std::ceil(blocks / sms);
      const long long concurrent = busiest < per_sm[t] ? busiest : per_sm[t];
      const double efficiency = kTileEfficiency[t] * (concurrent * shape.warps >= 8 ? 1.0 : kFewWarpsEfficiency);
      const double chunks = ceil_div(nchunks, s) + kBlockOverheadChunks + (s - 1) * kSplitOverheadChunks;
      const double cost = (double)busiest * shape.tokens * shape.rows * chunks / efficiency;
      if (best.tile == 0 || cost < best_cost) best = {t + 1, s}, best_cost = cost;
    }
  }
  return best;
}

template <typename Out>
cudaError_t dispatch(const int8_t* x_q, const float* x_scale, int m, const uint32_t* tiled, int n, int k,
                     const Segments& seg, const void* residual, void* out, int tile, int splits,
                     cudaStream_t stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const Residency r = residency<Out>(device);
  const Choice choice = choose(m, n, ceil_div(k, kChunkK), r.resident, r.per_sm, tile, splits);
  if (choice.tile == 0) return cudaErrorInvalidConfiguration;  // no tile (or cluster) fits this GPU
  switch (choice.tile) {
    case 1: return launch<TileWide, Out>(x_q, x_scale, m, tiled, n, k, seg, residual, out, choice.splits, stream);
    case 2: return launch<TileSquare, Out>(x_q, x_scale, m, tiled, n, k, seg, residual, out, choice.splits, stream);
    case 3: return launch<TileSmall, Out>(x_q, x_scale, m, tiled, n, k, seg, residual, out, choice.splits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t w2a8_gemm_large(const int8_t* x_q, const float* x_scale, int m, const uint32_t* tiled, int n, int k,
                            const Segments& segments, const void* residual, void* out, DType out_dtype, int tile,
                            int splits, cudaStream_t stream) {
  if (m <= 0 || n <= 0 || k <= 0 || segments.count < 1 || segments.count > kMaxSegments || tile < 0 ||
      tile > kTileCount || splits < 0 || splits > kMaxSplits)
    return cudaErrorInvalidValue;
  switch (out_dtype) {
    case DType::kInt32:
      return dispatch<int>(x_q, x_scale, m, tiled, n, k, segments, residual, out, tile, splits, stream);
    case DType::kFloat32:
      return dispatch<float>(x_q, x_scale, m, tiled, n, k, segments, residual, out, tile, splits, stream);
    case DType::kBFloat16:
      return dispatch<__nv_bfloat16>(x_q, x_scale, m, tiled, n, k, segments, residual, out, tile, splits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace bitnet
