// The thin torch binding of the kernels in this folder: checks arguments, allocates outputs, and
// calls the launchers of kernels.h on the current stream. No math here.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

using torch::Tensor;

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

bitnet::DType float_dtype(const Tensor& t, const char* name) {
  if (t.scalar_type() == torch::kBFloat16) return bitnet::DType::kBFloat16;
  if (t.scalar_type() == torch::kFloat32) return bitnet::DType::kFloat32;
  TORCH_CHECK(false, name, " must be bfloat16 or float32");
}

bitnet::Activation activation_of(const std::string& activation) {
  if (activation == "relu2") return bitnet::Activation::kReLU2;
  if (activation == "silu") return bitnet::Activation::kSiLU;
  TORCH_CHECK(false, "activation must be relu2 or silu, got ", activation);
}

int padded_k(int64_t k) { return bitnet::ceil_div(static_cast<int>(k), bitnet::kChunkK) * bitnet::kChunkK; }

void check_2d_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
}

// canonical codes uint8 [n, ceil(k/4)] -> tiled int32 [ceil(n/16), ceil(k/128), 32, 4]
Tensor repack(const Tensor& codes, int64_t n, int64_t k) {
  check_2d_cuda(codes, "codes");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8, "codes must be uint8");
  TORCH_CHECK(n > 0 && k > 0 && n < (1 << 30) && k < (1 << 30), "bad weight shape ", n, "x", k);
  TORCH_CHECK(codes.size(0) == n && codes.size(1) == (k + 3) / 4, "codes of shape [", codes.size(0), ", ",
              codes.size(1), "] cannot hold a ", n, "x", k, " weight (expected [", n, ", ", (k + 3) / 4, "])");
  const c10::cuda::CUDAGuard guard(codes.device());
  const Tensor src = codes.contiguous();
  auto opts = src.options().dtype(torch::kInt32);
  Tensor tiled = torch::empty({bitnet::ceil_div(n, bitnet::kTileRows), padded_k(k) / bitnet::kChunkK, 32, 4}, opts);
  Tensor invalid = torch::zeros({1}, opts);
  check_cuda(bitnet::repack_ternary(src.data_ptr<uint8_t>(), n, k, reinterpret_cast<uint32_t*>(tiled.data_ptr<int>()),
                                    invalid.data_ptr<int>(), c10::cuda::getCurrentCUDAStream()),
             "repack");
  TORCH_CHECK(invalid.item<int>() == 0, "packed weights hold the invalid 2-bit code 3; the checkpoint is corrupt");
  return tiled;
}

// x [m, k] -> (x_q int8 [m, k] viewed in a [m, ceil(k/128)*128] zero-padded buffer, scale fp32 [m])
std::vector<Tensor> quantize(const Tensor& x, const std::optional<Tensor>& weight, double eps,
                             const std::optional<Tensor>& out_q, const std::optional<Tensor>& out_scale) {
  check_2d_cuda(x, "x");
  const auto dtype = float_dtype(x, "x");
  const Tensor xc = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(m > 0 && k > 0, "x must not be empty");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor q = out_q ? *out_q : torch::empty({m, padded_k(k)}, x.options().dtype(torch::kInt8));
  Tensor s = out_scale ? *out_scale : torch::empty({m}, x.options().dtype(torch::kFloat32));
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.is_contiguous() && q.size(0) == m && q.size(1) == padded_k(k),
              "out_q must be a contiguous int8 [", m, ", ", padded_k(k), "] tensor");
  TORCH_CHECK(s.scalar_type() == torch::kFloat32 && s.is_contiguous() && s.numel() == m, "out_scale must be fp32 [m]");
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (weight) {
    TORCH_CHECK(weight->is_cuda() && weight->dim() == 1 && weight->size(0) == k && weight->scalar_type() == x.scalar_type(),
                "the norm weight must be a CUDA vector of ", k, " elements of x's dtype");
    const Tensor wc = weight->contiguous();
    check_cuda(bitnet::rmsnorm_quantize_rows(xc.data_ptr(), wc.data_ptr(), dtype, m, k, q.size(1),
                                             static_cast<float>(eps), q.data_ptr<int8_t>(), s.data_ptr<float>(), stream),
               "rmsnorm_quantize");
  } else {
    check_cuda(bitnet::quantize_rows(xc.data_ptr(), dtype, m, k, q.size(1), q.data_ptr<int8_t>(), s.data_ptr<float>(),
                                     stream),
               "quantize");
  }
  return {q.narrow(1, 0, k), s};
}

// rmsnorm(x [m, k]) * weight [k], rounded to x's dtype
Tensor rmsnorm(const Tensor& x, const Tensor& weight, double eps) {
  check_2d_cuda(x, "x");
  const auto dtype = float_dtype(x, "x");
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0 && x.size(0) < (1LL << 31) && x.size(1) < (1 << 30),
              "x must be a non-empty [m, k] tensor");
  TORCH_CHECK(weight.device() == x.device() && weight.dim() == 1 && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(),
              "the norm weight must be a vector of ", x.size(1), " elements of x's dtype on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous(), wc = weight.contiguous();
  Tensor out = torch::empty_like(xc);
  check_cuda(bitnet::rmsnorm_rows(xc.data_ptr(), wc.data_ptr(), dtype, static_cast<int>(x.size(0)),
                                  static_cast<int>(x.size(1)), static_cast<float>(eps), out.data_ptr(),
                                  c10::cuda::getCurrentCUDAStream()),
             "rmsnorm");
  return out;
}

bitnet::Segments segments_of(const std::vector<int64_t>& ends, const std::vector<double>& scales, int64_t n) {
  const int count = static_cast<int>(ends.size());
  TORCH_CHECK(count >= 1 && count <= bitnet::kMaxSegments && scales.size() == ends.size(),
              "between 1 and ", bitnet::kMaxSegments, " segments, each with one scale");
  TORCH_CHECK(ends.back() == n, "the segments must end at n = ", n);
  bitnet::Segments seg{};
  seg.count = count;
  for (int i = 0; i < count; ++i) {
    TORCH_CHECK(ends[i] > (i ? ends[i - 1] : 0), "segment ends must increase");
    seg.end[i] = static_cast<int>(ends[i]);
    seg.scale[i] = static_cast<float>(scales[i]);
  }
  return seg;
}

void check_tiled(const Tensor& tiled, int64_t n, int64_t k, const Tensor& like) {
  TORCH_CHECK(tiled.is_cuda() && tiled.scalar_type() == torch::kInt32 && tiled.is_contiguous() && tiled.dim() == 4 &&
                  tiled.size(0) == bitnet::ceil_div(n, bitnet::kTileRows) && tiled.size(1) == padded_k(k) / bitnet::kChunkK,
              "the tiled weight does not match a ", n, "x", k, " projection");
  TORCH_CHECK(like.device() == tiled.device(), "the input and the weight are on different devices");
}

// The output [m, n] (out, or a new tensor) and the residual's pointer, both of out_dtype.
std::pair<Tensor, Tensor> gemm_output(const Tensor& like, int64_t m, int64_t n, torch::ScalarType out_dtype,
                                      const std::optional<Tensor>& residual, const std::optional<Tensor>& out) {
  Tensor y = out ? *out : torch::empty({m, n}, like.options().dtype(out_dtype));
  TORCH_CHECK(y.scalar_type() == out_dtype && y.is_contiguous() && y.size(0) == m && y.size(1) == n &&
                  y.device() == like.device(),
              "out must be a contiguous [", m, ", ", n, "] tensor of out_dtype on ", like.device());
  Tensor res;
  if (residual) {
    TORCH_CHECK(out_dtype != torch::kInt32, "no residual with int32 output");
    TORCH_CHECK(residual->scalar_type() == out_dtype && residual->size(0) == m && residual->size(1) == n,
                "residual must be [", m, ", ", n, "] of out_dtype");
    res = residual->contiguous();
  }
  return {y, res};
}

// The GEMM's int8 input x_q [m, k] (from quantize) and its scales; returns m.
int64_t check_gemm_input(const Tensor& x_q, const Tensor& x_scale, const Tensor& tiled, int64_t n, int64_t k) {
  check_2d_cuda(x_q, "x_q");
  TORCH_CHECK(x_q.scalar_type() == torch::kInt8, "x_q must be int8");
  const int64_t m = x_q.size(0);
  TORCH_CHECK(m > 0, "x_q must not be empty");
  TORCH_CHECK(x_q.size(1) == k, "x_q has ", x_q.size(1), " features but the weight expects ", k);
  TORCH_CHECK(x_q.stride(1) == 1 && x_q.stride(0) == padded_k(k) && x_q.storage_offset() % 16 == 0,
              "x_q must come from engine.kernels.quantize (rows padded to ", padded_k(k), " bytes)");
  check_tiled(tiled, n, k, x_q);
  TORCH_CHECK(x_scale.is_cuda() && x_scale.scalar_type() == torch::kFloat32 && x_scale.numel() == m && x_scale.is_contiguous(),
              "x_scale must be a contiguous fp32 CUDA tensor of ", m, " values");
  return m;
}

// out [m, n] = x_q [m, k] . W^T, dequantized per segment (or raw int32 when out_dtype is int32)
Tensor gemm(const Tensor& x_q, const Tensor& x_scale, const Tensor& tiled, int64_t n, int64_t k,
            const std::vector<int64_t>& segment_ends, const std::vector<double>& segment_scales,
            const std::optional<Tensor>& residual, torch::ScalarType out_dtype, const std::optional<Tensor>& out,
            int64_t row_tiles_per_block, int64_t warps, int64_t kernel, int64_t large_tile, int64_t large_splits,
            int64_t unroll) {
  const int64_t m = check_gemm_input(x_q, x_scale, tiled, n, k);
  const bitnet::Segments seg = segments_of(segment_ends, segment_scales, n);
  bitnet::DType dtype;
  if (out_dtype == torch::kInt32) dtype = bitnet::DType::kInt32;
  else if (out_dtype == torch::kFloat32) dtype = bitnet::DType::kFloat32;
  else if (out_dtype == torch::kBFloat16) dtype = bitnet::DType::kBFloat16;
  else TORCH_CHECK(false, "out_dtype must be int32, float32 or bfloat16");
  const c10::cuda::CUDAGuard guard(x_q.device());
  auto [y, res] = gemm_output(x_q, m, n, out_dtype, residual, out);
  TORCH_CHECK(kernel >= 0 && kernel <= 2, "kernel must be 0 (auto), 1 (small-M) or 2 (large-M), got ", kernel);
  TORCH_CHECK(large_tile >= 0 && large_tile <= 3, "large_tile must be 0 (auto) or 1..3, got ", large_tile);
  TORCH_CHECK(large_splits >= 0 && large_splits <= bitnet::kMaxSplits, "large_splits must be 0 (auto) or 1..",
              bitnet::kMaxSplits, ", got ", large_splits);
  TORCH_CHECK(unroll == 0 || unroll == 2 || unroll == 4, "unroll must be 0 (by shape), 2 or 4, got ", unroll);
  bitnet::GemmConfig cfg{static_cast<int>(row_tiles_per_block), static_cast<int>(warps), static_cast<int>(kernel),
                         static_cast<int>(large_tile), static_cast<int>(large_splits), static_cast<int>(unroll)};
  check_cuda(bitnet::w2a8_gemm(x_q.data_ptr<int8_t>(), x_scale.data_ptr<float>(), m,
                               reinterpret_cast<const uint32_t*>(tiled.data_ptr<int>()), n, k, seg,
                               res.defined() ? res.data_ptr() : nullptr, y.data_ptr(), dtype, cfg,
                               c10::cuda::getCurrentCUDAStream()),
             "w2a8_gemm");
  return y;
}

// ---- decode step ----

void check_index_vector(const Tensor& t, int64_t n, const Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device() && t.scalar_type() == torch::kInt64 && t.dim() == 1 && t.size(0) == n &&
                  t.is_contiguous(),
              name, " must be a contiguous int64 vector of ", n, " values on ", like.device());
}

// one layer's k_cache / v_cache [slots, kv_heads, max_len, head_dim], contiguous, of `like`'s dtype and device
bitnet::KVCacheLayer cache_layer(const Tensor& k_cache, const Tensor& v_cache, const Tensor& like) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must both be [slots, kv_heads, max_len, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == like.scalar_type() && v_cache.scalar_type() == like.scalar_type() &&
                  k_cache.device() == like.device() && v_cache.device() == like.device(),
              "the caches must have the activations' dtype and device");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  for (int i = 0; i < 4; ++i) TORCH_CHECK(k_cache.size(i) > 0 && k_cache.size(i) < (1 << 30), "bad cache shape");
  return {k_cache.data_ptr(), v_cache.data_ptr(), static_cast<int>(k_cache.size(0)), static_cast<int>(k_cache.size(1)),
          static_cast<int>(k_cache.size(2)), static_cast<int>(k_cache.size(3))};
}

// positions, slots [rows] and the RoPE tables cos, sin [positions, d / 2] of rope_kv_write
void check_rope_inputs(const Tensor& positions, const Tensor& slots, const Tensor& cos, const Tensor& sin,
                       int64_t rows, int64_t d, const Tensor& like) {
  check_index_vector(positions, rows, like, "positions");
  check_index_vector(slots, rows, like, "slots");
  for (const Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->device() == like.device() && t->scalar_type() == torch::kFloat32 && t->dim() == 2 &&
                    t->size(1) == d / 2 && t->size(0) == cos.size(0) && t->size(0) > 0 && t->is_contiguous(),
                "cos and sin must be contiguous fp32 [positions, ", d / 2, "] tables on the activations' device");
}

// The roped q [rows, heads, d] of `like`'s dtype: out, or a new tensor
Tensor roped_q_output(const std::optional<Tensor>& out, int64_t rows, int64_t heads, int64_t d, const Tensor& like) {
  Tensor q = out ? *out : torch::empty({rows, heads, d}, like.options());
  TORCH_CHECK(q.scalar_type() == like.scalar_type() && q.device() == like.device() && q.is_contiguous() &&
                  q.numel() == rows * heads * d,
              "out must be a contiguous [", rows, ", ", heads, ", ", d, "] tensor of the activations' dtype");
  return q;
}

// qkv [rows, (heads + 2 kv_heads) * head_dim] -> roped q [rows, heads, head_dim]; roped k, v into the caches
Tensor rope_kv_write(const Tensor& qkv, const Tensor& positions, const Tensor& slots, const Tensor& cos,
                     const Tensor& sin, const Tensor& k_cache, const Tensor& v_cache, int64_t heads,
                     const std::optional<Tensor>& out) {
  check_2d_cuda(qkv, "qkv");
  const auto dtype = float_dtype(qkv, "qkv");
  TORCH_CHECK(qkv.is_contiguous(), "qkv must be contiguous");
  const bitnet::KVCacheLayer cache = cache_layer(k_cache, v_cache, qkv);
  const int64_t rows = qkv.size(0), d = cache.head_dim;
  TORCH_CHECK(rows > 0 && rows < (1LL << 31), "qkv must have between 1 and 2^31 - 1 rows");
  TORCH_CHECK(heads > 0 && d % 2 == 0 && qkv.size(1) == (heads + 2 * cache.kv_heads) * d, "qkv has ", qkv.size(1),
              " features, expected (", heads, " + 2 * ", cache.kv_heads, ") * ", d, " (even head_dim)");
  check_rope_inputs(positions, slots, cos, sin, rows, d, qkv);
  const c10::cuda::CUDAGuard guard(qkv.device());
  const Tensor q = roped_q_output(out, rows, heads, d, qkv);
  check_cuda(bitnet::rope_kv_write(qkv.data_ptr(), dtype, static_cast<int>(rows), static_cast<int>(heads),
                                   positions.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), cos.data_ptr<float>(),
                                   sin.data_ptr<float>(), static_cast<int>(std::min<int64_t>(cos.size(0), INT32_MAX)),
                                   cache, q.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "rope_kv_write");
  return q;
}

bool gemm_rope_kv_fits(int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  if (rows < 1 || rows > INT32_MAX || heads < 1 || heads > INT32_MAX || kv_heads < 1 || kv_heads > INT32_MAX ||
      head_dim < 1 || head_dim > INT32_MAX)
    return false;
  const bitnet::KVCacheLayer shape{nullptr, nullptr, 1, static_cast<int>(kv_heads), 1, static_cast<int>(head_dim)};
  return bitnet::w2a8_gemm_rope_kv_fits(static_cast<int>(rows), static_cast<int>(heads), shape);
}

// The q|k|v GEMM with rope_kv_write in its epilogue: x_q [rows, k] -> roped q [rows, heads, head_dim];
// roped k and v into the caches. The outputs have the caches' dtype (the activations').
Tensor gemm_rope_kv(const Tensor& x_q, const Tensor& x_scale, const Tensor& tiled, int64_t k,
                    const std::vector<int64_t>& segment_ends, const std::vector<double>& segment_scales,
                    const Tensor& positions, const Tensor& slots, const Tensor& cos, const Tensor& sin,
                    const Tensor& k_cache, const Tensor& v_cache, int64_t heads, const std::optional<Tensor>& out,
                    int64_t warps) {
  const Tensor& like = k_cache;
  const auto dtype = float_dtype(like, "k_cache");
  const bitnet::KVCacheLayer cache = cache_layer(k_cache, v_cache, like);
  TORCH_CHECK(k_cache.device() == x_q.device(), "the caches and x_q are on different devices");
  const int64_t d = cache.head_dim, n = (heads + 2 * cache.kv_heads) * d;
  TORCH_CHECK(heads > 0, "heads must be positive");
  const int64_t rows = check_gemm_input(x_q, x_scale, tiled, n, k);
  TORCH_CHECK(gemm_rope_kv_fits(rows, heads, cache.kv_heads, d), "the fused q|k|v + RoPE GEMM takes 1 to ",
              bitnet::kRopeGemmMaxRows, " rows and a head_dim that is a multiple of 32; got ", rows, " rows and ", d,
              " (use gemm, then rope_kv_write)");
  const bitnet::Segments seg = segments_of(segment_ends, segment_scales, n);
  check_rope_inputs(positions, slots, cos, sin, rows, d, like);
  const c10::cuda::CUDAGuard guard(x_q.device());
  const Tensor q = roped_q_output(out, rows, heads, d, like);
  const bitnet::RopeKV rope{positions.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), cos.data_ptr<float>(),
                            sin.data_ptr<float>(), static_cast<int>(std::min<int64_t>(cos.size(0), INT32_MAX)),
                            static_cast<int>(heads), cache, q.data_ptr()};
  const bitnet::GemmConfig cfg{0, static_cast<int>(warps), 1, 0, 0};
  check_cuda(bitnet::w2a8_gemm_rope_kv(x_q.data_ptr<int8_t>(), x_scale.data_ptr<float>(), static_cast<int>(rows),
                                       reinterpret_cast<const uint32_t*>(tiled.data_ptr<int>()), static_cast<int>(k),
                                       seg, dtype, rope, cfg, c10::cuda::getCurrentCUDAStream()),
             "w2a8_gemm_rope_kv");
  return q;
}

// q [batch, heads, head_dim] over the caches -> [out [batch, heads * head_dim]], or with norm_weight
// [x_q int8 [batch, heads * head_dim] in the GEMM's padded rows, scale fp32 [batch]]
std::vector<Tensor> decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& slots,
                                     const Tensor& positions, const std::optional<Tensor>& norm_weight, double eps,
                                     int64_t splits) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.is_contiguous(), "q must be a contiguous CUDA [batch, heads, head_dim] tensor");
  const auto dtype = float_dtype(q, "q");
  const bitnet::KVCacheLayer cache = cache_layer(k_cache, v_cache, q);
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2);
  TORCH_CHECK(d == cache.head_dim, "q has head_dim ", d, " but the cache ", cache.head_dim);
  TORCH_CHECK(d % 2 == 0 && d <= 256, "head_dim must be even and at most 256, got ", d);
  TORCH_CHECK(batch > 0 && batch <= 65535 && heads > 0 && heads <= 65535 && heads % cache.kv_heads == 0,
              "q must have 1..65535 rows and a multiple of the ", cache.kv_heads, " kv heads, got [", batch, ", ", heads, "]");
  check_index_vector(slots, batch, q, "slots");
  check_index_vector(positions, batch, q, "positions");
  TORCH_CHECK(splits >= 0 && splits <= bitnet::kMaxAttentionSplits, "splits must be 0 (choose) or 1..",
              bitnet::kMaxAttentionSplits);
  const c10::cuda::CUDAGuard guard(q.device());
  const int b = static_cast<int>(batch), h = static_cast<int>(heads);
  const int n_splits = splits > 0 ? static_cast<int>(splits) : bitnet::decode_attention_splits(b, h, cache);
  Tensor workspace = torch::empty({static_cast<int64_t>(bitnet::decode_attention_workspace_bytes(b, h, cache.head_dim, n_splits))},
                                  q.options().dtype(torch::kUInt8));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* pos = positions.data_ptr<int64_t>();
  const auto* slot = slots.data_ptr<int64_t>();
  if (!norm_weight) {
    Tensor out = torch::empty({batch, heads * d}, q.options());
    check_cuda(bitnet::decode_attention(q.data_ptr(), dtype, b, h, slot, pos, cache, n_splits, workspace.data_ptr(),
                                        out.data_ptr(), stream),
               "decode_attention");
    return {out};
  }
  const int64_t k = heads * d;
  TORCH_CHECK(norm_weight->device() == q.device() && norm_weight->dim() == 1 && norm_weight->size(0) == k &&
                  norm_weight->scalar_type() == q.scalar_type(),
              "the norm weight must be a vector of ", k, " elements of q's dtype on q's device");
  const Tensor wc = norm_weight->contiguous();
  Tensor x_q = torch::empty({batch, padded_k(k)}, q.options().dtype(torch::kInt8));
  Tensor scale = torch::empty({batch}, q.options().dtype(torch::kFloat32));
  check_cuda(bitnet::decode_attention_rmsnorm_quantize(q.data_ptr(), dtype, b, h, slot, pos, cache, n_splits,
                                                       wc.data_ptr(), static_cast<float>(eps), static_cast<int>(x_q.size(1)),
                                                       workspace.data_ptr(), x_q.data_ptr<int8_t>(),
                                                       scale.data_ptr<float>(), stream),
             "decode_attention_rmsnorm_quantize");
  return {x_q.narrow(1, 0, k), scale};
}

// gate_up [m, 2f] -> (x_q int8 [m, f] in the GEMM's padded rows, scale fp32 [m]) of rmsnorm(act(gate) * up) * weight
std::vector<Tensor> act_norm_quant(const Tensor& gate_up, const Tensor& weight, double eps,
                                   const std::string& activation) {
  check_2d_cuda(gate_up, "gate_up");
  const auto dtype = float_dtype(gate_up, "gate_up");
  TORCH_CHECK(gate_up.is_contiguous(), "gate_up must be contiguous");
  const int64_t m = gate_up.size(0), f = gate_up.size(1) / 2;
  TORCH_CHECK(m > 0 && m < (1LL << 31) && f > 0 && gate_up.size(1) == 2 * f && f < (1 << 30),
              "gate_up must be a non-empty [m, 2f] tensor");
  TORCH_CHECK(weight.device() == gate_up.device() && weight.dim() == 1 && weight.size(0) == f &&
                  weight.scalar_type() == gate_up.scalar_type(),
              "the norm weight must be a vector of ", f, " elements of gate_up's dtype on its device");
  const bitnet::Activation act = activation_of(activation);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const Tensor wc = weight.contiguous();
  Tensor x_q = torch::empty({m, padded_k(f)}, gate_up.options().dtype(torch::kInt8));
  Tensor scale = torch::empty({m}, gate_up.options().dtype(torch::kFloat32));
  check_cuda(bitnet::act_rmsnorm_quantize_rows(gate_up.data_ptr(), wc.data_ptr(), dtype, act, static_cast<int>(m),
                                               static_cast<int>(f), static_cast<int>(x_q.size(1)),
                                               static_cast<float>(eps), x_q.data_ptr<int8_t>(),
                                               scale.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
             "act_norm_quant");
  return {x_q.narrow(1, 0, f), scale};
}

// ---- the LM head as a stream of its table ----

// logits fp32 [m, V] = (x [m, k] . table [V, k]^T) * scale [V]: table int8 with fp32 scales, or bf16
// with none
Tensor lm_head(const Tensor& x, const Tensor& table, const std::optional<Tensor>& scale,
               const std::optional<Tensor>& out) {
  check_2d_cuda(x, "x");
  const auto dtype = float_dtype(x, "x");
  check_2d_cuda(table, "table");
  const bool int8 = table.scalar_type() == torch::kInt8;
  TORCH_CHECK((int8 || table.scalar_type() == torch::kBFloat16) && table.is_contiguous(),
              "the head table must be a contiguous int8 or bf16 tensor");
  TORCH_CHECK(int8 == scale.has_value(), int8 ? "an int8 head table needs its scales" : "a bf16 head table takes no scales");
  const int64_t m = x.size(0), k = x.size(1), v = table.size(0);
  TORCH_CHECK(m > 0 && k > 0 && v > 0, "x and the head table must not be empty");
  TORCH_CHECK(table.size(1) == k, "x has ", k, " features but the head's rows have ", table.size(1));
  TORCH_CHECK(k <= bitnet::kLmHeadMaxK, "the head kernel takes rows of at most ", bitnet::kLmHeadMaxK, " features, got ", k);
  TORCH_CHECK(m < (1LL << 31) && v < (1LL << 31), "x or the head table has too many rows");
  TORCH_CHECK(x.device() == table.device(), "x and the head table are on different devices");
  if (int8)
    TORCH_CHECK(scale->device() == x.device() && scale->scalar_type() == torch::kFloat32 && scale->dim() == 1 &&
                    scale->size(0) == v && scale->is_contiguous(),
                "scale must be a contiguous fp32 vector of ", v, " values on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous();
  Tensor y = out ? *out : torch::empty({m, v}, x.options().dtype(torch::kFloat32));
  TORCH_CHECK(y.device() == x.device() && y.scalar_type() == torch::kFloat32 && y.is_contiguous() && y.dim() == 2 &&
                  y.size(0) == m && y.size(1) == v,
              "out must be a contiguous fp32 [", m, ", ", v, "] tensor on x's device");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (int8)
    check_cuda(bitnet::lm_head_int8(xc.data_ptr(), dtype, static_cast<int>(m), static_cast<int>(k),
                                    table.data_ptr<int8_t>(), scale->data_ptr<float>(), static_cast<int>(v),
                                    y.data_ptr<float>(), stream),
               "lm_head_int8");
  else
    check_cuda(bitnet::lm_head_bf16(xc.data_ptr(), dtype, static_cast<int>(m), static_cast<int>(k),
                                    table.data_ptr(), static_cast<int>(v), y.data_ptr<float>(), stream),
               "lm_head_bf16");
  return y;
}


// ---- the greedy pick ----

// logits fp32 [m, v] -> int64 [m], each row's first largest value's index (torch.argmax(dim=-1))
Tensor argmax_rows(const Tensor& logits) {
  check_2d_cuda(logits, "logits");
  TORCH_CHECK(logits.scalar_type() == torch::kFloat32, "logits must be fp32, got ", logits.scalar_type());
  const int64_t m = logits.size(0), v = logits.size(1);
  TORCH_CHECK(m > 0 && v > 0, "logits must not be empty");
  TORCH_CHECK(m <= 65535 && v < (1LL << 31), "logits of ", m, " rows of ", v, " values are too many for the kernel");
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor x = logits.contiguous();
  const int64_t chunk = bitnet::argmax_chunk(static_cast<int>(v)), chunks = (v + chunk - 1) / chunk;
  Tensor keys = torch::empty({m, chunks}, x.options().dtype(torch::kInt64));
  Tensor ids = torch::empty({m}, x.options().dtype(torch::kInt64));
  check_cuda(bitnet::argmax_rows(x.data_ptr<float>(), static_cast<int>(m), static_cast<int>(v),
                                 reinterpret_cast<unsigned long long*>(keys.data_ptr<int64_t>()),
                                 ids.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()),
             "argmax_rows");
  return ids;
}


bitnet::DecodeShape decode_shape(int64_t layers, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                 int64_t ffn, const std::string& activation, double eps) {
  for (int64_t v : {layers, hidden, heads, kv_heads, head_dim, ffn})
    TORCH_CHECK(v > 0 && v < (1 << 30), "bad model shape");
  return {static_cast<int>(layers), static_cast<int>(hidden), static_cast<int>(heads), static_cast<int>(kv_heads),
          static_cast<int>(head_dim), static_cast<int>(ffn), activation_of(activation), static_cast<float>(eps)};
}

// Why the fused decode kernel cannot take this model with m rows here ("" if it can).
std::string decode_layers_unsupported(int64_t layers, int64_t hidden, int64_t heads, int64_t kv_heads,
                                      int64_t head_dim, int64_t ffn, const std::string& activation, int64_t m) {
  const char* why = bitnet::decode_layers_unsupported(
      decode_shape(layers, hidden, heads, kv_heads, head_dim, ffn, activation, 1e-5), static_cast<int>(m));
  return why == nullptr ? "" : why;
}

// Per layer, 4 projections (q|k|v, o, gate|up, down: tiled weights, segment ends and scales) and 4
// bf16 norm gains -> the DecodeLayer table decode_layers reads, as bytes on the weights' device.
// The table points into those tensors: the caller keeps them alive.
Tensor decode_layer_table(const std::vector<Tensor>& weights, const std::vector<std::vector<int64_t>>& ends,
                          const std::vector<std::vector<double>>& scales, const std::vector<Tensor>& norms) {
  const size_t layers = weights.size() / 4;
  TORCH_CHECK(layers > 0 && weights.size() == 4 * layers && ends.size() == weights.size() &&
                  scales.size() == weights.size() && norms.size() == weights.size(),
              "need 4 projections and 4 norms per layer");
  std::vector<bitnet::DecodeLayer> table(layers);
  for (size_t i = 0; i < weights.size(); ++i) {
    const Tensor& w = weights[i];
    const Tensor& g = norms[i];
    TORCH_CHECK(w.is_cuda() && w.scalar_type() == torch::kInt32 && w.is_contiguous() && w.dim() == 4,
                "projection weights must be contiguous tiled int32 CUDA tensors (repack)");
    TORCH_CHECK(g.device() == w.device() && g.scalar_type() == torch::kBFloat16 && g.is_contiguous() && g.dim() == 1,
                "norm gains must be contiguous bf16 vectors on the weights' device");
    TORCH_CHECK(!ends[i].empty() && ends[i].size() <= bitnet::kMaxSegments && ends[i].size() == scales[i].size(),
                "each projection needs 1 to ", bitnet::kMaxSegments, " segments with one scale each");
    bitnet::DecodeLayer& layer = table[i / 4];
    layer.weight[i % 4] = reinterpret_cast<const uint32_t*>(w.data_ptr<int>());
    layer.norm[i % 4] = g.data_ptr();
    bitnet::Segments& seg = layer.segments[i % 4];
    seg = {};
    seg.count = static_cast<int>(ends[i].size());
    for (int j = 0; j < seg.count; ++j) {
      seg.end[j] = static_cast<int>(ends[i][j]);
      seg.scale[j] = static_cast<float>(scales[i][j]);
    }
  }
  Tensor bytes = torch::empty({static_cast<int64_t>(layers * sizeof(bitnet::DecodeLayer))}, torch::kUInt8);
  std::memcpy(bytes.data_ptr(), table.data(), bytes.numel());
  return bytes.to(weights[0].device());
}

// x [m, hidden] bf16 through every layer (decode_layers.cu) -> [m, hidden]; caches [layers, slots,
// kv_heads, max_len, head_dim]; barrier: int64 [1], zero at first, owned by the caller for all its launches.
Tensor decode_layers(const Tensor& table, const Tensor& x, const Tensor& positions, const Tensor& slots,
                     const Tensor& cos, const Tensor& sin, const Tensor& k_cache, const Tensor& v_cache,
                     int64_t heads, int64_t ffn, const std::string& activation, double eps, const Tensor& barrier,
                     const std::optional<Tensor>& timeline) {
  check_2d_cuda(x, "x");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16");
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == torch::kBFloat16 &&
                  v_cache.scalar_type() == torch::kBFloat16 && k_cache.device() == x.device() &&
                  v_cache.device() == x.device(),
              "the caches must be contiguous bf16 [layers, slots, kv_heads, max_len, head_dim] on x's device");
  const int64_t m = x.size(0);
  const bitnet::DecodeShape shape = decode_shape(k_cache.size(0), x.size(1), heads, k_cache.size(2), k_cache.size(4),
                                                 ffn, activation, eps);
  const char* why = bitnet::decode_layers_unsupported(shape, static_cast<int>(m));
  TORCH_CHECK(why == nullptr, "decode_layers cannot run this model: ", why);
  TORCH_CHECK(table.device() == x.device() && table.scalar_type() == torch::kUInt8 &&
                  table.numel() == static_cast<int64_t>(shape.layers * sizeof(bitnet::DecodeLayer)),
              "the layer table must be decode_layer_table's bytes for ", shape.layers, " layers, on x's device");
  check_index_vector(slots, m, x, "slots");
  check_index_vector(positions, m, x, "positions");
  TORCH_CHECK(cos.is_cuda() && sin.is_cuda() && cos.scalar_type() == torch::kFloat32 && cos.sizes() == sin.sizes() &&
                  cos.dim() == 2 && cos.size(1) == shape.head_dim / 2 && cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be contiguous fp32 [positions, head_dim / 2] CUDA tables");
  TORCH_CHECK(barrier.device() == x.device() && barrier.scalar_type() == torch::kInt64 && barrier.numel() == 1,
              "barrier must be an int64 [1] tensor on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  if (timeline)
    TORCH_CHECK(timeline->device() == x.device() && timeline->scalar_type() == torch::kInt64 &&
                    timeline->is_contiguous() &&
                    timeline->numel() == int64_t{shape.layers} * bitnet::kDecodePhases * 4 * bitnet::decode_layers_blocks(),
                "timeline must be a contiguous int64 [layers, ", bitnet::kDecodePhases, ", 4, ",
                bitnet::decode_layers_blocks(), "] tensor on x's device");
  const int cache_slots = static_cast<int>(k_cache.size(1)), max_len = static_cast<int>(k_cache.size(3));
  Tensor scratch = torch::empty(
      {static_cast<int64_t>(bitnet::decode_layers_scratch_bytes(shape, static_cast<int>(m), cache_slots, max_len))},
      x.options().dtype(torch::kUInt8));
  Tensor out = torch::empty_like(x);
  check_cuda(bitnet::decode_layers(reinterpret_cast<const bitnet::DecodeLayer*>(table.data_ptr()), shape,
                                   static_cast<int>(m), x.data_ptr(), out.data_ptr(), positions.data_ptr<int64_t>(),
                                   slots.data_ptr<int64_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                                   static_cast<int>(std::min<int64_t>(cos.size(0), INT32_MAX)), k_cache.data_ptr(),
                                   v_cache.data_ptr(), cache_slots, max_len, scratch.data_ptr(),
                                   reinterpret_cast<unsigned long long*>(barrier.data_ptr<int64_t>()),
                                   timeline ? reinterpret_cast<unsigned long long*>(timeline->data_ptr<int64_t>()) : nullptr,
                                   c10::cuda::getCurrentCUDAStream()),
             "decode_layers");
  return out;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "BitNet b1.58 W2A8 CUDA kernels (see csrc/kernels.h)";
  m.def("rope_kv_write", &rope_kv_write, "RoPE of q and k, k and v written into the KV cache", py::arg("qkv"),
        py::arg("positions"), py::arg("slots"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("heads"), py::arg("out") = py::none());
  m.def("gemm_rope_kv_fits", &gemm_rope_kv_fits, "whether gemm_rope_kv takes this many rows of this shape",
        py::arg("rows"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"));
  m.def("gemm_rope_kv", &gemm_rope_kv, "the q|k|v W2A8 GEMM with RoPE and the KV-cache write in its epilogue",
        py::arg("x_q"), py::arg("x_scale"), py::arg("tiled"), py::arg("k"), py::arg("segment_ends"),
        py::arg("segment_scales"), py::arg("positions"), py::arg("slots"), py::arg("cos"), py::arg("sin"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("heads"), py::arg("out") = py::none(), py::arg("warps") = 0);
  m.def("decode_attention", &decode_attention, "one-token attention over the KV cache, optionally + sub-norm + quant",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("positions"),
        py::arg("norm_weight") = py::none(), py::arg("eps") = 1e-5, py::arg("splits") = 0);
  m.def("act_norm_quant", &act_norm_quant, "act(gate) * up, RMSNorm and int8 quantization", py::arg("gate_up"),
        py::arg("weight"), py::arg("eps"), py::arg("activation"));
  m.def("lm_head", &lm_head, "the LM head: fp32 logits of x against int8 rows with fp32 scales, or bf16 rows",
        py::arg("x"), py::arg("table"), py::arg("scale") = py::none(), py::arg("out") = py::none());
  m.def("argmax_rows", &argmax_rows, "each row's first largest value's index (torch.argmax(dim=-1))",
        py::arg("logits"));
  m.def("decode_layer_table", &decode_layer_table, "the per-layer weight table of decode_layers", py::arg("weights"),
        py::arg("ends"), py::arg("scales"), py::arg("norms"));
  m.def("decode_layers_unsupported", &decode_layers_unsupported, "why decode_layers cannot run a model ('' if it can)",
        py::arg("layers"), py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("ffn"),
        py::arg("activation"), py::arg("m"));
  m.def("decode_layers", &decode_layers, "every layer of a decode step in one persistent kernel", py::arg("table"),
        py::arg("x"), py::arg("positions"), py::arg("slots"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("heads"), py::arg("ffn"), py::arg("activation"), py::arg("eps"), py::arg("barrier"),
        py::arg("timeline") = py::none());
  m.def("decode_layers_blocks", &bitnet::decode_layers_blocks, "blocks of a decode_layers launch (one per SM)");
  m.def("repack", &repack, "canonical 2-bit codes -> the GEMM's tiled layout", py::arg("codes"), py::arg("n"), py::arg("k"));
  m.def("quantize", &quantize, "per-row int8 quantization, optionally of rmsnorm(x) * weight", py::arg("x"),
        py::arg("weight") = py::none(), py::arg("eps") = 1e-5, py::arg("out_q") = py::none(),
        py::arg("out_scale") = py::none());
  m.def("rmsnorm", &rmsnorm, "RMSNorm rounded to x's dtype", py::arg("x"), py::arg("weight"), py::arg("eps") = 1e-5);
  m.def("gemm", &gemm, "W2A8 GEMM with the dequantizing epilogue", py::arg("x_q"), py::arg("x_scale"), py::arg("tiled"),
        py::arg("n"), py::arg("k"), py::arg("segment_ends"), py::arg("segment_scales"), py::arg("residual") = py::none(),
        py::arg("out_dtype") = torch::kBFloat16, py::arg("out") = py::none(), py::arg("row_tiles_per_block") = 0,
        py::arg("warps") = 0, py::arg("kernel") = 0, py::arg("large_tile") = 0,
        py::arg("large_splits") = 0, py::arg("unroll") = 0);

}
