// The floor under every decode kernel: microseconds per launch of a chain of dependent kernels in one
// CUDA graph, each reading what the one before it wrote, with and without programmatic dependent
// launch (launch.cuh). The bodies grow one dependent step at a time (an L2 round trip, a block-wide
// reduction), so the rows show what each step of a kernel's critical path costs on this GPU.
// Standalone (no torch):  nvcc -O3 -arch=sm_90 bench/launch_floor.cu -o launch_floor && ./launch_floor
#include <cstdio>

#include "graph_timing.cuh"

enum Body { kEmpty, kLoad, kReduce, kReduceTwice };

__device__ __forceinline__ int block_sum(int v, int* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  v = 0;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) v += scratch[w];
  __syncthreads();
  return v;
}

template <Body B>
__global__ void link(const int* in, int* out) {
  __shared__ int scratch[32];
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  if (B == kEmpty) return;
  int v = __ldcg(in + (threadIdx.x & 31));  // the previous kernel's output
  if (B >= kReduce) v = block_sum(v, scratch);
  if (B == kReduceTwice) v = block_sum(__ldcg(in + ((v + threadIdx.x) & 31)), scratch);
  if (blockIdx.x == 0 && threadIdx.x < 32) out[threadIdx.x] = v + 1;
}

template <Body B>
float us_per_launch(bool pdl, int blocks, int threads, int* a, int* b) {
  return graph_us_per_launch(2000, 15, [&](cudaStream_t stream, int i) {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(blocks);
    config.blockDim = dim3(threads);
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = pdl ? 1 : 0;
    CHECK(cudaLaunchKernelEx(&config, link<B>, (const int*)(i % 2 ? b : a), i % 2 ? a : b));
  });
}

int main() {
  int *a, *b;
  CHECK(cudaMalloc(&a, 128));
  CHECK(cudaMalloc(&b, 128));
  CHECK(cudaMemset(a, 0, 128));
  CHECK(cudaMemset(b, 0, 128));
  int device = 0, sms = 0;
  cudaDeviceProp prop;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaGetDeviceProperties(&prop, device));
  sms = prop.multiProcessorCount;
  std::printf("%s: us per launch, chains of 2000 dependent kernels in one CUDA graph (median of 15 replays)\n",
              prop.name);
  std::printf("%-52s %8s %8s\n", "kernel body (after the dependency wait)", "no PDL", "PDL");
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
    float t[2];
    for (int pdl = 0; pdl < 2; ++pdl) {
      switch (r.body) {
        case kEmpty: t[pdl] = us_per_launch<kEmpty>(pdl, r.blocks, r.threads, a, b); break;
        case kLoad: t[pdl] = us_per_launch<kLoad>(pdl, r.blocks, r.threads, a, b); break;
        case kReduce: t[pdl] = us_per_launch<kReduce>(pdl, r.blocks, r.threads, a, b); break;
        case kReduceTwice: t[pdl] = us_per_launch<kReduceTwice>(pdl, r.blocks, r.threads, a, b); break;
      }
    }
    std::printf("%-52s %8.2f %8.2f\n", r.what, t[0], t[1]);
  }
  return 0;
}
