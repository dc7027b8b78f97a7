// The thin torch binding of the kernels in this folder: checks arguments, allocates outputs, and
// calls the launchers of kernels.h on the current stream. No math here.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
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

// out [m, n] = x_q [m, k] . W^T, dequantized per segment (or raw int32 when out_dtype is int32)
Tensor gemm(const Tensor& x_q, const Tensor& x_scale, const Tensor& tiled, int64_t n, int64_t k,
            const std::vector<int64_t>& segment_ends, const std::vector<double>& segment_scales,
            const std::optional<Tensor>& residual, torch::ScalarType out_dtype, const std::optional<Tensor>& out,
            int64_t row_tiles_per_block, int64_t warps) {
  check_2d_cuda(x_q, "x_q");
  TORCH_CHECK(x_q.scalar_type() == torch::kInt8, "x_q must be int8");
  const int64_t m = x_q.size(0);
  TORCH_CHECK(m > 0, "x_q must not be empty");
  TORCH_CHECK(x_q.size(1) == k, "x_q has ", x_q.size(1), " features but the weight expects ", k);
  TORCH_CHECK(x_q.stride(1) == 1 && x_q.stride(0) == padded_k(k) && x_q.storage_offset() % 16 == 0,
              "x_q must come from engine.kernels.quantize (rows padded to ", padded_k(k), " bytes)");
  TORCH_CHECK(tiled.is_cuda() && tiled.scalar_type() == torch::kInt32 && tiled.is_contiguous() && tiled.dim() == 4 &&
                  tiled.size(0) == bitnet::ceil_div(n, bitnet::kTileRows) && tiled.size(1) == padded_k(k) / bitnet::kChunkK,
              "the tiled weight does not match a ", n, "x", k, " projection");
  TORCH_CHECK(x_q.device() == tiled.device(), "x_q and the weight are on different devices");
  TORCH_CHECK(x_scale.is_cuda() && x_scale.scalar_type() == torch::kFloat32 && x_scale.numel() == m && x_scale.is_contiguous(),
              "x_scale must be a contiguous fp32 CUDA tensor of ", m, " values");
  const int count = static_cast<int>(segment_ends.size());
  TORCH_CHECK(count >= 1 && count <= bitnet::kMaxSegments && segment_scales.size() == segment_ends.size(),
              "between 1 and ", bitnet::kMaxSegments, " segments, each with one scale");
  TORCH_CHECK(segment_ends.back() == n, "the segments must end at n = ", n);
  bitnet::Segments seg{};
  seg.count = count;
  for (int i = 0; i < count; ++i) {
    TORCH_CHECK(segment_ends[i] > (i ? segment_ends[i - 1] : 0), "segment ends must increase");
    seg.end[i] = static_cast<int>(segment_ends[i]);
    seg.scale[i] = static_cast<float>(segment_scales[i]);
  }
  bitnet::DType dtype;
  if (out_dtype == torch::kInt32) dtype = bitnet::DType::kInt32;
  else if (out_dtype == torch::kFloat32) dtype = bitnet::DType::kFloat32;
  else if (out_dtype == torch::kBFloat16) dtype = bitnet::DType::kBFloat16;
  else TORCH_CHECK(false, "out_dtype must be int32, float32 or bfloat16");
  const c10::cuda::CUDAGuard guard(x_q.device());
  Tensor y = out ? *out : torch::empty({m, n}, x_q.options().dtype(out_dtype));
  TORCH_CHECK(y.scalar_type() == out_dtype && y.is_contiguous() && y.size(0) == m && y.size(1) == n,
              "out must be a contiguous [", m, ", ", n, "] tensor of out_dtype");
  const void* res = nullptr;
  Tensor res_c;
  if (residual) {
    TORCH_CHECK(dtype != bitnet::DType::kInt32, "no residual with int32 output");
    TORCH_CHECK(residual->scalar_type() == out_dtype && residual->size(0) == m && residual->size(1) == n,
                "residual must be [", m, ", ", n, "] of out_dtype");
    res_c = residual->contiguous();
    res = res_c.data_ptr();
  }
  bitnet::GemmConfig cfg{static_cast<int>(row_tiles_per_block), static_cast<int>(warps)};
  check_cuda(bitnet::w2a8_gemm(x_q.data_ptr<int8_t>(), x_scale.data_ptr<float>(), m,
                               reinterpret_cast<const uint32_t*>(tiled.data_ptr<int>()), n, k, seg, res, y.data_ptr(),
                               dtype, cfg, c10::cuda::getCurrentCUDAStream()),
             "w2a8_gemm");
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "BitNet b1.58 W2A8 CUDA kernels (see csrc/kernels.h)";
  m.def("repack", &repack, "canonical 2-bit codes -> the GEMM's tiled layout", py::arg("codes"), py::arg("n"), py::arg("k"));
  m.def("quantize", &quantize, "per-row int8 quantization, optionally of rmsnorm(x) * weight", py::arg("x"),
        py::arg("weight") = py::none(), py::arg("eps") = 1e-5, py::arg("out_q") = py::none(),
        py::arg("out_scale") = py::none());
  m.def("gemm", &gemm, "W2A8 GEMM with the dequantizing epilogue", py::arg("x_q"), py::arg("x_scale"), py::arg("tiled"),
        py::arg("n"), py::arg("k"), py::arg("segment_ends"), py::arg("segment_scales"), py::arg("residual") = py::none(),
        py::arg("out_dtype") = torch::kBFloat16, py::arg("out") = py::none(), py::arg("row_tiles_per_block") = 0,
        py::arg("warps") = 0);
}
