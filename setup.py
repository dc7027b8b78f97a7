"""Install: pip install -e .   (GPU kernels arrive with the kernel issue; the CPU path needs no compiler.)"""

from setuptools import find_packages, setup

setup(
    name="bitnet-engine",
    version="0.1.0",
    description="Fast, exact inference for BitNet b1.58 ternary-weight language models",
    packages=find_packages(include=["engine", "engine.*"]),
    python_requires=">=3.10",
    # torch is listed without a pin: install the build for your machine first (see README)
    install_requires=["torch", "safetensors", "tokenizers", "tiktoken", "sentencepiece", "jinja2",
                      "huggingface_hub", "tqdm"],
    extras_require={"test": ["pytest", "pytest-timeout", "transformers>=5.0", "accelerate"]},
)
