// W2A8 GEMV / small-M GEMM: int8 activations x 2-bit ternary weights on the int8 tensor cores.
//
// Math: each weight is stored as the code c = w + 1 in {0, 1, 2}. mma.m16n8k32 (s8 x s8 -> s32)
// accumulates sum_k c * x exactly, and sum_k w * x = sum_k c * x - sum_k x, so the kernel also sums
// the activations (dp4a against 0x01010101) and subtracts once in the epilogue. No decode beyond
// masks and one shift per tile word: word & 0x03030303 is directly an A-operand register
// (gemm_common.cuh ternary_a).
//
// Tiled weight layout (built on the GPU by repack_ternary from the checkpoint's canonical packing):
// for row tile t (output rows 16t .. 16t+15), chunk c (inputs 128c .. 128c+127) and lane L of a
// warp (g = L / 4, q = L % 4), 16 bytes = 4 words; in word s, byte b, bits 2u .. 2u+1 hold the code of
//     row 16t + g + 8 * (u & 1),   input 128c + 32q + 8s + 4 * (u >> 1) + b.
// u is the A register index of the MMA fragment (rows g / g+8, k = 4q+b / 16+4q+b), s the k-step.
// The k order inside a chunk is permuted so that lane q's B fragments for all four k-steps are the
// 32 contiguous activation bytes 128c + 32q .. 128c + 32q + 31: activations are read straight from
// global memory (L2) with two 16-byte loads, no shared-memory staging, no layout change.
// A warp reads one 512-byte tile per chunk: fully coalesced.
//
// Parallelism: a block owns RT row tiles and 8 * NT tokens; its warps split the chunks (K) between
// them, each issuing all the loads of U chunks before the first MMA, then the partial int32
// sums are added in shared memory (exact, order-free) and the epilogue writes the outputs.
// On Hopper the first weight loads are issued before waiting for the previous kernel (whose output
// is this kernel's input), so HBM latency and the launch overlap the previous kernel's tail; right
// after the wait the epilogue's x_scale and residual are loaded beside the activations.
//
// RoPE epilogue (w2a8_gemm_rope_kv, the q|k|v projection): a block takes two row tiles half a head
// apart, so each thread holds both rows i and i + head_dim/2 that RoPE rotates together; it rounds
// them to the dtype as the plain epilogue would, rotates q and k (rope_kv.cuh's math) and writes q,
// and k and v into the KV cache, in place of a separate launch that would read q|k|v back.

#include <cuda_bf16.h>

#include <type_traits>

#include "gemm_common.cuh"
#include "kernels.h"
#include "launch.cuh"

namespace bitnet {
namespace {

// Above this many tokens w2a8_gemm runs the shared-memory tiled kernel of w2a8_gemm_large.cu
// (prefill); at or below, this one (decode). Tune with bench/kernels.py --sweep (its crossover rows).
constexpr int kLargeMThreshold = 64;
constexpr uint32_t kZeroCodes = 0x55555555u;  // every 2-bit field = 1: weight 0 (padding)

__global__ void repack_kernel(const uint8_t* __restrict__ canonical, int n, int k, int nchunks,
                              uint32_t* __restrict__ tiled, long long total_words, int* invalid) {
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total_words) return;
  const int s = idx & 3, lane = (idx >> 2) & 31;
  const long long tile_chunk = idx >> 7;
  const int c = tile_chunk % nchunks, t = tile_chunk / nchunks;
  const int g = lane >> 2, q = lane & 3;
  const int row_bytes = (k + 3) / 4;
  uint32_t word = 0;
  int bad = 0;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int row = t * kTileRows + g + 8 * (u & 1);
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int col = c * kChunkK + 32 * q + 8 * s + 4 * (u >> 1) + b;
      uint32_t code = 1;
      if (row < n && col < k) {
        code = (canonical[(size_t)row * row_bytes + (col >> 2)] >> (2 * (col & 3))) & 3u;
        bad |= code == 3;
      }
      word |= code << (8 * b + 2 * u);
    }
  }
  tiled[idx] = word;
  if (bad) atomicExch(invalid, 1);
}

// What the RoPE epilogue needs of one (row pair, token), read before the dependency wait (positions,
// slots and the tables predate the step's kernels: launch.cuh) and kept in shared memory until the end.
struct RopeInput {
  float c, s;     // cos and sin at the token's position (0 where the row pair is not rotated)
  int pos, slot;  // pos -1: the position or slot lies outside the cache or the tables
};

// kTwoPerSm: blocks of up to 12 warps, two of which must fit on an SM (at most 80 registers). The
// launches of two row tiles and one token group take it: at 82 registers, where ternary_a left that
// kernel with the usual bound, the 3B q|k|v and gate|up at M = 1 took 5.04 and 10.29 us on an H100
// against 3.24 and 8.20. The others keep a bound of 512 threads and no block count (0: an explicit 1
// made ptxas give most instances more registers).
template <int RT, int NT, int U, typename Out, bool kRope, bool kTwoPerSm>
__global__ void __launch_bounds__(kTwoPerSm ? 384 : 512, kTwoPerSm ? 2 : 0)
    gemm_kernel(const int8_t* __restrict__ x_q, const float* __restrict__ x_scale, int m, int k_stride,
                const uint4* __restrict__ w, int n, int ntiles, int nchunks, Segments seg,
                const Out* __restrict__ residual, Out* __restrict__ out, RopeKV rope) {
  static_assert(!kRope || RT == 2, "the RoPE epilogue pairs a block's two row tiles");
  extern __shared__ int smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  // The block's row tile r: RT consecutive tiles, or with kRope two tiles half a head apart (rows i
  // and i + head_dim/2 of one head at the same accumulator index of acc[0] and acc[1])
  const int pair_tiles = kRope ? rope.cache.head_dim / (2 * kTileRows) : 1;
  const int tile0 = kRope ? blockIdx.x / pair_tiles * 2 * pair_tiles + blockIdx.x % pair_tiles : blockIdx.x * RT;
  const int tile_step = kRope ? pair_tiles : 1;
  const int tok0 = blockIdx.y * 8 * NT;

  int acc[RT][NT][4];
  int xsum[NT];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][t][i] = 0;
#pragma unroll
  for (int t = 0; t < NT; ++t) xsum[t] = 0;

  constexpr int kPerBlock = RT * NT * 128;  // accumulator ints per warp
  // Output element e of the block (e = ((r * NT + t) * 32 + lane) * 4 + i, the MMA fragment order):
  // its row and token.
  auto element = [&](int e, int& row, int& tok) {
    const int i = e & 3, ln = (e >> 2) & 31, rt = e >> 7;
    row = (tile0 + rt / NT * tile_step) * kTileRows + (ln >> 2) + 8 * (i >> 1);
    tok = tok0 + 8 * (rt % NT) + 2 * (ln & 3) + (i & 1);
  };
  // The epilogue's other inputs from earlier kernels (x_scale, residual) for this thread's first
  // kEarly elements are loaded right after the dependency wait, beside the activations, rather than
  // in one more dependent round trip to L2 after the reduction (graph step -29 us at batch 1 on an
  // H100). One element: the default launches have at least as many threads as elements (the rest
  // load late), and more registers would cost the 12-warp RT = 2 launch its second block per SM.
  // None where the kernel already uses all 128 registers (RT * NT = 4): even the x_scale alone
  // there made the step 23 us slower.
  constexpr int kEarly = RT * NT <= 2 ? 1 : 0;
  float early_xs[kEarly > 0 ? kEarly : 1], early_res[kEarly > 0 ? kEarly : 1];
  // x_scale and residual of element e (1 and 0 where it has none: an int32 output, or outside the matrix)
  auto load_epilogue_inputs = [&](int e, float& xs, float& res) {
    xs = 1.0f, res = 0.0f;
    if constexpr (!std::is_same_v<Out, int>) {
      int row, tok;
      element(e, row, tok);
      if (e < kPerBlock && row < n && tok < m) {
        xs = __ldcg(x_scale + tok);
        if (residual != nullptr) res = to_float(ldcg_ordered(residual + (size_t)tok * n + row));
      }
    }
  };
  auto wait_and_load_epilogue_inputs = [&]() {
    wait_for_previous_kernel();
#pragma unroll
    for (int j = 0; j < kEarly; ++j) load_epilogue_inputs(threadIdx.x + j * blockDim.x, early_xs[j], early_res[j]);
  };

  int* partial = smem;                      // [nwarps][RT][NT][32 lanes][4]
  int* sums = smem + nwarps * kPerBlock;    // [nwarps][8 * NT]
  RopeInput* rope_in = reinterpret_cast<RopeInput*>(sums + nwarps * 8 * NT);  // kRope: [NT * 128] row pairs

  allow_next_kernel();
  if constexpr (kRope) {  // row pair j: elements j (tile 0) and j + NT * 128 (tile 1)
    const int d = rope.cache.head_dim, rotated = (rope.heads + rope.cache.kv_heads) * d;
    for (int j = threadIdx.x; j < NT * 128; j += blockDim.x) {
      int row, tok;
      element(j, row, tok);
      RopeInput in{0.0f, 0.0f, -1, 0};
      if (tok < m) {
        const int64_t pos = rope.positions[tok], slot = rope.slots[tok];
        if (pos >= 0 && pos < rope.cache.max_len && pos < rope.table_len && slot >= 0 && slot < rope.cache.slots) {
          in.pos = static_cast<int>(pos), in.slot = static_cast<int>(slot);
          if (row < rotated) {
            const size_t at = (size_t)pos * (d / 2) + row % d;
            in.c = rope.cos[at], in.s = rope.sin[at];
          }
        }
      }
      rope_in[j] = in;
    }
  }
  bool waited = false;
  for (int base = warp; base < nchunks; base += nwarps * U) {
    uint32_t wv[U][RT][4];
    uint32_t xv[U][NT][8];
    // issue every load of U chunks before the first use; weights first
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = base + u * nwarps;
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        uint4 v = make_uint4(kZeroCodes, kZeroCodes, kZeroCodes, kZeroCodes);
        const int tile = tile0 + r * tile_step;
        if (c < nchunks && tile < ntiles) v = load_weights(w + ((size_t)tile * nchunks + c) * 32 + lane);
        wv[u][r][0] = v.x, wv[u][r][1] = v.y, wv[u][r][2] = v.z, wv[u][r][3] = v.w;
      }
    }
    if (!waited) {  // the activations are the previous kernel's output
      wait_and_load_epilogue_inputs();
      waited = true;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = base + u * nwarps;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int tok = tok0 + g + 8 * t;
        uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;
        if (c < nchunks && tok < m) {
          const uint4* p = reinterpret_cast<const uint4*>(x_q + (size_t)tok * k_stride + c * kChunkK + 32 * q);
          // the previous kernel's output: a coherent load (ld.global.ca), not the read-only path,
          // which may hold lines from before that kernel wrote (launch.cuh); L1 keeps the row for
          // the block's other warps
          lo = __ldca(p);
          hi = __ldca(p + 1);
        }
        xv[u][t][0] = lo.x, xv[u][t][1] = lo.y, xv[u][t][2] = lo.z, xv[u][t][3] = lo.w;
        xv[u][t][4] = hi.x, xv[u][t][5] = hi.y, xv[u][t][6] = hi.z, xv[u][t][7] = hi.w;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (base + u * nwarps >= nchunks) break;  // warp-uniform
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int i = 0; i < 8; ++i) xsum[t] = __dp4a(static_cast<int>(xv[u][t][i]), 0x01010101, xsum[t]);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          const TernaryA a = ternary_a(wv[u][r][s]);
#pragma unroll
          for (int t = 0; t < NT; ++t) mma_ternary(acc[r][t], a, xv[u][t][2 * s], xv[u][t][2 * s + 1]);
        }
      }
    }
  }

  if (!waited) wait_and_load_epilogue_inputs();  // before the epilogue reads the residual and writes
  // each token's activation sum: lanes 4g .. 4g+3 hold the parts of token g (+ 8t)
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    xsum[t] += __shfl_xor_sync(0xffffffffu, xsum[t], 1);
    xsum[t] += __shfl_xor_sync(0xffffffffu, xsum[t], 2);
  }
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      unscale_rows(acc[r][t]);
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp * kPerBlock + ((r * NT + t) * 32 + lane) * 4 + i] = acc[r][t][i];
    }
  if (q == 0) {
#pragma unroll
    for (int t = 0; t < NT; ++t) sums[warp * 8 * NT + 8 * t + g] = xsum[t];
  }
  __syncthreads();

  // element e's exact dot product, and its output before rounding to Out
  auto dot_of = [&](int e, int tok) {
    int dot = 0;
    for (int v = 0; v < nwarps; ++v) dot += partial[v * kPerBlock + e] - sums[v * 8 * NT + tok - tok0];
    return dot;
  };
  auto dequantize = [&](int dot, int row, float xs) {
    // exactly the reference epilogue: (acc * w_scale) / x_scale, IEEE-rounded fp32
    return __fdiv_rn(__fmul_rn(static_cast<float>(dot), segment_scale(seg, row)), xs);
  };
  if constexpr (kRope) {
    // rope_kv_item's math on the rounded outputs of the row pair (row, row + d/2)
    const int d = rope.cache.head_dim, half = d / 2, kvh = rope.cache.kv_heads;
    Out* q_out = static_cast<Out*>(rope.q_out);
    for (int j = threadIdx.x; j < NT * 128; j += blockDim.x) {
      int row, tok;
      element(j, row, tok);
      if (tok >= m) continue;
      const float xs = kEarly > 0 && j == threadIdx.x ? early_xs[0] : __ldcg(x_scale + tok);
      const float x1 = to_float(from_float<Out>(dequantize(dot_of(j, tok), row, xs)));
      const float x2 = to_float(from_float<Out>(dequantize(dot_of(j + NT * 128, tok), row + half, xs)));
      const RopeInput in = rope_in[j];
      const int head = row / d, i = row % d;
      Out* dst = nullptr;
      float o1 = x1, o2 = x2;
      if (head < rope.heads + kvh) {
        o1 = 0.0f, o2 = 0.0f;
        if (in.pos >= 0) {
          o1 = __fsub_rn(__fmul_rn(x1, in.c), __fmul_rn(x2, in.s));  // x1 * c - x2 * s
          o2 = __fadd_rn(__fmul_rn(x2, in.c), __fmul_rn(x1, in.s));  // x2 * c + x1 * s
        }
        if (head < rope.heads) dst = q_out + ((size_t)tok * rope.heads + head) * d;
        else if (in.pos >= 0) dst = static_cast<Out*>(rope.cache.k) + (((size_t)in.slot * kvh + head - rope.heads) * rope.cache.max_len + in.pos) * d;
      } else if (in.pos >= 0) {
        dst = static_cast<Out*>(rope.cache.v) + (((size_t)in.slot * kvh + head - rope.heads - kvh) * rope.cache.max_len + in.pos) * d;
      }
      if (dst != nullptr) {
        dst[i] = from_float<Out>(o1);
        dst[i + half] = from_float<Out>(o2);
      }
    }
    return;
  }
  auto finish = [&](int e, float xs, float res) {
    int row, tok;
    element(e, row, tok);
    if (row >= n || tok >= m) return;
    const int dot = dot_of(e, tok);
    const size_t o = (size_t)tok * n + row;
    if constexpr (std::is_same_v<Out, int>) {
      out[o] = dot;
    } else {
      float y = dequantize(dot, row, xs);
      if (residual != nullptr) y = __fadd_rn(y, res);  // (+ residual), IEEE-rounded
      out[o] = from_float<Out>(y);
    }
  };
#pragma unroll
  for (int j = 0; j < kEarly; ++j) {
    const int e = threadIdx.x + j * blockDim.x;
    if (e < kPerBlock) finish(e, early_xs[j], early_res[j]);
  }
  for (int e = threadIdx.x + kEarly * blockDim.x; e < kPerBlock; e += blockDim.x) {
    float xs, res;
    load_epilogue_inputs(e, xs, res);
    finish(e, xs, res);
  }
}

// U: chunks per warp whose loads are in flight at once (registers: U * (4 RT + 8 NT) for them)
template <int RT, int NT, typename Out, bool kRope = false, int U = 4>
cudaError_t launch(const int8_t* x_q, const float* x_scale, int m, const uint32_t* tiled, int n, int k,
                   const Segments& seg, const void* residual, void* out, int warps, cudaStream_t stream,
                   const RopeKV& rope = {}) {
  const int ntiles = ceil_div(n, kTileRows), nchunks = ceil_div(k, kChunkK);
  const dim3 grid(ceil_div(ntiles, RT), ceil_div(m, 8 * NT));
  const size_t smem = (size_t)warps * (RT * NT * 128 + 8 * NT) * sizeof(int) + (kRope ? NT * 128 * sizeof(RopeInput) : 0);
  auto kernel = gemm_kernel<RT, NT, U, Out, kRope, false>;
  if constexpr (RT == 2 && NT == 1 && !kRope)
    if (warps <= 12) kernel = gemm_kernel<RT, NT, U, Out, kRope, true>;
  if (smem > 48 * 1024) {  // many warps of RT = 4, NT = 2
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  return launch_pdl(kernel, grid, dim3(warps * 32), smem, stream, m, x_q, x_scale, m,
                    nchunks * kChunkK, reinterpret_cast<const uint4*>(tiled), n, ntiles, nchunks, seg,
                    static_cast<const Out*>(residual), static_cast<Out*>(out), rope);
}

// Default launch shape, from sweeps (bench/kernels.py --sweep; kernels back to back in a CUDA graph
// with PDL; up to 8 tokens on an H200, above on an H100), some settled in the decode step itself,
// where each GEMV overlaps its neighbours: the kernel is latency-bound, so at one token group split K
// over many warps (one or two chunks each) and give a block several row tiles only when the matrix
// is very tall or very deep. From 9 tokens every block also reads its 16 tokens' activations: a tall
// matrix of few chunks runs as many small blocks that are all resident at once; with several token
// groups, other tall matrices and deep ones take four row tiles per block.
GemmConfig default_config(int m, int ntiles, int nchunks) {
  GemmConfig cfg{};
  cfg.unroll = 4;
  const bool tall = ntiles >= 800, deep = nchunks >= 48;
  if (m <= 8) {
    if (tall) {  // gate|up: 13824 rows best at (4, 8), 20480 x 3200 at (2, 8)
      cfg.warps = 8;
      cfg.row_tiles_per_block = nchunks <= 20 ? 4 : 2;
    } else {
      // two row tiles for wide matrices and the deepest (3200 x 10240, 80 chunks: 5.07 us at M = 1
      // against 5.48 with one); one for the 2B-4T down (54 chunks, H100: 3.28 us at M = 4 against
      // 3.51-3.57 with two; decode steps of batch 2-8 5-8 us faster, batch 1 the same)
      cfg.row_tiles_per_block = ntiles >= 300 || nchunks >= 64 ? 2 : 1;
      // 16 warps for deep matrices; for the others 12, except one row tile of 2-8 tokens: 16 warps, a
      // chunk or two each (the 2B-4T o projection: decode steps of batches 2-8 5-16 us faster on an
      // H100 and an H200; at batch 1 the H100 was level or 3-4 us slower: README). Two row tiles of
      // few chunks at 16 warps no longer fit twice on an SM (3B q|k|v at M = 1: 5.11 us against 3.24).
      cfg.warps = nchunks > 32 || (cfg.row_tiles_per_block == 1 && m > 1) ? 16 : 12;
    }
  } else if (tall && nchunks <= 20) {  // 2B-4T gate|up: many small blocks, all resident at once (M = 16:
    // 7.54-7.58 us against 7.93-8.05 at (2, 8), two runs; from 17 tokens, chosen in the decode step
    // on an H100: batches 24-64 9-29 us per step faster than at (4, 8): README)
    cfg.warps = 4, cfg.row_tiles_per_block = 1, cfg.unroll = 2;
  } else if (m <= 16) {  // 8 warps for tall matrices, 16 for the rest (gate|up 7.84-8.07 us at 8 warps against 8.24-8.95 at 4)
    cfg.warps = ntiles < 300 ? 16 : 8;
    cfg.row_tiles_per_block = 2;
  } else if (tall) {  // several token groups: four row tiles (H100: gate|up 12.56 / 21.71 us at M = 32 / 64
    // against 13.61 / 22.32 for (2, 8) and (2, 4); 20480 x 3200 19.94 / 34.14 against 20.75 / 35.05)
    cfg.warps = 8, cfg.row_tiles_per_block = 4;
  } else if (deep) {  // down 6.72 / 10.46 us at M = 32 / 64 against 7.14 / 11.96 for (2, 8) and (2, 4);
    // 3200 x 10240 9.40 / 14.06 against 9.96 / 16.56
    cfg.warps = m > 32 ? 8 : 16, cfg.row_tiles_per_block = 4;
  } else {  // q|k|v and o: (2, 8) within 4% of each shape's best at M = 32 and 64
    cfg.warps = 8, cfg.row_tiles_per_block = 2;
  }
  return cfg;
}

int warps_of(const GemmConfig& cfg, const GemmConfig& def, int nchunks) {
  const int warps = cfg.warps > 0 ? cfg.warps : def.warps;
  return warps < 1 ? 1 : (warps > 16 ? 16 : (warps > nchunks ? nchunks : warps));
}

// The launch for `rt` row tiles per block. RT = 4 with 16 tokens keeps two chunks in flight per warp
// whatever U asks: four would spill.
template <int NT, int U, typename Out, typename... Args>
cudaError_t launch_row_tiles(int rt, Args... args) {
  if (rt >= 4) return launch<4, NT, Out, false, NT == 2 ? 2 : U>(args...);
  if (rt == 2) return launch<2, NT, Out, false, U>(args...);
  return launch<1, NT, Out, false, U>(args...);
}

template <typename Out>
cudaError_t dispatch(const int8_t* x_q, const float* x_scale, int m, const uint32_t* tiled, int n, int k,
                     const Segments& seg, const void* residual, void* out, GemmConfig cfg, cudaStream_t stream) {
  const int nchunks = ceil_div(k, kChunkK);
  const GemmConfig def = default_config(m, ceil_div(n, kTileRows), nchunks);
  const int warps = warps_of(cfg, def, nchunks);
  const int rt = cfg.row_tiles_per_block > 0 ? cfg.row_tiles_per_block : def.row_tiles_per_block;
  const bool two = (cfg.unroll > 0 ? cfg.unroll : def.unroll) == 2;
  if (m <= 8) {
    if (two) return launch_row_tiles<1, 2, Out>(rt, x_q, x_scale, m, tiled, n, k, seg, residual, out, warps, stream);
    return launch_row_tiles<1, 4, Out>(rt, x_q, x_scale, m, tiled, n, k, seg, residual, out, warps, stream);
  }
  if (two) return launch_row_tiles<2, 2, Out>(rt, x_q, x_scale, m, tiled, n, k, seg, residual, out, warps, stream);
  return launch_row_tiles<2, 4, Out>(rt, x_q, x_scale, m, tiled, n, k, seg, residual, out, warps, stream);
}

// The q|k|v projection with the RoPE epilogue: two row tiles per block (a pair); 8 warps up to 8 tokens
// (2B-4T q|k|v on an H100: 2.92 us at M = 1 against 3.06 with 12, 3.02 against 3.13 at
// M = 4), the plain GEMV's default above.
template <typename Out>
cudaError_t dispatch_rope(const int8_t* x_q, const float* x_scale, int m, const uint32_t* tiled, int n, int k,
                          const Segments& seg, const RopeKV& rope, GemmConfig cfg, cudaStream_t stream) {
  const int nchunks = ceil_div(k, kChunkK);
  GemmConfig def = default_config(m, ceil_div(n, kTileRows), nchunks);
  if (m <= 8) def.warps = 8;
  const int warps = warps_of(cfg, def, nchunks);
  if (m <= 8) return launch<2, 1, Out, true>(x_q, x_scale, m, tiled, n, k, seg, nullptr, nullptr, warps, stream, rope);
  return launch<2, 2, Out, true>(x_q, x_scale, m, tiled, n, k, seg, nullptr, nullptr, warps, stream, rope);
}

}  // namespace

bool w2a8_gemm_rope_kv_fits(int m, int heads, const KVCacheLayer& cache) {
  return m >= 1 && m <= kRopeGemmMaxRows && heads >= 1 && cache.kv_heads >= 1 && cache.head_dim >= 32 &&
         cache.head_dim % 32 == 0 && cache.max_len >= 1 && cache.slots >= 1;
}

cudaError_t w2a8_gemm_rope_kv(const int8_t* x_q, const float* x_scale, int m, const uint32_t* tiled, int k,
                              const Segments& segments, DType dtype, const RopeKV& rope, GemmConfig config,
                              cudaStream_t stream) {
  if (!w2a8_gemm_rope_kv_fits(m, rope.heads, rope.cache) || k <= 0 || rope.table_len < 1 || segments.count < 1 ||
      segments.count > kMaxSegments)
    return cudaErrorInvalidValue;
  const int n = (rope.heads + 2 * rope.cache.kv_heads) * rope.cache.head_dim;
  if (segments.end[segments.count - 1] != n) return cudaErrorInvalidValue;
  if (dtype == DType::kBFloat16)
    return dispatch_rope<__nv_bfloat16>(x_q, x_scale, m, tiled, n, k, segments, rope, config, stream);
  if (dtype == DType::kFloat32) return dispatch_rope<float>(x_q, x_scale, m, tiled, n, k, segments, rope, config, stream);
  return cudaErrorInvalidValue;
}

cudaError_t repack_ternary(const uint8_t* canonical, int n, int k, uint32_t* tiled, int* invalid,
                           cudaStream_t stream) {
  const long long words = (long long)ceil_div(n, kTileRows) * ceil_div(k, kChunkK) * 32 * 4;
  const int threads = 256;
  repack_kernel<<<(unsigned)((words + threads - 1) / threads), threads, 0, stream>>>(
      canonical, n, k, ceil_div(k, kChunkK), tiled, words, invalid);
  return cudaGetLastError();
}

cudaError_t w2a8_gemm(const int8_t* x_q, const float* x_scale, int m, const uint32_t* tiled, int n, int k,
                      const Segments& segments, const void* residual, void* out, DType out_dtype,
                      GemmConfig config, cudaStream_t stream) {
  if (m <= 0 || n <= 0 || k <= 0 || segments.count < 1 || segments.count > kMaxSegments) return cudaErrorInvalidValue;
  if (config.kernel < 0 || config.kernel > 2) return cudaErrorInvalidValue;
  if (config.kernel == 2 || (config.kernel == 0 && m > kLargeMThreshold))
    return w2a8_gemm_large(x_q, x_scale, m, tiled, n, k, segments, residual, out, out_dtype, config.large_tile,
                           config.large_splits, stream);
  switch (out_dtype) {
    case DType::kInt32:
      return dispatch<int>(x_q, x_scale, m, tiled, n, k, segments, residual, out, config, stream);
    case DType::kFloat32:
      return dispatch<float>(x_q, x_scale, m, tiled, n, k, segments, residual, out, config, stream);
    case DType::kBFloat16:
      return dispatch<__nv_bfloat16>(x_q, x_scale, m, tiled, n, k, segments, residual, out, config, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace bitnet
