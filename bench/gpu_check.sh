#!/usr/bin/env bash
# On a GPU machine: build the CUDA kernels for this GPU, run the whole test suite (the CUDA tests
# included), run the kernel benchmark, and print a short summary last. Logs go to $OUT.
#   bash bench/gpu_check.sh [extra bench/kernels.py arguments, e.g. --sweep]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bitnet-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}

gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}   # build for the chip we run on
echo "GPU: $gpu (sm_${arch/./}); torch $(python3 -c 'import torch; print(torch.__version__)')"

start=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
build=$?
echo "build: exit $build in $(( $(date +%s) - start )) s (log: build.log)"
grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | head -n 20 > "$OUT/ptxas.txt" || true
if [ $build -ne 0 ]; then tail -n 40 "$OUT/build.log"; exit 1; fi

python3 -m pytest -q -p no:cacheprovider tests > "$OUT/tests.log" 2>&1
tests=$?
python3 bench/kernels.py --json "$OUT/kernels.json" "$@" > "$OUT/bench.log" 2>&1
bench=$?

echo "================ summary ================"
echo "GPU: $gpu"
echo "tests (exit $tests):"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 15
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 20
echo "kernel benchmark (exit $bench):"; cat "$OUT/bench.log" | tail -n 45
exit $(( tests || bench ))
