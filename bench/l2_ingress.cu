// How long SMs take to pull bytes that sit in L2 into themselves: the cost under the GEMV's activation
// reads (every block of a launch reads the same activation rows) and under any plan to stage them.
// Each launch: `blocks` blocks of 512 threads, each pulling `bytes` either by 16-byte loads through L2
// (ld.global.cg) or by bulk copies into shared memory (TMA, cp.async.bulk, Hopper), from one buffer
// that every block reads ("same") or from a slice of its own ("distinct"); and, built for sm_90a, the
// bulk copies multicast to the blocks of a 2- or 4-block cluster, each block copying its share once
// for all of them. Launches are chained in one CUDA graph (each after the one before, no PDL); the
// empty kernel's time is the launch alone, the rest is the pull.
// Standalone (no torch):
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a bench/l2_ingress.cu -o l2_ingress && ./l2_ingress
#include <cstdint>
#include <cstdio>

#include "graph_timing.cuh"

enum Mode { kEmpty, kLoadsSame, kLoadsDistinct, kBulkSame, kBulkDistinct, kBulkMulticast };
const char* const kModeNames[] = {"empty", "loads, same", "loads, distinct", "bulk, same", "bulk, distinct",
                                  "bulk multicast"};
constexpr int kThreads = 512;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kPiece = 8192;  // bytes per bulk copy

__device__ __forceinline__ uint32_t smem_address(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// Every piece of `bytes` into smem, completed on `bar`; piece j is issued by block rank j % CL of the
// cluster (multicast to all CL blocks when CL > 1).
template <int CL>
__device__ void bulk_pull(const uint8_t* src, int bytes, uint8_t* smem, uint64_t* bar) {
  const uint32_t b = smem_address(bar);
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\nfence.mbarrier_init.release.cluster;" ::"r"(b) : "memory");
  }
  __syncthreads();
  unsigned rank = 0;
  if constexpr (CL > 1) {
    // every block's barrier exists before a peer's copy lands on it
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  }
  if (threadIdx.x == 0) asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(bytes) : "memory");
  const int pieces = (bytes + kPiece - 1) / kPiece;
  for (int j = threadIdx.x * CL + rank; j < pieces; j += blockDim.x * CL) {
    const int len = min(kPiece, bytes - j * kPiece);
    const uint32_t dst = smem_address(smem + (size_t)j * kPiece);
    if constexpr (CL > 1) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1], %2, [%3], %4;"
          ::"r"(dst), "l"(src + (size_t)j * kPiece), "r"(len), "r"(b), "h"((uint16_t)((1u << CL) - 1)) : "memory");
#endif
    } else {
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(dst), "l"(src + (size_t)j * kPiece), "r"(len), "r"(b) : "memory");
    }
  }
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], 0;\n@!done bra WAIT_%=;\n}"
      ::"r"(b) : "memory");
  if constexpr (CL > 1) {  // no block leaves while a peer's copy may still write into it
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  }
}
#endif

template <int CL>
__global__ void __launch_bounds__(kThreads) pull(Mode mode, const uint8_t* __restrict__ src, int bytes, uint32_t* out) {
  if (mode == kEmpty) return;
  uint32_t x = 0;
  if (mode == kLoadsSame || mode == kLoadsDistinct) {
    const uint4* p = reinterpret_cast<const uint4*>(src + (mode == kLoadsDistinct ? (size_t)blockIdx.x * bytes : 0));
    const int n = bytes / 16;
    constexpr int kInFlight = 16;
    for (int base = threadIdx.x; base < n; base += blockDim.x * kInFlight) {
      uint4 v[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int i = base + u * blockDim.x;
        v[u] = i < n ? __ldcg(p + i) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) x ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ __align__(8) uint64_t bar;
    bulk_pull<CL>(src + (mode == kBulkDistinct ? (size_t)blockIdx.x * bytes : 0), bytes, smem, &bar);
    x = reinterpret_cast<const uint32_t*>(smem)[threadIdx.x];
#endif
  }
  if (x == 0x12345678u) out[blockIdx.x] = x;  // never true (the buffer holds 0x01 bytes): keeps the loads
}

__global__ void multicast_built(int* flag) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *flag = 1;
#endif
}

template <int CL>
float us_per_launch(Mode mode, int blocks, int bytes, const uint8_t* src, uint32_t* out) {
  const size_t smem = mode >= kBulkSame ? (size_t)bytes : 0;
  CHECK(cudaFuncSetAttribute(pull<CL>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  return graph_us_per_launch(400, 9, [&](cudaStream_t stream, int) {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(blocks);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = CL;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = CL > 1 ? 1 : 0;
    CHECK(cudaLaunchKernelEx(&config, pull<CL>, mode, src, bytes, out));
  });
}

void row(const char* mode, int cluster, int blocks, int bytes, float us, float empty) {
  const float pull = us - empty;
  std::printf("%-16s %7d %6d %7.1f %7.2f %8.2f %9.1f %9.2f\n", mode, cluster, blocks, bytes / 1024.0, us, pull,
              bytes / (pull * 1e3), (double)blocks * bytes / (pull * 1e6));
}

int main() {
  cudaDeviceProp prop;
  int device = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaGetDeviceProperties(&prop, device));
  const int sms = prop.multiProcessorCount, block_counts[] = {80, sms};
  const int sizes[] = {27 * 1024, 54 * 1024, 108 * 1024};
  uint8_t* src;
  uint32_t* out;
  int* flag;
  const size_t total = (size_t)sms * sizes[2];
  CHECK(cudaMalloc(&src, total));
  CHECK(cudaMemset(src, 1, total));  // under 50 MB: it stays in L2 from launch to launch
  CHECK(cudaMalloc(&out, sms * sizeof(uint32_t)));
  CHECK(cudaMalloc(&flag, sizeof(int)));
  CHECK(cudaMemset(flag, 0, sizeof(int)));
  multicast_built<<<1, 1>>>(flag);
  int multicast = 0;
  CHECK(cudaMemcpy(&multicast, flag, sizeof(int), cudaMemcpyDeviceToHost));
  const bool bulk = prop.major >= 9;
  std::printf("%s: pulling L2-resident bytes into SMs; us per launch of %d-thread blocks (median of 9 graph replays "
              "of 400 launches)%s%s\n", prop.name, kThreads, bulk ? "" : "; no bulk copies before Hopper",
              multicast ? "" : "; multicast not built (sm_90a)");
  std::printf("%-16s %7s %6s %7s %7s %8s %9s %9s\n", "mode", "cluster", "blocks", "KB/blk", "us", "- empty",
              "GB/s/blk", "TB/s");
  for (int blocks : block_counts) {
    const float empty = us_per_launch<1>(kEmpty, blocks, 0, src, out);
    std::printf("%-16s %7d %6d %7s %7.2f\n", kModeNames[kEmpty], 1, blocks, "-", empty);
    for (int bytes : sizes) {
      for (Mode mode : {kLoadsSame, kLoadsDistinct, kBulkSame, kBulkDistinct}) {
        if (mode >= kBulkSame && !bulk) continue;
        row(kModeNames[mode], 1, blocks, bytes, us_per_launch<1>(mode, blocks, bytes, src, out), empty);
      }
      if (!multicast) continue;
      if (blocks % 2 == 0)
        row(kModeNames[kBulkMulticast], 2, blocks, bytes, us_per_launch<2>(kBulkMulticast, blocks, bytes, src, out),
            us_per_launch<2>(kEmpty, blocks, 0, src, out));
      if (blocks % 4 == 0)
        row(kModeNames[kBulkMulticast], 4, blocks, bytes, us_per_launch<4>(kBulkMulticast, blocks, bytes, src, out),
            us_per_launch<4>(kEmpty, blocks, 0, src, out));
    }
  }
  return 0;
}
