"""Checks on the CUDA sources' generated code that no GPU is needed for (nvcc is: CI has it).

cuda_bf16.hpp's __ldcg / __ldca / __ldcs / __ldlu / __ldcv for bf16 are non-volatile inline asm: the
compiler may move such a load above griddepcontrol.wait (the programmatic-dependent-launch wait,
launch.cuh), where it reads what the previous kernel has not written yet, and may run it where its
guard is false. That happened: the GEMV's residual load, guarded by `residual != nullptr`, was
hoisted above the wait and read from a null pointer. Kernels read bf16 through ldcg_ordered
(launch.cuh), whose loads are volatile (".u16" in PTX); the header's emit ".b16".
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
UNORDERED_BF16_LOAD = re.compile(r"ld\.global\.(cg|ca|cs|lu|cv)\.b16")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_no_bf16_load_the_compiler_may_hoist_above_the_dependency_wait(source, tmp_path):
    ptx = tmp_path / "out.ptx"
    subprocess.run(["nvcc", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-arch=compute_90", "-ptx",
                    str(CSRC / source), "-o", str(ptx)], check=True, capture_output=True)
    text = ptx.read_text()
    assert ".entry" in text, f"{source}: no kernel in the PTX"
    found = sorted({m.group(0) for m in UNORDERED_BF16_LOAD.finditer(text)})
    assert not found, f"{source}: {found}: load bf16 written by earlier kernels with ldcg_ordered (launch.cuh)"
