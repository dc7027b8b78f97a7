// The floor under every decode kernel: microseconds per launch of a chain of dependent kernels in one
// CUDA graph, each reading what the one before it wrote, with and without programmatic dependent
// launch (launch.cuh). The bodies grow one dependent step at a time (an L2 round trip, a block-wide
// reduction), so the rows show what each step of a kernel's critical path costs on this GPU.
// A third column hands off in software instead of griddepcontrol.wait: launched with PDL, each
// kernel's thread 0 spins on a counter (ld.acquire) that every block of the previous kernel bumps
// (red.release) after its stores; the counters only grow, the graph's first kernel bumps an epoch.
// Standalone (no torch):  nvcc -O3 -arch=sm_90 bench/launch_floor.cu -o launch_floor && ./launch_floor
#include <cstdio>

#include "graph_timing.cuh"

enum Body { kEmpty, kLoad, kReduce, kReduceTwice };
constexpr int kLaunches = 2000;

__device__ unsigned epoch;  // graph replays so far: link i waits for epoch * blocks bumps of counters[i - 1]
__global__ void next_epoch() { epoch += 1; }

__device__ __forceinline__ int block_sum(int v, int* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  v = 0;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) v += scratch[w];
  __syncthreads();
  return v;
}

template <Body B, bool kCounter>
__global__ void link(const int* in, int* out, unsigned* counters, int i) {
  __shared__ int scratch[32];
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
  if (!kCounter) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
  } else if (i > 0) {
    if (threadIdx.x == 0) {
      const unsigned target = *reinterpret_cast<volatile unsigned*>(&epoch) * gridDim.x;
      unsigned seen;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counters + i - 1) : "memory");
      } while (seen < target);
    }
    __syncthreads();
  }
#endif
  if (B != kEmpty) {
    int v = __ldcg(in + (threadIdx.x & 31));  // the previous kernel's output
    if (B >= kReduce) v = block_sum(v, scratch);
    if (B == kReduceTwice) v = block_sum(__ldcg(in + ((v + threadIdx.x) & 31)), scratch);
    if (blockIdx.x == 0 && threadIdx.x < 32) out[threadIdx.x] = v + 1;
  }
#if __CUDA_ARCH__ >= 900
  if (kCounter) {
    __syncthreads();
    if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counters + i) : "memory");
  }
#endif
}

template <Body B, bool kCounter = false>
float us_per_launch(bool pdl, int blocks, int threads, int* a, int* b, unsigned* counters) {
  return graph_us_per_launch(kLaunches, 15, [&](cudaStream_t stream, int i) {
    if (kCounter && i == 0) next_epoch<<<1, 1, 0, stream>>>();
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(blocks);
    config.blockDim = dim3(threads);
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = pdl ? 1 : 0;
    CHECK(cudaLaunchKernelEx(&config, link<B, kCounter>, (const int*)(i % 2 ? b : a), i % 2 ? a : b, counters, i));
  });
}

// The three columns of a row: no PDL, PDL, PDL with the counter hand-off (fresh counters)
template <Body B>
void time_row(float (&t)[3], int blocks, int threads, int* a, int* b, unsigned* counters) {
  t[0] = us_per_launch<B>(false, blocks, threads, a, b, counters);
  t[1] = us_per_launch<B>(true, blocks, threads, a, b, counters);
  int device = 0, major = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  t[2] = 0;
  if (major < 9) return;
  const unsigned zero = 0;
  CHECK(cudaMemset(counters, 0, kLaunches * sizeof(unsigned)));
  CHECK(cudaMemcpyToSymbol(epoch, &zero, sizeof(zero)));
  t[2] = us_per_launch<B, true>(true, blocks, threads, a, b, counters);
}

int main() {
  int *a, *b;
  unsigned* counters;
  CHECK(cudaMalloc(&a, 128));
  CHECK(cudaMalloc(&b, 128));
  CHECK(cudaMalloc(&counters, kLaunches * sizeof(unsigned)));
  CHECK(cudaMemset(a, 0, 128));
  CHECK(cudaMemset(b, 0, 128));
  int device = 0, sms = 0;
  cudaDeviceProp prop;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaGetDeviceProperties(&prop, device));
  sms = prop.multiProcessorCount;
  std::printf("%s: us per launch, chains of 2000 dependent kernels in one CUDA graph (median of 15 replays)\n",
              prop.name);
  std::printf("%-52s %8s %8s %8s\n", "kernel body (after the dependency wait)", "no PDL", "PDL", "counter");
  struct Row {
    const char* what;
    Body body;
    int blocks, threads;
  };
  const Row rows[] = {
      {"nothing, 1 block", kEmpty, 1, 32},
      {"nothing, 1 block per SM", kEmpty, sms, 512},
      {"load the previous output (L2), store, 1 block", kLoad, 1, 32},
      {"  + block-wide reduction, 1 block of 512", kReduce, 1, 512},
      {"  + block-wide reduction, 1 block of 512 per SM", kReduce, sms, 512},
      {"  + a second load and reduction, 1 block of 512", kReduceTwice, 1, 512},
      {"  + a second load and reduction, 1 block of 512 per SM", kReduceTwice, sms, 512},
  };
  for (const Row& r : rows) {
    float t[3];
    switch (r.body) {
      case kEmpty: time_row<kEmpty>(t, r.blocks, r.threads, a, b, counters); break;
      case kLoad: time_row<kLoad>(t, r.blocks, r.threads, a, b, counters); break;
      case kReduce: time_row<kReduce>(t, r.blocks, r.threads, a, b, counters); break;
      case kReduceTwice: time_row<kReduceTwice>(t, r.blocks, r.threads, a, b, counters); break;
    }
    if (prop.major >= 9) std::printf("%-52s %8.2f %8.2f %8.2f\n", r.what, t[0], t[1], t[2]);
    else std::printf("%-52s %8.2f %8.2f %8s\n", r.what, t[0], t[1], "-");  // no PDL, no acquire loop before sm_90
  }
  return 0;
}
