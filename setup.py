"""Install: pip install -e .

With nvcc and a CUDA build of torch, this compiles the W2A8 kernels in csrc/ into engine._C
(for sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise; needs `--no-build-isolation` so
the build sees your torch). Without them the package installs the CPU path only and says why.
"""

import os
import sys

from setuptools import find_packages, setup


def cuda_extension():
    """(ext_modules, cmdclass) for the kernels, or ([], {}) with one line saying why not."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("bitnet-engine: torch is not installed in the build environment: installing without the CUDA kernels "
              "(CPU path only; for the kernels: pip install --no-build-isolation -e .)", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        why = "torch is a CPU build" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)"
        print(f"bitnet-engine: {why}: installing without the CUDA kernels (CPU path only)", file=sys.stderr)
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine"))
    from kernels import NVCC_FLAGS, SOURCES  # one list of sources and flags for setup.py and the JIT path

    ext = CUDAExtension("engine._C", sources=[f"csrc/{s}" for s in SOURCES],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="bitnet-engine",
    version="0.1.0",
    description="Fast, exact inference for BitNet b1.58 ternary-weight language models",
    packages=find_packages(include=["engine", "engine.*"]),
    python_requires=">=3.10",
    # torch is listed without a pin: install the build for your machine first (see README)
    install_requires=["torch", "safetensors", "tokenizers", "tiktoken", "sentencepiece", "jinja2",
                      "huggingface_hub", "tqdm",
                      "fastapi>=0.110", "uvicorn>=0.30", "pydantic>=2.5"],   # the HTTP server (generate.py --serve)
    extras_require={"test": ["pytest", "pytest-timeout", "transformers>=5.0", "accelerate",
                             "openai>=1.0", "httpx"]},   # the server tests talk through the official client
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
