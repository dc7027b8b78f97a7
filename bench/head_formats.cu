// What the LM head costs per table format: the bf16 table (the tied embedding: 657 MB for
// 2B-4T, read once per decode step) against the same values re-coded losslessly in 12 bits each.
//
// The 12-bit code of a bf16 value: one byte of sign and mantissa, and a 4-bit exponent offset below
// its row's largest exponent (the row's base, one byte per row). Offsets 0..14 decode exactly; a
// value 15 or more binades below its row's largest (zeros in a nonzero row among them) would be an
// escape, kept exactly elsewhere; here escapes are only counted, and the rows holding them left out
// of the comparison. Decoding to fp32 is a byte permute (sign replicated above the byte), one mask
// and one subtraction for the exponent, merged by one logic op.
//
// Batch 1 on fp32 fmas: both kernels share one skeleton (persistent blocks, x staged in shared memory
// as fp32, a warp on 4 rows, each lane on 16-value chunks lane, lane + 32, ... in the same order, a
// warp butterfly), so rows without escapes must give bit-identical logits, which is checked. Then m
// tokens on the tensor cores: both tables tiled for mma.m16n8k16's A fragment, x in bf16, m-tiles of
// 16 or 32 tokens in shared memory (B fragments by ldmatrix), 8 or 16 warps a block; again
// bit-identical logits for tiles without escapes. Timed as
// graph replays of 10 launches (the table is 13x the L2, so it comes from HBM), against the
// device-to-device copy bandwidth. Tables: random, N(0, 0.02) per weight (a bf16 table of that kind
// costs what a trained one costs; its escape rate is the data's), and one with heavy tails and
// per-row scales, for the escape count only.
// Standalone (no torch):  nvcc -std=c++17 -O3 -arch=sm_90 bench/head_formats.cu -o head_formats && ./head_formats
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "graph_timing.cuh"

constexpr int kVocab = 128256, kK = 2560, kChunks = kK / 16;  // 2B-4T; 16-value chunks per row
constexpr int kWarps = 8, kRows = 4;
static_assert(kVocab % kRows == 0 && kK % (16 * 32) == 0, "whole row groups, whole rounds of chunks");

__device__ __forceinline__ uint32_t hash32(uint32_t x) {
  x ^= x >> 16, x *= 0x7feb352du, x ^= x >> 15, x *= 0x846ca68bu, x ^= x >> 16;
  return x;
}
__device__ __forceinline__ float uniform(uint32_t i) { return (hash32(i) + 0.5f) * 2.3283064e-10f; }  // (0, 1)

// heavy = 0: N(0, 0.02). heavy = 1: N(0, 1) x exp(N(0, 1)) x a per-row scale 10^(-3 .. -1).
__global__ void make_table(uint16_t* w, float* x, int heavy) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < (size_t)kVocab * kK) {
    const uint32_t j = (uint32_t)i;
    const float z = sqrtf(-2.0f * logf(uniform(2 * j))) * cospif(2.0f * uniform(2 * j + 1));
    float v = 0.02f * z;
    if (heavy) {
      const float z2 = sqrtf(-2.0f * logf(uniform(~j))) * cospif(2.0f * uniform(j ^ 0x5bd1e995u));
      v = z * expf(z2) * exp10f(-3.0f + 2.0f * uniform((uint32_t)(i / kK) + 12345u));
    }
    w[i] = (uint16_t)(__float_as_uint(v) >> 16);
  }
  if (i < kK) x[i] = __uint_as_float(__float_as_uint(uniform((uint32_t)i + 777u) - 0.5f) & 0xFFFF0000u);  // bf16 values
}

// One block per row: the base, the codes, and how many of the row's values would be escapes.
__global__ void encode(const uint16_t* w, uint8_t* sign_mantissa, uint32_t* offsets, uint8_t* base, int* row_escapes) {
  const int row = blockIdx.x;
  __shared__ int top, escapes;
  if (threadIdx.x == 0) top = 0, escapes = 0;
  __syncthreads();
  int e = 0;
  for (int k = threadIdx.x; k < kK; k += blockDim.x) e = max(e, (w[(size_t)row * kK + k] >> 7) & 0xFF);
  atomicMax(&top, e);
  __syncthreads();
  for (int j = threadIdx.x; j < kK / 8; j += blockDim.x) {  // offset word j: values 8j .. 8j + 7, 4 bits each
    uint32_t word = 0;
    for (int t = 0; t < 8; ++t) {
      const uint16_t v = w[(size_t)row * kK + 8 * j + t];
      int off = top - ((v >> 7) & 0xFF);
      if (off >= 15) off = 15, atomicAdd(&escapes, 1);
      word |= (uint32_t)off << (4 * t);
      sign_mantissa[(size_t)row * kK + 8 * j + t] = (uint8_t)(((v >> 8) & 0x80) | (v & 0x7F));
    }
    offsets[(size_t)row * (kK / 8) + j] = word;
  }
  __syncthreads();
  if (threadIdx.x == 0) base[row] = (uint8_t)top, row_escapes[row] = escapes;
}

__device__ __forceinline__ uint4 load16(const void* p) {  // read once: past L1, whole 256-byte L2 lines
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 load8(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// kCoded false: bf16 table (two 16-byte loads per chunk); true: 12-bit (16 + 8 bytes per chunk)
template <bool kCoded>
__global__ void __launch_bounds__(kWarps * 32) head(const void* table, const uint32_t* offsets, const uint8_t* base,
                                                    const float* x, float* logits) {
  __shared__ float xs[kK];
  for (int k = threadIdx.x; k < kK; k += blockDim.x) xs[k] = x[k];
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = blockIdx.x * kWarps + (threadIdx.x >> 5), warps = gridDim.x * kWarps;
  for (int r0 = warp * kRows; r0 < kVocab; r0 += warps * kRows) {
    float acc[kRows];
    uint32_t base23[kRows];  // the row's base exponent in place
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f, base23[r] = kCoded ? (uint32_t)base[r0 + r] << 23 : 0;
    for (int c = lane; c < kChunks; c += 32) {
      uint4 lo[kRows], hi[kRows];
      uint2 off[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (!kCoded) {
          const uint16_t* p = static_cast<const uint16_t*>(table) + (size_t)(r0 + r) * kK + 16 * c;
          lo[r] = load16(p), hi[r] = load16(p + 8);
        } else {
          lo[r] = load16(static_cast<const uint8_t*>(table) + (size_t)(r0 + r) * kK + 16 * c);
          off[r] = load8(offsets + (size_t)(r0 + r) * (kK / 8) + 2 * c);
        }
      }
      const float4* xv = reinterpret_cast<const float4*>(xs + 16 * c);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float wv[16];
        if (!kCoded) {
          const uint32_t u[8] = {lo[r].x, lo[r].y, lo[r].z, lo[r].w, hi[r].x, hi[r].y, hi[r].z, hi[r].w};
#pragma unroll
          for (int j = 0; j < 8; ++j) wv[2 * j] = __uint_as_float(u[j] << 16), wv[2 * j + 1] = __uint_as_float(u[j] & 0xFFFF0000u);
        } else {
          const uint32_t sm[4] = {lo[r].x, lo[r].y, lo[r].z, lo[r].w};
#pragma unroll
          for (int j = 0; j < 16; ++j) {
            // result bytes [0, 0, b, b's sign replicated]: sign at bit 31, mantissa at 16..22 after the mask
            const uint32_t select = 0x44u | (uint32_t)(j % 4) << 8 | (uint32_t)((j % 4) | 8) << 12;
            uint32_t p;
            asm("prmt.b32 %0, %1, %2, %3;" : "=r"(p) : "r"(sm[j / 4]), "r"(0u), "r"(select));
            const uint32_t word = j < 8 ? off[r].x : off[r].y;
            const int t = j % 8;  // the offset's 4 bits moved to the exponent's lowest bits (23 ..)
            const uint32_t off23 = (t <= 5 ? word << (23 - 4 * t) : word >> (4 * t - 23)) & 0x07800000u;
            wv[j] = __uint_as_float((p & 0x807F0000u) | (base23[r] - off23));
          }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 xq = xv[q];
          acc[r] = fmaf(wv[4 * q], xq.x, acc[r]);
          acc[r] = fmaf(wv[4 * q + 1], xq.y, acc[r]);
          acc[r] = fmaf(wv[4 * q + 2], xq.z, acc[r]);
          acc[r] = fmaf(wv[4 * q + 3], xq.w, acc[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float s = acc[r];
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0) logits[r0 + r] = s;
    }
  }
}

// ---- the same tables on the tensor cores, for m tokens (mma.m16n8k16 bf16, fp32 accumulation) ----
// Tiled for the MMA's A fragment: for vocabulary tile t (16 rows), 64-value k-block b and lane L
// (g = L / 4, q = L % 4), value v = 2 p + h of the lane's 32 (pair p = 4 s + r: k-step s, A register
// r) is row 16 t + g + 8 (r & 1), input 64 b + 16 s + 2 q + 8 (r >> 1) + h. The bf16 tiles hold those
// 32 values (64 bytes); the coded tiles their 32 sign+mantissa bytes and 16 bytes of offsets (word
// p / 4, pair p % 4 = j: the low value's offset at bits 4 j, the high one's at 16 + 4 j), so that one
// shift and one mask put both offsets under the two bf16 exponents of the A register.
constexpr int kTiles = kVocab / 16, kBlocks = kK / 64, kXStride = kK + 8;  // +8: no bank conflicts

__device__ __forceinline__ void fragment_position(int lane, int v, int& row, int& k) {
  const int g = lane >> 2, q = lane & 3, p = v >> 1, h = v & 1, s = p >> 2, r = p & 3;
  row = g + 8 * (r & 1), k = 16 * s + 2 * q + 8 * (r >> 1) + h;
}

// one thread per (tile, block, lane)
__global__ void tile_tables(const uint16_t* w, const uint8_t* sign_mantissa, const uint32_t* offsets,
                            uint16_t* bf16_tiles, uint8_t* sm_tiles, uint32_t* offset_tiles) {
  const size_t id = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (id >= (size_t)kTiles * kBlocks * 32) return;
  const int lane = id % 32, b = (id / 32) % kBlocks, t = id / (32 * kBlocks);
  uint32_t off_words[4] = {0, 0, 0, 0};
  for (int v = 0; v < 32; ++v) {
    int row, k;
    fragment_position(lane, v, row, k);
    const size_t src = (size_t)(16 * t + row) * kK + 64 * b + k;
    bf16_tiles[id * 32 + v] = w[src];
    sm_tiles[id * 32 + v] = sign_mantissa[src];
    const uint32_t off = (offsets[src / 8] >> (4 * (src % 8))) & 0xF;
    const int p = v >> 1;
    off_words[p >> 2] |= off << (4 * (p & 3) + 16 * (v & 1));
  }
  for (int i = 0; i < 4; ++i) offset_tiles[id * 4 + i] = off_words[i];
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// grid.y: m-tiles of kMTile tokens (16 or 32), all blocks resident at once (grid.x shrinks with grid.y)
// so that the m-tiles read each table tile at about the same time, from L2 after the first; kW warps
// per block; x bf16 [m, kK]; logits fp32 [m, kVocab]. B fragments by ldmatrix, two n-tiles at a time.
template <bool kCoded, int kMTile, int kW>
__global__ void __launch_bounds__(kW * 32) head_mma(const void* tiles, const uint32_t* offset_tiles,
                                                        const uint8_t* base, const uint16_t* x, int m, float* logits) {
  extern __shared__ uint16_t xs[];  // [8 nt][kXStride]
  const int tok0 = blockIdx.y * kMTile, mt = min(kMTile, m - tok0), nt = (mt + 7) / 8;
  for (int i = threadIdx.x; i < 8 * nt * kK / 8; i += blockDim.x) {  // 16-byte pieces, zeros past m
    const int t = i / (kK / 8), c = i % (kK / 8);
    uint4 v = make_uint4(0, 0, 0, 0);
    if (t < mt) v = *reinterpret_cast<const uint4*>(x + (size_t)(tok0 + t) * kK + 8 * c);
    *reinterpret_cast<uint4*>(xs + t * kXStride + 8 * c) = v;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int warp = blockIdx.x * kW + (threadIdx.x >> 5), warps = gridDim.x * kW;
  // ldmatrix rows: lanes 0-7 / 8-15 / 16-23 / 24-31 address n-tile j's inputs k .. k+7 / k+8 .. k+15 and
  // n-tile j+1's, one token row each
  const uint32_t x_lane = (uint32_t)__cvta_generic_to_shared(xs + ((lane & 7) + 8 * (lane >> 4)) * kXStride + 8 * ((lane >> 3) & 1));
  for (int t = warp; t < kTiles; t += warps) {
    float acc[kMTile / 8][4] = {};
    uint32_t base2[2] = {0, 0};  // rows g and g + 8: the base exponent under both halves of a register
    if (kCoded) {
      const uint32_t b0 = base[16 * t + g], b1 = base[16 * t + g + 8];
      base2[0] = b0 << 7 | b0 << 23, base2[1] = b1 << 7 | b1 << 23;
    }
    for (int b = 0; b < kBlocks; b += 2) {
      uint4 raw[2][4];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const size_t id = ((size_t)t * kBlocks + b + u) * 32 + lane;
        if (!kCoded) {
          const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(tiles) + id * 32);
          raw[u][0] = load16(p), raw[u][1] = load16(p + 1), raw[u][2] = load16(p + 2), raw[u][3] = load16(p + 3);
        } else {
          const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(tiles) + id * 32);
          raw[u][0] = load16(p), raw[u][1] = load16(p + 1), raw[u][2] = load16(offset_tiles + id * 4);
        }
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          uint32_t a[4];
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int p = 4 * s + r;
            if (!kCoded) {
              const uint4 v = raw[u][p / 4];
              a[r] = (p % 4 == 0) ? v.x : (p % 4 == 1) ? v.y : (p % 4 == 2) ? v.z : v.w;
            } else {
              const uint4 smv = raw[u][p / 8];
              const int wi = (p / 2) % 4;
              const uint32_t smw = wi == 0 ? smv.x : wi == 1 ? smv.y : wi == 2 ? smv.z : smv.w;
              uint32_t bits;  // [lo byte, its sign replicated, hi byte, its sign replicated]
              asm("prmt.b32 %0, %1, %2, %3;" : "=r"(bits) : "r"(smw), "r"(0u), "r"(p % 2 ? 0xB3A2u : 0x9180u));
              const uint4 ov = raw[u][2];
              const int j = p % 4;
              const uint32_t ow = (p / 4) == 0 ? ov.x : (p / 4) == 1 ? ov.y : (p / 4) == 2 ? ov.z : ov.w;
              const uint32_t off = (j == 0 ? ow << 7 : j == 1 ? ow << 3 : j == 2 ? ow >> 1 : ow >> 5) & 0x07800780u;
              a[r] = (bits & 0x807F807Fu) | (base2[r & 1] - off);
            }
          }
          const uint32_t k_bytes = 2 * (64 * (b + u) + 16 * s);
#pragma unroll
          for (int j = 0; j < kMTile / 8; j += 2) {
            if (j >= nt) break;  // warp-uniform
            const uint32_t addr = x_lane + k_bytes + (uint32_t)(8 * j * kXStride * 2);
            uint32_t f0, f1, f2, f3;
            if (j + 1 < nt) {
              asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                           : "=r"(f0), "=r"(f1), "=r"(f2), "=r"(f3) : "r"(addr));
              mma_bf16(acc[j], a, f0, f1);
              mma_bf16(acc[j + 1], a, f2, f3);
            } else {
              asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(f0), "=r"(f1) : "r"(addr));
              mma_bf16(acc[j], a, f0, f1);
            }
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kMTile / 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int tok = 8 * j + 2 * q + (c & 1);
        if (tok < mt) logits[(size_t)(tok0 + tok) * kVocab + 16 * t + g + 8 * (c >> 1)] = acc[j][c];
      }
  }
}

int main() {
  const size_t n = (size_t)kVocab * kK;
  uint16_t* w;
  uint8_t *sign_mantissa, *base;
  uint32_t* offsets;
  int* row_escapes;
  float *x, *logits_bf16, *logits_coded;
  CHECK(cudaMalloc(&w, n * 2));
  CHECK(cudaMalloc(&sign_mantissa, n));
  CHECK(cudaMalloc(&offsets, n / 2));
  CHECK(cudaMalloc(&base, kVocab));
  CHECK(cudaMalloc(&row_escapes, kVocab * sizeof(int)));
  CHECK(cudaMalloc(&x, kK * sizeof(float)));
  CHECK(cudaMalloc(&logits_bf16, kVocab * sizeof(float)));
  CHECK(cudaMalloc(&logits_coded, kVocab * sizeof(float)));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::vector<int> esc(kVocab);
  auto escape_stats = [&](const char* what) {
    CHECK(cudaMemcpy(esc.data(), row_escapes, kVocab * sizeof(int), cudaMemcpyDeviceToHost));
    long long total = 0;
    int rows = 0;
    for (int e : esc) total += e, rows += e > 0;
    std::printf("%-52s escapes %lld (%.1e of the values, %.2f per row), rows with any %d (%.1f%%)\n", what, total,
                (double)total / n, (double)total / kVocab, rows, 100.0 * rows / kVocab);
  };
  std::printf("%s, a %d x %d table, batch 1\n", prop.name, kVocab, kK);
  make_table<<<(unsigned)((n + 255) / 256), 256>>>(w, x, 1);
  encode<<<kVocab, 256>>>(w, sign_mantissa, offsets, base, row_escapes);
  CHECK(cudaDeviceSynchronize());
  escape_stats("heavy tails, row scales 1e-3 .. 1e-1:");
  make_table<<<(unsigned)((n + 255) / 256), 256>>>(w, x, 0);
  encode<<<kVocab, 256>>>(w, sign_mantissa, offsets, base, row_escapes);
  CHECK(cudaDeviceSynchronize());
  escape_stats("N(0, 0.02) (the timed table):");

  // copy bandwidth: the best of graph-captured and back-to-back 1 GiB copies (bytes read + written)
  void *c0, *c1;
  CHECK(cudaMalloc(&c0, 1 << 30));
  CHECK(cudaMalloc(&c1, 1 << 30));
  float copy_us = graph_us_per_launch(5, 9, [&](cudaStream_t s, int) {
    CHECK(cudaMemcpyAsync(c1, c0, 1 << 30, cudaMemcpyDeviceToDevice, s));
  });
  for (int r = 0; r < 3; ++r) {
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    CHECK(cudaEventRecord(a));
    for (int i = 0; i < 5; ++i) CHECK(cudaMemcpyAsync(c1, c0, 1 << 30, cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    copy_us = std::min(copy_us, ms * 1000 / 5);
  }
  CHECK(cudaFree(c0));
  CHECK(cudaFree(c1));
  const double bandwidth = 2.0 * (1 << 30) / (copy_us * 1e-6);

  int per_sm[2];
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm[0], head<false>, kWarps * 32, 0));
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm[1], head<true>, kWarps * 32, 0));
  const int grid[2] = {per_sm[0] * prop.multiProcessorCount, per_sm[1] * prop.multiProcessorCount};
  std::printf("copy bandwidth %.2f TB/s; us per launch (graph replays of 10), and the table's bytes over that time\n",
              bandwidth / 1e12);
  std::printf("%-26s %8s %8s %10s %10s\n", "table", "MB", "us", "TB/s read", "floor us");
  for (int round = 0; round < 3; ++round) {
    const float us[2] = {
        graph_us_per_launch(10, 15, [&](cudaStream_t s, int) {
          head<false><<<grid[0], kWarps * 32, 0, s>>>(w, nullptr, nullptr, x, logits_bf16);
        }),
        graph_us_per_launch(10, 15, [&](cudaStream_t s, int) {
          head<true><<<grid[1], kWarps * 32, 0, s>>>(sign_mantissa, offsets, base, x, logits_coded);
        })};
    const double bytes[2] = {2.0 * n, 1.5 * n + kVocab};
    const char* names[2] = {"bf16", "12-bit (1 B + 4 bits)"};
    for (int f = 0; f < 2; ++f)
      std::printf("%-26s %8.0f %8.1f %10.2f %10.1f\n", names[f], bytes[f] / 1e6, us[f], bytes[f] / (us[f] * 1e-6) / 1e12,
                  bytes[f] / bandwidth * 1e6);
  }
  std::vector<float> a(kVocab), b(kVocab);
  CHECK(cudaMemcpy(a.data(), logits_bf16, kVocab * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(b.data(), logits_coded, kVocab * sizeof(float), cudaMemcpyDeviceToHost));
  int clean = 0, differ = 0;
  for (int i = 0; i < kVocab; ++i)
    if (esc[i] == 0) ++clean, differ += a[i] != b[i];
  std::printf("rows without escapes: %d; their logits differing from the bf16 table's in any bit: %d\n", clean, differ);

  // tensor cores, m tokens: the tables tiled for the MMA, x rows in bf16 (row 0: the x above)
  constexpr int kMaxM = 64;
  uint16_t *bf16_tiles, *xb;
  uint8_t* sm_tiles;
  uint32_t* offset_tiles;
  float *mma_bf16_logits, *mma_coded_logits;
  CHECK(cudaMalloc(&bf16_tiles, n * 2));
  CHECK(cudaMalloc(&sm_tiles, n));
  CHECK(cudaMalloc(&offset_tiles, n / 2));
  CHECK(cudaMalloc(&xb, (size_t)kMaxM * kK * 2));
  CHECK(cudaMalloc(&mma_bf16_logits, (size_t)kMaxM * kVocab * sizeof(float)));
  CHECK(cudaMalloc(&mma_coded_logits, (size_t)kMaxM * kVocab * sizeof(float)));
  tile_tables<<<(unsigned)(((size_t)kTiles * kBlocks * 32 + 255) / 256), 256>>>(w, sign_mantissa, offsets, bf16_tiles,
                                                                            sm_tiles, offset_tiles);
  std::vector<float> xh(kK);
  CHECK(cudaMemcpy(xh.data(), x, kK * sizeof(float), cudaMemcpyDeviceToHost));
  std::vector<uint16_t> xbh((size_t)kMaxM * kK);
  for (int t = 0; t < kMaxM; ++t)
    for (int k = 0; k < kK; ++k) {
      float v = t == 0 ? xh[k] : xh[(k * 7 + t * 131) % kK] * (1.0f + 0.01f * t);
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      xbh[(size_t)t * kK + k] = (uint16_t)(bits >> 16);
    }
  CHECK(cudaMemcpy(xb, xbh.data(), xbh.size() * 2, cudaMemcpyHostToDevice));
  std::printf("tensor cores (mma.m16n8k16 bf16), x in bf16, m tokens in m-tiles of 16 or 32 (grid.y); us per launch,\n"
              "the table's bytes over that time, and logits of escape-free tiles differing in any bit\n");
  std::printf("%4s %6s %6s %14s %8s %12s %8s %8s\n", "m", "m-tile", "warps", "bf16 tiles us", "TB/s", "12-bit us", "TB/s",
              "differ");
  auto run = [&](auto bf16_kernel, auto coded_kernel, int mtile, int warps, int m) {
    const int nt = (std::min(m, mtile) + 7) / 8, smem = 8 * nt * kXStride * 2;
    CHECK(cudaFuncSetAttribute(bf16_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    CHECK(cudaFuncSetAttribute(coded_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, coded_kernel, warps * 32, smem));
    const int gy = (m + mtile - 1) / mtile;
    const dim3 g(std::max(1, per_sm * prop.multiProcessorCount / gy), gy);
    const float t_bf16 = graph_us_per_launch(10, 15, [&](cudaStream_t s, int) {
      bf16_kernel<<<g, warps * 32, smem, s>>>(bf16_tiles, nullptr, nullptr, xb, m, mma_bf16_logits);
    });
    const float t_coded = graph_us_per_launch(10, 15, [&](cudaStream_t s, int) {
      coded_kernel<<<g, warps * 32, smem, s>>>(sm_tiles, offset_tiles, base, xb, m, mma_coded_logits);
    });
    std::vector<float> lb((size_t)m * kVocab), lc((size_t)m * kVocab);
    CHECK(cudaMemcpy(lb.data(), mma_bf16_logits, lb.size() * 4, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(lc.data(), mma_coded_logits, lc.size() * 4, cudaMemcpyDeviceToHost));
    long long bad = 0;
    for (int t = 0; t < kTiles; ++t) {
      bool escapes = false;
      for (int r = 0; r < 16; ++r) escapes |= esc[16 * t + r] > 0;
      if (escapes) continue;
      for (int tok = 0; tok < m; ++tok)
        for (int r = 0; r < 16; ++r) bad += lb[(size_t)tok * kVocab + 16 * t + r] != lc[(size_t)tok * kVocab + 16 * t + r];
    }
    differ += (int)bad;
    std::printf("%4d %6d %6d %14.1f %8.2f %12.1f %8.2f %8lld\n", m, mtile, warps, t_bf16, 2.0 * n / (t_bf16 * 1e-6) / 1e12, t_coded,
                (1.5 * n + kVocab) / (t_coded * 1e-6) / 1e12, bad);
    if (m == 1) {  // the MMA kernel against the fma kernel: the same values (x row 0), another order
      double worst = 0;
      for (int i = 0; i < kVocab; ++i) worst = std::max(worst, (double)std::fabs(lb[i] - a[i]));
      std::printf("     m = 1: the MMA kernel against the fma kernel, largest |difference| %.3g\n", worst);
    }
  };
  for (int m : {1, 8, 16, 32, 64}) run(head_mma<false, 16, 8>, head_mma<true, 16, 8>, 16, 8, m);
  for (int m : {16, 32, 64}) run(head_mma<false, 16, 16>, head_mma<true, 16, 16>, 16, 16, m);
  for (int m : {32, 64}) run(head_mma<false, 32, 16>, head_mma<true, 32, 16>, 32, 16, m);
  return differ == 0 ? 0 : 1;
}
