// The LM head as a stream of its table: logits[m, v] = scale[v] * sum_k x[m, k] * w[v, k], for x bf16
// or fp32 [m, k], logits fp32 [m, V], and w [V, k] row-major either
//   * int8 with one fp32 scale per vocabulary row (the optional int8 head), or
//   * bf16 with no scale (the checkpoint's own head: the tied embedding), which the engine runs here
//     for one row of x (engine/kernels.py LM_HEAD_BF16_MAX_ROWS), where cuBLAS reads the table more
//     slowly.
//
// At decode batch sizes this is a pure stream of the table (V * k * sizeof(w) bytes: 328 MB int8 or
// 657 MB bf16 for 2B-4T), so everything is arranged to keep many bytes in flight and decode them cheaply:
//   * a warp owns kRows vocabulary rows at a time and walks k in 512-byte rounds: each lane loads 16
//     bytes of every row (ld.global.nc with L1::no_allocate: each weight byte is read exactly once),
//     kUnroll rounds requested before any is used;
//   * blocks are persistent (as many as fit on the GPU at once): each stages its MT rows of x into
//     shared memory once, as fp32, then takes row groups in a grid-stride loop, requesting the next
//     group's first weights before it reduces the current one. The first weights are requested
//     before the dependency wait (programmatic dependent launch), x only read after it;
//   * each weight becomes an exact fp32 once (int8: sign bits flipped, the byte permuted into the low
//     mantissa of 2^23, one subtraction; bf16: a shift or a mask) and is used for all MT rows of x
//     held in the block; a larger m runs in m-tiles along grid.y, whose blocks run side by side over
//     the same rows, so all but one of them find the weights in L2.
//
// Numerics: lane L accumulates its own k positions (16-byte chunks L, L + 32, ..., ascending k) with
// fp32 fma; the warp then adds its 32 partials in a fixed butterfly (xor offsets 16, 8, 4, 2, 1, own
// value first; done as a reduce-scatter, which adds the same pairs in the same order) and multiplies
// by the row's scale. A logit therefore depends only on its x row and its w row, never on m, the
// m-tile or the grid: a token gets bit-identical logits alone or in a batch. Against the exact value
// the error is that of fp32 summation of depth E * ceil(k / (32 E)) + 5, E weights per 16-byte chunk
// (tests/test_head.py bounds it so).
//
// Any m, V and k <= kLmHeadMaxK. k a multiple of E with a 16-byte aligned table: vector loads;
// otherwise element loads (same numbers, slower).

#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "kernels.h"
#include "launch.cuh"

namespace bitnet {
namespace {

constexpr int kWarps = 8;                // warps per block
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 4;                 // vocabulary rows a warp works on together
constexpr int kUnroll = 2;               // 16-byte loads per row and lane requested at once
constexpr int kRound = 32 * kUnroll;     // chunks of a row a warp covers per round
constexpr int kMaxTile = 8;              // rows of x per block (m-tile)
constexpr int kSmemBytes = kLmHeadMaxK * (int)sizeof(float);  // an fp32 x tile: up to 96 KB
constexpr int kMaxDevices = 64;
static_assert(kMaxTile * kRows <= 32, "the reduce-scatter hands each lane at most one value");

// What a table element is: E of them per 16-byte chunk (one lane load), read as fp32 four at a time
// (one float4 unit of the staged x).
template <typename W>
struct Table {
  static constexpr int E = 16 / (int)sizeof(W);
  static constexpr int kUnits = E / 4;  // float4 units of x per chunk
};

constexpr int log2_of(int n) { return n <= 1 ? 0 : 1 + log2_of(n / 2); }

// 16 bytes of the table, read once: not kept in L1; the L2 fetches the whole 256-byte line pair.
__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Chunk c (elements E c .. E c + E - 1) of row `row`; elements past k read as zero weights.
template <typename W, bool kVec>
__device__ __forceinline__ uint4 load_chunk(const W* __restrict__ w, int row, int c, int k) {
  constexpr int E = Table<W>::E;
  const W* p = w + (size_t)row * k + (size_t)c * E;
  if constexpr (kVec) {
    return load_streaming(p);
  } else {
    using Bits = std::conditional_t<sizeof(W) == 1, uint8_t, unsigned short>;
    const Bits* b = reinterpret_cast<const Bits*>(p);
    uint32_t word[4] = {0u, 0u, 0u, 0u};
    const int n = k - c * E;
#pragma unroll
    for (int e = 0; e < E; ++e)
      if (e < n) word[e * sizeof(W) / 4] |= (uint32_t)__ldg(b + e) << (8 * ((e * sizeof(W)) % 4));
    return make_uint4(word[0], word[1], word[2], word[3]);
  }
}

__device__ __forceinline__ uint32_t word_of(uint4 v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// Elements 4j .. 4j + 3 of a chunk as exact fp32 values.
// int8: flipping the sign bits turns byte b into b + 128 in 0..255; as the low mantissa byte of 2^23
// that reads 2^23 + b + 128, and one (exact) subtraction leaves b. One byte permute and one add per
// weight, no int->float conversion. bf16: the upper half of an fp32, one shift or mask per weight.
template <typename W>
__device__ __forceinline__ void decode_unit(uint4 chunk, int j, float (&f)[4]) {
  if constexpr (sizeof(W) == 1) {
    const uint32_t u = word_of(chunk, j) ^ 0x80808080u;
    f[0] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - 8388736.0f;
    f[1] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - 8388736.0f;
    f[2] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - 8388736.0f;
    f[3] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - 8388736.0f;
  } else {
    const uint32_t lo = word_of(chunk, 2 * j), hi = word_of(chunk, 2 * j + 1);
    f[0] = __uint_as_float(lo << 16);
    f[1] = __uint_as_float(lo & 0xFFFF0000u);
    f[2] = __uint_as_float(hi << 16);
    f[3] = __uint_as_float(hi & 0xFFFF0000u);
  }
}

// x rows in shared memory: float4 unit u (elements 4u .. 4u+3) of a row is stored at
// u ^ ((u >> 3) & (kUnits - 1)). The 8 lanes of a quarter-warp read units kUnits * lane + j of one row
// (lane L owns chunk 32a + L): unswizzled they would hit 2 (int8) or 4 (bf16) of the 8 bank groups,
// swizzled they hit 8 different ones.
template <int kUnits>
__device__ __forceinline__ int swizzle(int u) { return u ^ ((u >> 3) & (kUnits - 1)); }

template <typename T>
__device__ __forceinline__ float to_f32(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return v;
}

// One halving step of the reduce-scatter: values 0 .. 2 * kHalf - 1 live; the lane whose `Offset` bit
// is set keeps the upper half (renumbered 0 .. kHalf - 1) and sends the lower one, its partner the
// reverse; each adds what it receives to what it kept. Then the next step on the kept half.
template <int kLive, int Offset, int M>
__device__ __forceinline__ void reduce_scatter_steps(float (&v)[M], int lane) {
  if constexpr (kLive > 1) {
    constexpr int kHalf = kLive / 2;
    const bool upper = (lane & Offset) != 0;
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const float lo = v[i], hi = v[i + kHalf];  // values, not lvalues: a select of array addresses
      const float send = upper ? lo : hi;         // would push v into local memory
      const float keep = upper ? hi : lo;
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, Offset);
    }
    reduce_scatter_steps<kHalf, Offset / 2>(v, lane);
  }
}

// Sum each of the N values over the warp; lane L ends up with the total of value L >> (5 - log2 N).
// Every step adds a lane's own partial and its xor partner's, as the plain butterfly does, so each
// total is bit-identical to a butterfly over offsets 16, 8, 4, 2, 1 whatever N is.
template <int N>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[N], int lane) {
  constexpr int kSteps = log2_of(N);
  static_assert((1 << kSteps) == N && N <= 32, "N must be a power of two up to 32");
  reduce_scatter_steps<N, 16>(v, lane);
#pragma unroll
  for (int offset = 16 >> kSteps; offset > 0; offset >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
  return v[0];
}

// grid: (blocks per m-tile, m-tiles); block: kThreads; dynamic shared memory: MT fp32 rows of x,
// each padded with zeros to a whole number of chunks. scale: nullptr for none (bf16 tables).
template <typename T, typename W, int MT, bool kVec>
__global__ void __launch_bounds__(kThreads, 2)
    lm_head_kernel(const T* __restrict__ x, int m, int k, const W* __restrict__ w,
                   const float* __restrict__ scale, int v, float* __restrict__ out) {
  constexpr int E = Table<W>::E, kUnits = Table<W>::kUnits;
  extern __shared__ float4 xs[];
  allow_next_kernel();
  const int lane = threadIdx.x & 31;
  const int nchunks = (k + E - 1) / E;
  const int units = nchunks * kUnits;  // float4 units per staged x row
  const int groups = (v + kRows - 1) / kRows;
  const int stride = gridDim.x * kWarps;
  const int m0 = blockIdx.y * MT;
  int group = blockIdx.x * kWarps + (threadIdx.x >> 5);

  uint4 wv[kUnroll][kRows];
  auto fetch = [&](int grp, int c0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * 32 + lane;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int row = grp * kRows + r;
        wv[u][r] = row < v && c < nchunks ? load_chunk<W, kVec>(w, row, c, k) : make_uint4(0u, 0u, 0u, 0u);
      }
    }
  };

  if (group < groups) fetch(group, 0);  // the table does not depend on the previous kernel
  wait_for_previous_kernel();           // x does

  // stage rows m0 .. m0 + MT - 1 of x as fp32 (rows past m and elements past k are zeros)
#pragma unroll 4
  for (int i = threadIdx.x; i < MT * units; i += kThreads) {
    const int t = i / units, u = i - t * units;
    float4 f = make_float4(0.f, 0.f, 0.f, 0.f);
    if (m0 + t < m) {
      const T* src = x + (size_t)(m0 + t) * k + 4 * u;
      const int left = k - 4 * u;
      if (left > 0) f.x = to_f32(ldcg_ordered(src));  // the previous kernel's output: through L2 (quant_math.cuh)
      if (left > 1) f.y = to_f32(ldcg_ordered(src + 1));
      if (left > 2) f.z = to_f32(ldcg_ordered(src + 2));
      if (left > 3) f.w = to_f32(ldcg_ordered(src + 3));
    }
    xs[t * units + swizzle<kUnits>(u)] = f;
  }
  __syncthreads();

  for (; group < groups; group += stride) {
    float acc[MT * kRows];
#pragma unroll
    for (int i = 0; i < MT * kRows; ++i) acc[i] = 0.f;

    for (int c0 = 0; c0 < nchunks; c0 += kRound) {
      if (c0 > 0) fetch(group, c0);  // round 0 was requested ahead
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + u * 32 + lane;
        if (c >= nchunks) continue;
#pragma unroll
        for (int j = 0; j < kUnits; ++j) {  // unit j: elements E c + 4j .. E c + 4j + 3
          float f[kRows][4];
#pragma unroll
          for (int r = 0; r < kRows; ++r) decode_unit<W>(wv[u][r], j, f[r]);
          const int unit = swizzle<kUnits>(kUnits * c + j);
#pragma unroll
          for (int t = 0; t < MT; ++t) {
            const float4 xv = xs[t * units + unit];
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
              float& a = acc[t * kRows + r];
              a = __fmaf_rn(xv.x, f[r][0], a);
              a = __fmaf_rn(xv.y, f[r][1], a);
              a = __fmaf_rn(xv.z, f[r][2], a);
              a = __fmaf_rn(xv.w, f[r][3], a);
            }
          }
        }
      }
    }

    const int next = group + stride;
    if (next < groups) fetch(next, 0);  // in flight while this group is reduced and written

    const float total = warp_reduce_scatter(acc, lane);
    constexpr int kShift = 5 - log2_of(MT * kRows);  // lanes sharing one value after the reduction
    if ((lane & ((1 << kShift) - 1)) == 0) {
      const int idx = lane >> kShift, t = idx / kRows, r = idx % kRows;
      const int row = group * kRows + r;
      if (row < v && m0 + t < m) out[(size_t)(m0 + t) * v + row] = scale != nullptr ? total * scale[row] : total;
    }
  }
}

template <typename T, typename W, int MT, bool kVec>
cudaError_t launch(const T* x, int m, int k, const W* w, const float* scale, int v, float* out,
                   cudaStream_t stream) {
  constexpr int E = Table<W>::E;
  auto* kernel = lm_head_kernel<T, W, MT, kVec>;
  const size_t smem = (size_t)MT * ceil_div(k, E) * E * sizeof(float);
  if (smem > (size_t)kSmemBytes) return cudaErrorInvalidValue;
  // raising the limit past the default 48 KB and the occupancy query enqueue nothing: capture-safe
  if (smem > 48 * 1024) {
    static const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         kSmemBytes);
    if (attr != cudaSuccess) return attr;
  }
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  // per device: SM count and the last (shared memory size, blocks per SM) seen, packed in one word
  static std::atomic<long long> cached[kMaxDevices];
  long long entry = device < kMaxDevices ? cached[device].load() : 0;
  if (entry == 0 || (entry >> 32) != (long long)smem) {
    int sms = 0, per_sm = 0;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
    if (err != cudaSuccess) return err;
    entry = ((long long)smem << 32) | ((long long)std::max(per_sm, 1) << 16) | std::min(sms, 65535);
    if (device < kMaxDevices) cached[device].store(entry);
  }
  const int sms = (int)(entry & 0xffff), per_sm = (int)((entry >> 16) & 0xffff);

  // Blocks per m-tile: all resident at once, then trimmed so that every warp gets the same number of
  // row groups (no last round run by a few warps only).
  const int groups = ceil_div(v, kRows);
  const int mtiles = ceil_div(m, MT);
  const int resident = std::max(1, sms * per_sm / mtiles);
  const int rounds = ceil_div(groups, resident * kWarps);
  const int blocks = std::max(1, std::min(resident, ceil_div(groups, rounds * kWarps)));
  constexpr int kMaxGridY = 65535;
  for (int first = 0; first < mtiles; first += kMaxGridY) {  // more m-tiles than a grid holds: several launches
    const int tiles = std::min(mtiles - first, kMaxGridY);
    const int row0 = first * MT;
    err = launch_pdl(kernel, dim3(blocks, tiles), dim3(kThreads), smem, stream, m, x + (size_t)row0 * k,
                     std::min(m - row0, tiles * MT), k, w, scale, v, out + (size_t)row0 * v);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The m-tile: the rows of x each weight is reused for. Small m get a tile of their own size (no
// wasted fmas at batch 1); the tile shrinks when k is too long for it to fit in shared memory.
template <typename T, typename W, bool kVec>
cudaError_t dispatch(const T* x, int m, int k, const W* w, const float* scale, int v, float* out,
                     cudaStream_t stream) {
  constexpr int E = Table<W>::E;
  int tile = m == 1 ? 1 : m == 2 ? 2 : m <= 4 ? 4 : kMaxTile;
  while (tile > 1 && (size_t)tile * ceil_div(k, E) * E * sizeof(float) > (size_t)kSmemBytes) tile /= 2;
  switch (tile) {
    case 1: return launch<T, W, 1, kVec>(x, m, k, w, scale, v, out, stream);
    case 2: return launch<T, W, 2, kVec>(x, m, k, w, scale, v, out, stream);
    case 4: return launch<T, W, 4, kVec>(x, m, k, w, scale, v, out, stream);
    default: return launch<T, W, kMaxTile, kVec>(x, m, k, w, scale, v, out, stream);
  }
}

template <typename T, typename W>
cudaError_t dispatch_layout(const void* x, int m, int k, const W* w, const float* scale, int v, float* out,
                            cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  if (k % Table<W>::E == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0)
    return dispatch<T, W, true>(xt, m, k, w, scale, v, out, stream);
  return dispatch<T, W, false>(xt, m, k, w, scale, v, out, stream);
}

template <typename W>
cudaError_t head(const void* x, DType x_dtype, int m, int k, const W* w, const float* scale, int v, float* out,
                 cudaStream_t stream) {
  if (m <= 0 || k <= 0 || v <= 0 || k > kLmHeadMaxK) return cudaErrorInvalidValue;
  if (x_dtype == DType::kBFloat16) return dispatch_layout<__nv_bfloat16, W>(x, m, k, w, scale, v, out, stream);
  if (x_dtype == DType::kFloat32) return dispatch_layout<float, W>(x, m, k, w, scale, v, out, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t lm_head_int8(const void* x, DType x_dtype, int m, int k, const int8_t* w, const float* scale, int v,
                         float* out, cudaStream_t stream) {
  if (scale == nullptr) return cudaErrorInvalidValue;
  return head(x, x_dtype, m, k, w, scale, v, out, stream);
}

cudaError_t lm_head_bf16(const void* x, DType x_dtype, int m, int k, const void* w, int v, float* out,
                         cudaStream_t stream) {
  return head(x, x_dtype, m, k, static_cast<const __nv_bfloat16*>(w), nullptr, v, out, stream);
}

}  // namespace bitnet
