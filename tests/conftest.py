import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import hf_models  # noqa: E402  (sets TORCHDYNAMO_DISABLE before transformers loads)

SHARED_TOKENIZER = ROOT.parent / "shared" / "assets" / "llama3-tokenizer"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    hf_models.write_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny 2B-4T-style Hugging Face checkpoint (bf16 latent weights, online quantization)."""
    d = tmp_path_factory.mktemp("hf") / "tiny-bitnet"
    cfg = hf_models.bitnet_config()
    hf_models.save_hf(d, cfg, hf_models.random_bitnet_state(cfg, seed=1), "online", tokenizer_from=tiny_tokenizer_dir)
    return d


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_hf_dir) -> Path:
    """tiny_hf_dir converted into the engine's format."""
    from engine.convert import convert

    return convert(str(tiny_hf_dir), tmp_path_factory.mktemp("ckpt") / "tiny-bitnet", progress=False)
