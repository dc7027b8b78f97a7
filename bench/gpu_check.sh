#!/usr/bin/env bash
# On a GPU machine: build the CUDA kernels for this GPU, run the whole test suite (the CUDA tests
# included), the kernel, end-to-end and server benchmarks and a decode-step profile, and print a
# short summary last. Logs and JSON go to $OUT.
#   bash bench/gpu_check.sh                 # everything
#   STAGES="build tests e2e" bash bench/gpu_check.sh    # some stages (build, tests, kernels, e2e, profile, serve, jit)
#   KERNEL_ARGS="--sweep" bash bench/gpu_check.sh       # extra bench/kernels.py arguments (--gemv-only, --ms 1,4)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bitnet-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
STAGES=${STAGES:-build tests kernels e2e profile serve jit}
want() { [[ " $STAGES " == *" $1 "* ]]; }

gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}   # build for the chip we run on
echo "GPU: $gpu (sm_${arch/./}); torch $(python3 -c 'import torch; print(torch.__version__)'); stages: $STAGES"
status=0
run_stage() {  # name, log file, command...
  local name=$1 log=$2; shift 2
  local start=$(date +%s)
  "$@" > "$OUT/$log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - start )) s (log: $log)"
  [ $rc -eq 0 ] || status=1
  return $rc
}

if want build; then
  # the README's install command for GPU machines (--no-deps: that machine has no network; all is there)
  if ! run_stage build build.log python3 -m pip install --no-build-isolation --no-deps -e .; then
    tail -n 40 "$OUT/build.log"; exit 1
  fi
  grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | head -n 30 > "$OUT/ptxas.txt" || true
fi
want tests && run_stage tests tests.log python3 -m pytest -q -p no:cacheprovider tests
if want kernels; then
  run_stage kernels bench.log python3 bench/kernels.py --json "$OUT/kernels.json" ${KERNEL_ARGS:-}
  # the cost of a dependent launch itself, and of each dependent step of a kernel body
  run_stage launch-floor launch_floor.log bash -c "nvcc -std=c++17 -O3 -arch=sm_${arch/./} bench/launch_floor.cu \
    -o /tmp/launch_floor && /tmp/launch_floor"
  # what SMs take to pull L2-resident bytes (the GEMV's activation reads); multicast needs sm_90a
  ingress_arch="arch=compute_${arch/./},code=sm_${arch/./}"
  [ "$arch" = "9.0" ] && ingress_arch="arch=compute_90a,code=sm_90a"
  run_stage l2-ingress l2_ingress.log bash -c "nvcc -std=c++17 -O3 -gencode $ingress_arch bench/l2_ingress.cu \
    -o /tmp/l2_ingress && /tmp/l2_ingress"
  # the batch-1 LM head over the bf16 table against a lossless 12-bit coding of it
  run_stage head-formats head_formats.log bash -c "nvcc -std=c++17 -O3 -arch=sm_${arch/./} bench/head_formats.cu \
    -o /tmp/head_formats && /tmp/head_formats"
fi
if want e2e; then
  run_stage e2e e2e.log python3 bench/e2e.py --json "$OUT/e2e.json"
  # a prompt's forward eager against replayed from a graph: is prefill waiting for the host?
  run_stage prefill-host prefill_host.log python3 bench/prefill_host.py
fi
if want profile; then
  run_stage profile-b1 profile-b1.log python3 bench/profile_decode.py --batch 1 --context 512
  run_stage profile-b64 profile-b64.log python3 bench/profile_decode.py --batch 64 --context 128
  # kernel times without programmatic dependent launch: each kernel's own time, no overlap
  BITNET_NO_PDL=1 run_stage profile-b1-nopdl profile-b1-nopdl.log python3 bench/profile_decode.py --batch 1 --context 512
  # the opt-in one-launch decode kernel, phase by phase
  BITNET_FUSED_DECODE=1 run_stage profile-b1-fused profile-b1-fused.log python3 bench/profile_decode.py --batch 1 --context 512
fi
want serve && [ -f bench/serve.py ] && run_stage serve serve.log python3 bench/serve.py --json "$OUT/serve.json"

if want jit; then
  # the fallback when engine._C is missing on a CUDA machine: compiled on first use by torch's JIT loader
  mkdir -p /tmp/stash && mv engine/_C*.so /tmp/stash/ 2>/dev/null
  run_stage jit jit.log python3 -c "
import torch
from engine import kernels
x_q, s = kernels.quantize(torch.randn(3, 256, device='cuda'))
assert kernels.load().__name__ != 'engine._C' and x_q.shape == (3, 256)
print('JIT fallback: compiled and ran', kernels.load().__name__)"
  mv /tmp/stash/_C*.so engine/ 2>/dev/null
fi

echo "================ summary ================"
echo "GPU: $gpu"
if want tests; then
  echo "tests:"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 3
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 30
fi
want e2e && { echo "end to end:"; tail -n 20 "$OUT/e2e.log"; tail -n 3 "$OUT/prefill_host.log"; }
want profile && { echo "decode profile (no PDL):"; grep -v Warn "$OUT/profile-b1-nopdl.log" | head -n 16
  tail -n 1 "$OUT/profile-b1.log"; tail -n 1 "$OUT/profile-b64.log"
  echo "one-launch decode kernel (opt-in):"; tail -n 11 "$OUT/profile-b1-fused.log"; }
want serve && [ -f "$OUT/serve.log" ] && { echo "server:"; tail -n 8 "$OUT/serve.log"; }
want kernels && { echo "kernel benchmark:"; grep -v "^  [0-9]" "$OUT/bench.log" | tail -n 60; cat "$OUT/launch_floor.log"
  grep -v -E " (27|54)\.0 " "$OUT/l2_ingress.log"; cat "$OUT/head_formats.log"; }  # l2_ingress: its 108 KB rows
exit $status
