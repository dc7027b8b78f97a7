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
// bf16 with head_dim 64 or 128 (the models' case) runs the split on the tensor cores
// (attention_split_mma_unit in decode_attention.cuh: each warp 16 keys at a time, its own online
// softmax, one merge of the warps at the end). H100, decode step at batch 1 / 8 / 16 / 64 (512
// tokens): 1,071 / 1,207 / 1,474 / 3,256 us against 1,119-1,125 / 1,341 / 1,645 / 3,504 for the
// SIMT split below.
//
// The SIMT split (fp32 and other head sizes; decode_layers.cu runs whichever of the two this file
// would, so its partials are the same): LPK lanes share a key row (16-byte loads of keys, values and
// queries for head_dim 64 / 128, scalar loads for any other even head_dim <= 256); keys come in tiles
// of threads / LPK * KPG rows whose K and V loads are all issued before the first use (blocks of 256
// threads when the grid fits two per SM, else 128: launch_split_vec). Scores go to shared memory,
// one warp per head updates the running softmax (log2 domain), then every lane accumulates p * v for
// the elements it owns.
//
// Combine kernel, grid (heads, batch): rescales the partials to the global max, divides by the total
// sum and rounds once to the activation dtype. The fused variant then counts finished heads per row;
// the last block of a row runs the attention sub-norm and int8 quantization on the rounded row with
// the same math as quantize.cu (quant_math.cuh), bit for bit.
//

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "decode_attention.cuh"
#include "kernels.h"
#include "launch.cuh"

namespace bitnet {
namespace {

using namespace attention;

template <typename T, int LPK, int EPL, bool kVec, int GT, int KPG, int Threads>
__global__ void __launch_bounds__(Threads) attention_split_kernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                                                                   const T* __restrict__ v_cache, SplitArgs a) {
  extern __shared__ float smem[];
  attention_split_unit<T, LPK, EPL, kVec, GT, KPG, Threads>(q, k_cache, v_cache, a, blockIdx.x, blockIdx.y, blockIdx.z,
                                                   threadIdx.x, smem, [] { __syncthreads(); }, true);
}

template <typename T, bool kNorm>
__global__ void __launch_bounds__(kCombineThreads) attention_combine_kernel(T* __restrict__ out, CombineArgs a) {
  extern __shared__ float s_row[];  // kNorm: the row and the norm weight, staged once in fp32
  attention_combine_unit<T, kNorm>(out, a, blockIdx.x, blockIdx.y, s_row, true);
}

template <int D, int GT, int W>
__global__ void __launch_bounds__(W * 32) attention_split_mma_kernel(const __nv_bfloat16* __restrict__ q,
                                                                     const __nv_bfloat16* __restrict__ k_cache,
                                                                     const __nv_bfloat16* __restrict__ v_cache,
                                                                     SplitArgs a) {
  extern __shared__ float smem[];
  attention_split_mma_unit<D, GT, W>(q, k_cache, v_cache, a, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, smem,
                                     [] { __syncthreads(); }, true);
}

template <int D, int GT, int W = kThreads / 32>
cudaError_t launch_split_mma(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                             const SplitArgs& args, int batch, cudaStream_t stream) {
  const size_t smem = mma_split_smem_floats<D, GT, W>() * sizeof(float);
  const dim3 grid(args.splits, args.kv_heads * args.passes, batch);
  return launch_pdl(attention_split_mma_kernel<D, GT, W>, grid, dim3(W * 32), smem, stream, batch, q, k, v, args);
}

template <typename T, int LPK, int EPL, bool kVec, int GT, int KPG, int Threads = kThreads>
cudaError_t launch_split(const T* q, const T* k, const T* v, const SplitArgs& args, int batch, cudaStream_t stream) {
  const size_t smem = split_smem_floats<LPK, GT, KPG, Threads>(args.head_dim) * sizeof(float);
  const dim3 grid(args.splits, args.kv_heads * args.passes, batch);
  return launch_pdl(attention_split_kernel<T, LPK, EPL, kVec, GT, KPG, Threads>, grid, dim3(Threads), smem, stream,
                    batch, q, k, v, args);
}

int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0)
    sms = 132;
  return sms;
}

// The vector layout's block (now fp32 only: bf16 takes the tensor-core split; the figures below are
// bf16's, measured before it): twice the threads, each holding half the keys of the same 64-key tile
// (faster where many blocks have keys: long contexts, batches of 8-16), when the grid fits
// kBlocksPerSm such blocks per SM (their registers allow it up to 4 query heads per pass: 128 a
// thread); else 128 threads, so that large grids (batch 64) still run in one wave. H100, decode step
// at batch 1 / 8 / 16: 1,172 / 1,820 / 1,648 us against 1,214 / 1,873 / 1,712 (2,048, 2,048 and 512
// tokens); batch 1-8 at 512 tokens within 5 us.
template <typename T, int LPK, int EPL, int GT>
cudaError_t launch_split_vec(const T* q, const T* k, const T* v, const SplitArgs& args, int batch, cudaStream_t stream) {
  constexpr int kWideKeys = 4;  // keys a thread holds in the wide block (8 in the narrow one)
  static const int wide_per_sm = [] {
    int per_sm = 0;
    const auto kernel = attention_split_kernel<T, LPK, EPL, true, GT, kWideKeys, kWideThreads>;
    const size_t smem = split_smem_floats<LPK, GT, kWideKeys, kWideThreads>(LPK * EPL) * sizeof(float);
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWideThreads, smem) == cudaSuccess ? per_sm : 0;
  }();
  const long long blocks = (long long)batch * args.kv_heads * args.passes * args.splits;
  if (wide_per_sm >= kBlocksPerSm && blocks <= (long long)kBlocksPerSm * sm_count())
    return launch_split<T, LPK, EPL, true, GT, kWideKeys, kWideThreads>(q, k, v, args, batch, stream);
  return launch_split<T, LPK, EPL, true, GT, 8>(q, k, v, args, batch, stream);
}

// Lanes per key row and elements per lane: 16-byte vectors for the common head sizes, else scalar.
template <typename T, int GT>
cudaError_t launch_split_for_head_dim(const T* q, const T* k, const T* v, const SplitArgs& args, int batch,
                                      cudaStream_t stream) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (mma_split_applies(q, k, v, args.head_dim)) {
      if (args.head_dim == 128) return launch_split_mma<128, GT>(q, k, v, args, batch, stream);
      return launch_split_mma<64, GT>(q, k, v, args, batch, stream);
    }
  }
  const bool aligned = reinterpret_cast<uintptr_t>(k) % 16 == 0 && reinterpret_cast<uintptr_t>(v) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(q) % 16 == 0;
  if (aligned) {
    constexpr int E = 16 / sizeof(T);  // elements per 16-byte vector
    if (args.head_dim == 128) return launch_split_vec<T, 128 / E, E, GT>(q, k, v, args, batch, stream);
    if (args.head_dim == 64) return launch_split_vec<T, 64 / E, E, GT>(q, k, v, args, batch, stream);
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
    return launch_pdl(attention_combine_kernel<T, true>, grid, dim3(kCombineThreads), smem, stream, batch,
                      static_cast<T*>(ws.row), ca);
  }
  return launch_pdl(attention_combine_kernel<T, false>, grid, dim3(kCombineThreads), 0, stream, batch, out, ca);
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
  const int group = cache.kv_heads > 0 ? heads / cache.kv_heads : 1;
  const int passes = ceil_div(group, heads_per_pass(group));
  const int blocks = batch * cache.kv_heads * passes;  // split-kernel blocks per split
  // as many splits as keep the grid within kBlocksPerSm blocks per SM (launch_split_vec; for the
  // tensor-core split, three per SM was slower at batches 2-16: README)
  int splits = blocks > 0 ? kBlocksPerSm * sm_count() / blocks : 1;
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
