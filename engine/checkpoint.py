"""The engine's converted-checkpoint format: one place that defines, writes, reads and validates it.

A converted checkpoint is a directory:

    config.json                  {"format": "bitnet-engine", "format_version": 1,
                                  "model": {ModelConfig fields}, "weight_files": [...], "source": {...}}
    model-00001.safetensors ...  the tensors below, split in shards of about 1 GB
    tokenizer files              copied unchanged from the source (tokenizer.json / tokenizer.model, ...)

Tensors (all names unique across shards):

    embed_tokens                    bf16  [vocab, hidden]
    norm                            bf16  [hidden]
    lm_head                         bf16  [vocab, hidden]        only when the head is untied
    layers.{i}.input_norm           bf16  [hidden]
    layers.{i}.post_attn_norm       bf16  [hidden]
    layers.{i}.attn_sub_norm        bf16  [heads * head_dim]
    layers.{i}.ffn_sub_norm         bf16  [intermediate]
    layers.{i}.{proj}.codes         uint8 [out, ceil(in / 4)]    proj in q k v o gate up down
    layers.{i}.{proj}.scale         fp32  [1]                    y = (x_q . w_t) * scale / x_scale

`codes` use the canonical packing of engine.quant (four consecutive input weights per byte, code
w + 1, lowest bits first); kernels repack it at load time, so the file never depends on a kernel.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig

FORMAT_NAME = "bitnet-engine"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
NORMS = ("input_norm", "post_attn_norm", "attn_sub_norm", "ffn_sub_norm")


class CheckpointError(Exception):
    """A converted checkpoint that is missing, damaged or of another format."""


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor a checkpoint for `cfg` holds, with its shape and dtype."""
    bf16 = torch.bfloat16
    out = {"embed_tokens": ((cfg.vocab_size, cfg.hidden_size), bf16), "norm": ((cfg.hidden_size,), bf16)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = ((cfg.vocab_size, cfg.hidden_size), bf16)
    norm_sizes = {"input_norm": cfg.hidden_size, "post_attn_norm": cfg.hidden_size,
                  "attn_sub_norm": cfg.q_size, "ffn_sub_norm": cfg.intermediate_size}
    shapes = cfg.linear_shapes()
    for i in range(cfg.num_layers):
        for norm, size in norm_sizes.items():
            out[f"layers.{i}.{norm}"] = ((size,), bf16)
        for proj in PROJECTIONS:
            n, k = shapes[proj]
            out[f"layers.{i}.{proj}.codes"] = ((n, (k + 3) // 4), torch.uint8)
            out[f"layers.{i}.{proj}.scale"] = ((1,), torch.float32)
    return out


class CheckpointWriter:
    """Writes tensors into size-bounded safetensors shards as they arrive, so a conversion holds
    at most one shard in memory. Call `finish()` last: it checks completeness and writes config.json."""

    def __init__(self, directory: Path, cfg: ModelConfig, shard_bytes: int = 1 << 30):
        self.directory, self.cfg, self.shard_bytes = Path(directory), cfg, shard_bytes
        self.expected = expected_tensors(cfg)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[str] = []
        self.written: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.expected:
            raise CheckpointError(f"unexpected tensor {name!r}")
        shape, dtype = self.expected[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CheckpointError(f"{name}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        self.pending[name] = tensor.contiguous()
        self.written.add(name)
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.directory / name), metadata={"format": FORMAT_NAME})
        self.files.append(name)
        self.pending, self.pending_bytes = {}, 0

    def finish(self, source: dict) -> None:
        self._flush()
        missing = set(self.expected) - self.written
        if missing:
            raise CheckpointError(f"conversion produced no {sorted(missing)[:5]}")
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": self.cfg.to_dict(),
                "weight_files": self.files, "source": source}
        write_json_atomic(self.directory / CONFIG_FILE, meta)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_checkpoint(path: Path) -> bool:
    """True when `path` is a directory holding an engine config.json (not necessarily valid)."""
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def find_checkpoints(path: Path) -> list[Path]:
    """`path` itself if it is a converted checkpoint, else the converted checkpoints directly inside it."""
    path = Path(path)
    if is_checkpoint(path):
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and is_checkpoint(p))


def read_meta(path: Path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a converted checkpoint: it has no {CONFIG_FILE}")
    try:
        meta = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); re-run convert_checkpoint.py") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a converted checkpoint (config.json has no \"format\": "
                              f"\"{FORMAT_NAME}\"); convert it first with: python convert_checkpoint.py {path}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}; this engine reads version "
                              f"{FORMAT_VERSION}. Re-run convert_checkpoint.py on the original model.")
    return meta


def load_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read and validate a converted checkpoint. Tensors come memory-mapped from the shards."""
    path = Path(path)
    meta = read_meta(path)
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: bad model config: {e}") from None
    expected = expected_tensors(cfg)
    tensors: dict[str, torch.Tensor] = {}
    for name in meta.get("weight_files", []):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: weight file {name} is missing; the checkpoint is incomplete")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"{file} is damaged or truncated ({e}); re-run convert_checkpoint.py") from None
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise CheckpointError(f"{path}: tensor {name} is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
    return cfg, tensors
