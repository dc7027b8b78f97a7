// Programmatic dependent launch (Hopper): a kernel may start while the previous one in the stream
// finishes, doing work that does not depend on it before griddepcontrol.wait. On older GPUs the wait
// and trigger compile to nothing and launches are ordinary.
//
// What a kernel may read before the wait: kernels here let the next one start at once (the decode
// attention's split kernel only after its own wait), so before its own wait a kernel may run beside
// any of the engine's kernels launched before it that have not finished. It may read only what none of them writes: weights and tables, and what was
// written before the chain began, because torch's kernels and copies never let the next launch start
// early. A decode step's positions, slots and its sequences' earlier cache entries are such data
// (written by copies, or by earlier steps); this step's own key and value are not.
// After the wait, what earlier kernels wrote is read through L2 (quant_math.cuh load_fresh, __ldcg),
// never through L1 or the read-only cache: the allocator gives one address to many buffers in turn,
// and a line an earlier kernel loaded on this SM can still be there, stale. (Measured: with those
// loads cached, replayed decode graphs gave other logits than eager steps once timings shifted.)
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <type_traits>

namespace bitnet {

// Block until the previous kernel in the stream has completed and its writes are visible.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// __ldcg (ld.global.cg: through L2, never a stale L1 line) that stays where it is written. The bf16
// overload in cuda_bf16.hpp is a non-volatile asm, which the compiler may hoist above
// wait_for_previous_kernel() and run even where its guard is false (seen: the GEMV's residual read
// before the wait, from a null pointer); the integer and float overloads are volatile.
template <typename T>
__device__ __forceinline__ T ldcg_ordered(const T* p) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)));
  else return __ldcg(p);
}

// Let the next kernel in the stream launch now (it still waits for this one before its dependent part).
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

inline bool device_supports_pdl() {
  if (std::getenv("BITNET_NO_PDL") != nullptr) return false;  // for comparisons and debugging
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 9;
}

// An SM's shared memory / L1 split is set for each launch: by the driver from what the kernel needs,
// unless the launch states a preference. Kernels of different splits appear not to share an SM, so
// under programmatic dependent launch the next kernel's blocks wait for the previous kernel's to
// leave. Launches of up to kSharedRows rows therefore all ask for the largest shared memory split
// (L1 keeps 28 KB): decode steps of 1-8 rows 2-3% faster on an H100. From 16 rows the small L1 costs
// more than it saves (64 rows: 5% slower), so there, and without PDL (nothing overlaps), the
// driver's choice stands. Figures: README, "One shared memory split for small batches".
constexpr int kSharedRows = 8;

// Launch `kernel` for `rows` token rows with programmatic stream serialization where the GPU
// supports it, in thread-block clusters of `cluster` blocks when that is more than one.
template <typename... Params, typename... Args>
cudaError_t launch_pdl_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                               dim3 cluster, int rows, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[3];
  static const bool pdl = device_supports_pdl();
  unsigned count = 0;
  if (pdl) {
    attribute[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster.x * cluster.y * cluster.z > 1) {
    attribute[count].id = cudaLaunchAttributeClusterDimension;
    attribute[count].val.clusterDim.x = cluster.x;
    attribute[count].val.clusterDim.y = cluster.y;
    attribute[count++].val.clusterDim.z = cluster.z;
  }
  if (pdl && rows <= kSharedRows) {  // the drains matter where kernels overlap
    attribute[count].id = cudaLaunchAttributePreferredSharedMemoryCarveout;
    attribute[count++].val.sharedMemCarveout = cudaSharedmemCarveoutMaxShared;
  }
  config.attrs = attribute;
  config.numAttrs = count;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, int rows,
                       Args... args) {
  return launch_pdl_cluster(kernel, grid, block, smem, stream, dim3(1, 1, 1), rows, args...);
}

}  // namespace bitnet
