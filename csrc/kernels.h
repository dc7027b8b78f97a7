// Host-side entry points of the W2A8 kernels. Plain pointers and CUDA types only: the .cu files
// compile without torch, and bindings.cpp is the one place that knows about tensors.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace bitnet {

// The tiled weight layout the GEMM reads (see w2a8_gemm.cu): 16 output rows x 128 inputs per
// 512-byte tile, 16 bytes per lane of a warp.
constexpr int kTileRows = 16;
constexpr int kChunkK = 128;
constexpr int kMaxSegments = 4;

// Fused projections (q|k|v, gate|up): output rows [end[i-1], end[i]) use scale[i].
struct Segments {
  int count;
  int end[kMaxSegments];
  float scale[kMaxSegments];
};

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kInt32 = 2 };

// Launch configuration of the GEMM; zeros mean "choose for me".
struct GemmConfig {
  int row_tiles_per_block;  // small-M kernel: 1, 2 or 4
  int warps;                // small-M kernel: 1..16, split the K dimension
  int kernel;               // 0 auto (by m), 1 small-M (w2a8_gemm.cu), 2 large-M (w2a8_gemm_large.cu)
  int large_tile;           // large-M block tile (tokens x rows): 1 128x256, 2 128x128, 3 64x128
  int large_splits;         // large-M: blocks (a cluster) sharing each tile's K, 1..kMaxSplits
  int unroll;               // small-M kernel: chunks per warp loaded at once, 2 or 4 (0: by shape)
};
constexpr int kMaxSplits = 4;

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// canonical packed codes uint8 [n, ceil(k/4)] -> tiled uint32 [ceil(n/16), ceil(k/128), 32, 4].
// *invalid (device int, zeroed by the caller) becomes nonzero if any 2-bit code is 3.
cudaError_t repack_ternary(const uint8_t* canonical, int n, int k, uint32_t* tiled, int* invalid,
                           cudaStream_t stream);

// out[m, n] = (x_q . W_t - ...) epilogue. x_q: int8 [m, k_stride] with k_stride = ceil(k/128)*128 and
// zeros past k. kInt32 writes the exact dot products; kFloat32 / kBFloat16 write
// acc * scale(row) / x_scale[m] (+ residual[m, n], same dtype as out), rounded once.
cudaError_t w2a8_gemm(const int8_t* x_q, const float* x_scale, int m, const uint32_t* tiled, int n, int k,
                      const Segments& segments, const void* residual, void* out, DType out_dtype,
                      GemmConfig config, cudaStream_t stream);

// The same for many tokens (prefill), on shared-memory tiles; w2a8_gemm sends it large m.
// tile, splits: 0 auto, else GemmConfig::large_tile, large_splits.
cudaError_t w2a8_gemm_large(const int8_t* x_q, const float* x_scale, int m, const uint32_t* tiled, int n, int k,
                            const Segments& segments, const void* residual, void* out, DType out_dtype, int tile,
                            int splits, cudaStream_t stream);

// x [m, k] (fp32 or bf16) -> x_q int8 [m, k_stride] (zero padded), scale fp32 [m]:
// scale = 127 * (1 / max(|x|, 1e-5)) (torch's 127 / t), x_q = clamp(rint(x * scale), -128, 127).
cudaError_t quantize_rows(const void* x, DType x_dtype, int m, int k, int k_stride, int8_t* x_q, float* scale,
                          cudaStream_t stream);

// The same applied to rmsnorm(x) * weight (weight in x's dtype), without rounding in between:
// mean of squares summed in fp64, 1 / sqrt(mean + eps) IEEE-rounded in fp32 (reciprocal of sqrt).
cudaError_t rmsnorm_quantize_rows(const void* x, const void* weight, DType x_dtype, int m, int k, int k_stride,
                                  float eps, int8_t* x_q, float* scale, cudaStream_t stream);

// rmsnorm(x) * weight rounded once to x's dtype (x, weight, out: [m, k] / [k] / [m, k] of dtype), the
// same numbers as rmsnorm_quantize_rows before its quantization: the final norm before the LM head.
cudaError_t rmsnorm_rows(const void* x, const void* weight, DType dtype, int m, int k, float eps, void* out,
                         cudaStream_t stream);

// ---- the decode step: RoPE + KV write, attention, MLP activation (decode.cu, decode_attention.cu) ----

// One layer's KV cache: k and v [slots, kv_heads, max_len, head_dim] each, contiguous, the activation dtype.
struct KVCacheLayer {
  void* k;
  void* v;
  int slots, kv_heads, max_len, head_dim;
};

// qkv [rows, (heads + 2 kv_heads) * head_dim] (q | k | v, dtype) -> roped q into q_out [rows, heads, head_dim];
// roped k and raw v into cache[slots[r], :, positions[r], :]. positions, slots: int64 [rows] on the device;
// cos, sin: fp32 [table_len, head_dim / 2]. RoPE is bit-exact with engine.ops.apply_rope (no FMA).
// A row whose position or slot is out of range writes nothing to the cache and zeros to q_out.
cudaError_t rope_kv_write(const void* qkv, DType dtype, int rows, int heads, const int64_t* positions,
                          const int64_t* slots, const float* cos, const float* sin, int table_len,
                          const KVCacheLayer& cache, void* q_out, cudaStream_t stream);

// The q|k|v projection with rope_kv_write in its epilogue (w2a8_gemm.cu, the small-M kernel): one
// launch, the same bits as w2a8_gemm (dtype output) then rope_kv_write, without the round trip of q|k|v
// through memory. RoPE rotates rows i and i + head_dim/2 of a head together; with head_dim a multiple
// of 32 they lie in row tiles head_dim/32 apart, which one block takes together, so both land in the
// same thread.
struct RopeKV {
  const int64_t* positions;  // [m] on the device
  const int64_t* slots;      // [m]
  const float* cos;          // fp32 [table_len, head_dim / 2]
  const float* sin;
  int table_len, heads;
  KVCacheLayer cache;
  void* q_out;  // [m, heads, head_dim] of dtype
};
constexpr int kRopeGemmMaxRows = 64;
// Whether w2a8_gemm_rope_kv takes m rows of this shape; otherwise w2a8_gemm then rope_kv_write.
bool w2a8_gemm_rope_kv_fits(int m, int heads, const KVCacheLayer& cache);
// x_q [m, k] . (q|k|v)^T with n = (heads + 2 kv_heads) * head_dim, segments q, k, v; dtype bf16 or fp32.
cudaError_t w2a8_gemm_rope_kv(const int8_t* x_q, const float* x_scale, int m, const uint32_t* tiled, int k,
                              const Segments& segments, DType dtype, const RopeKV& rope, GemmConfig config,
                              cudaStream_t stream);

// Flash decoding: every sequence's keys are cut into at most `splits` chunks (one block each, all G
// query heads of a kv head together), then combined. The grid depends on (batch, kv_heads, splits)
// only, never on the lengths held on the device. The default split count fills this GPU:
int decode_attention_splits(int batch, int heads, const KVCacheLayer& cache);
constexpr int kMaxAttentionSplits = 128;
// Scratch the two kernels share (partial outputs, maxima, sums, per-row counters, one row buffer).
size_t decode_attention_workspace_bytes(int batch, int heads, int head_dim, int splits);

// q [batch, heads, head_dim] (dtype); row b attends to cache entries 0 .. positions[b] of slot slots[b]
// (fp32 scores * head_dim^-0.5, softmax, weighted sum) -> out [batch, heads * head_dim], rounded once to
// dtype. A row whose position or slot is out of range gets zeros. head_dim even, <= 256.
cudaError_t decode_attention(const void* q, DType dtype, int batch, int heads, const int64_t* slots,
                             const int64_t* positions, const KVCacheLayer& cache, int splits, void* workspace,
                             void* out, cudaStream_t stream);

// The same, then each output row (rounded to dtype) through rmsnorm_quantize_rows with norm_weight
// [heads * head_dim] (dtype): x_q int8 [batch, k_stride], scale fp32 [batch]. Two launches.
cudaError_t decode_attention_rmsnorm_quantize(const void* q, DType dtype, int batch, int heads, const int64_t* slots,
                                              const int64_t* positions, const KVCacheLayer& cache, int splits,
                                              const void* norm_weight, float eps, int k_stride, void* workspace,
                                              int8_t* x_q, float* scale, cudaStream_t stream);

enum class Activation : int { kReLU2 = 0, kSiLU = 1 };

// gate_up [m, 2f] (gate | up, dtype) -> act(gate) * up in fp32 (relu^2: relu, square, times up, each
// IEEE-rounded), then exactly rmsnorm_quantize_rows with weight [f] (dtype): x_q [m, k_stride], scale [m].
cudaError_t act_rmsnorm_quantize_rows(const void* gate_up, const void* weight, DType dtype, Activation activation,
                                      int m, int f, int k_stride, float eps, int8_t* x_q, float* scale,
                                      cudaStream_t stream);

// ---- every layer of a decode step in one persistent kernel (decode_layers.cu) ----

// One layer's weights for decode_layers: projections in the tiled layout (repack_ternary), fused as
// the model fuses them, and the four RMSNorm gains (bf16).
struct DecodeLayer {
  const uint32_t* weight[4];  // q|k|v, o, gate|up, down
  Segments segments[4];
  const void* norm[4];  // input, attention sub-norm, post-attention, FFN sub-norm
};

struct DecodeShape {
  int layers, hidden, heads, kv_heads, head_dim, ffn;
  Activation activation;
  float eps;
};

// Why decode_layers cannot run this shape with m rows on this GPU, or nullptr if it can.
const char* decode_layers_unsupported(const DecodeShape& shape, int m);
// Scratch bytes decode_layers needs (activations between phases, attention partials).
size_t decode_layers_scratch_bytes(const DecodeShape& shape, int m, int cache_slots, int max_len);

// x_in [m, hidden] bf16 (the embeddings of one token per row) through every layer -> x_out [m, hidden]:
// the same bits as the op-by-op kernels (rmsnorm_quantize_rows, w2a8_gemm, rope_kv_write,
// decode_attention, act_rmsnorm_quantize_rows), the KV cache written the same way. layers: `layers`
// DecodeLayer structs in device memory; k_cache, v_cache: [layers, cache_slots, kv_heads, max_len,
// head_dim] bf16; barrier: one device counter, zero before the first launch, only ever incremented.
// One cooperative launch (one block per SM); nothing fixed but the shapes, so it replays in graphs.
cudaError_t decode_layers(const DecodeLayer* layers, const DecodeShape& shape, int m, const void* x_in, void* x_out,
                          const int64_t* positions, const int64_t* slots, const float* cos, const float* sin,
                          int table_len, void* k_cache, void* v_cache, int cache_slots, int max_len, void* scratch,
                          unsigned long long* barrier, unsigned long long* timeline, cudaStream_t stream);
// Blocks of a decode_layers launch, and its phases per layer. timeline (optional, for profiling):
// layers * kDecodePhases * 4 * blocks ns stamps [layer][phase][what][block]: each block's arrival at
// (0) and departure from (1) the barrier that ends the phase; in the GEMV phases, the end of the norm
// (2) and of the GEMV (3).
int decode_layers_blocks();
constexpr int kDecodePhases = 7;

// ---- the LM head as a stream of its table (lm_head.cu) ----

// Longest row the head kernel takes: one fp32 row of x must fit in its 96 KB of shared memory.
constexpr int kLmHeadMaxK = 24576;

// out[m, v] = scale[v] * sum_k x[m, k] * w[v, k]: x [m, k] (fp32 or bf16, contiguous), w int8 [v, k]
// row-major, scale fp32 [v], out fp32 [m, v]. fp32 products and sums in a fixed order per logit (it
// does not depend on m). Any m, v; 1 <= k <= kLmHeadMaxK. No allocation, no host sync.
cudaError_t lm_head_int8(const void* x, DType x_dtype, int m, int k, const int8_t* w, const float* scale, int v,
                         float* out, cudaStream_t stream);
// The same for a bf16 table [v, k] and no scale: out[m, v] = sum_k x[m, k] * w[v, k].
cudaError_t lm_head_bf16(const void* x, DType x_dtype, int m, int k, const void* w, int v, float* out,
                         cudaStream_t stream);

// ---- the greedy pick (argmax.cu) ----

// ids[r] = the index of row r's first largest value of logits fp32 [m, v] (as torch.argmax(dim=-1);
// -0 equals +0, a NaN beats everything). keys: scratch of m * ceil(v / argmax_chunk(v)) 64-bit words.
// Two launches; 1 <= m <= 65535.
int argmax_chunk(int v);
cudaError_t argmax_rows(const float* logits, int m, int v, unsigned long long* keys, int64_t* ids,
                        cudaStream_t stream);

}  // namespace bitnet
