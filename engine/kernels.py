"""The Python face of the CUDA kernels in csrc/: finding the compiled module and calling it.

`pip install -e .` on a machine with nvcc and a CUDA build of torch compiles them into engine._C.
If that module is missing at run time on a CUDA machine, the same sources are compiled on first use
with torch's JIT extension loader (cached under ~/.cache/torch_extensions); that needs this source
tree (a checkout or editable install) and nvcc.
"""

import os
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("bindings.cpp", "w2a8_gemm.cu", "quantize.cu")
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]  # the C++ standard is torch's choice
CHUNK_K = 128  # inputs per tile of the GEMM layout: activation rows are padded to a multiple of it


class KernelsUnavailable(RuntimeError):
    """The CUDA kernels cannot be used here; the message says why."""


_module = None


def load():
    """The kernel module, compiled by setup.py or (failing that) just in time."""
    global _module
    if _module is not None:
        return _module
    if not torch.cuda.is_available():
        raise KernelsUnavailable("no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    try:
        from engine import _C as module
    except ImportError:
        module = _jit_compile()
    _module = module
    return module


def _jit_compile():
    from torch.utils.cpp_extension import CUDA_HOME, load as load_extension

    missing = [s for s in SOURCES if not (CSRC / s).is_file()]
    if missing:
        raise KernelsUnavailable(f"engine._C is not built and the CUDA sources are not at {CSRC}; "
                                 "reinstall from a checkout on a machine with nvcc: pip install -e .")
    if CUDA_HOME is None:
        raise KernelsUnavailable("engine._C is not built and nvcc was not found (set CUDA_HOME) to compile it")
    print("compiling the CUDA kernels once (cached for next time) ...", flush=True)
    return load_extension(name="bitnet_engine_kernels", sources=[str(CSRC / s) for s in SOURCES],
                          extra_cflags=["-O3"], extra_cuda_cflags=NVCC_FLAGS,
                          verbose=os.environ.get("BITNET_VERBOSE_BUILD") == "1")


def padded(k: int) -> int:
    return -(-k // CHUNK_K) * CHUNK_K


def repack(codes: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Canonical packed codes uint8 [n, ceil(k/4)] (on the GPU) -> the GEMM's tiled layout."""
    if n <= 0 or k <= 0:
        raise ValueError(f"impossible weight shape {n}x{k}")
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (n, (k + 3) // 4):
        raise ValueError(f"codes of shape {list(codes.shape)} ({codes.dtype}) cannot hold a {n}x{k} weight "
                         f"(expected uint8 [{n}, {(k + 3) // 4}])")
    return load().repack(codes, n, k)


def quantize(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5,
             out_q: torch.Tensor | None = None, out_scale: torch.Tensor | None = None):
    """x [m, k] -> (x_q int8 [m, k] with padded rows, scale fp32 [m]); with `weight`, of rmsnorm(x) * weight."""
    return tuple(load().quantize(x, weight, eps, out_q, out_scale))


def as_gemm_input(x_q: torch.Tensor) -> torch.Tensor:
    """int8 [m, k] in the GEMM's row layout (rows padded with zeros to a multiple of 128 bytes)."""
    m, k = x_q.shape
    if x_q.stride() == (padded(k), 1) and x_q.storage_offset() % 16 == 0:
        return x_q
    buf = torch.zeros(m, padded(k), dtype=torch.int8, device=x_q.device)
    buf[:, :k] = x_q
    return buf[:, :k]


def gemm(x_q: torch.Tensor, x_scale: torch.Tensor, tiled: torch.Tensor, n: int, k: int,
         segment_ends: list[int], segment_scales: list[float], residual: torch.Tensor | None = None,
         out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
         row_tiles_per_block: int = 0, warps: int = 0) -> torch.Tensor:
    """[m, n] = dequantized x_q [m, k] . W^T (int32 dot products when out_dtype is torch.int32)."""
    if x_q.dim() != 2 or x_q.dtype != torch.int8:
        raise ValueError(f"x_q must be a 2-D int8 tensor, got {x_q.dtype} {list(x_q.shape)}")
    if x_q.shape[1] != k:
        raise ValueError(f"x_q has {x_q.shape[1]} features but the weight expects {k}")
    if tuple(tiled.shape[:2]) != (-(-n // 16), padded(k) // CHUNK_K):
        raise ValueError(f"the tiled weight {list(tiled.shape)} does not match a {n}x{k} projection")
    ends = list(segment_ends)
    if not ends or ends[-1] != n or len(ends) != len(segment_scales) or len(ends) > 4 \
            or any(b <= a for a, b in zip([0] + ends, ends)):
        raise ValueError(f"segments must end at n = {n}, increase, have one scale each, at most 4: {ends}")
    return load().gemm(as_gemm_input(x_q), x_scale.reshape(-1).float().contiguous(), tiled, n, k,
                       list(segment_ends), [float(s) for s in segment_scales], residual, out_dtype, out,
                       row_tiles_per_block, warps)
