"""Convert a Hugging Face BitNet checkpoint into the engine's format (engine.checkpoint).

Sources (see bitnet-format.md section 3):
  * "bitnet", bf16 latent weights (quantization_mode online): ternarized here with mean|W| scales;
  * "bitnet", pre-packed uint8 [out/4, in] + weight_scale (offline); the scale multiplies for
    linear_class "autobitlinear" and divides for the legacy "bitlinear" (the default);
  * "llama" with a Bitnet architecture (1bitLLM): latent weights, SiLU-gated MLP, other sub-norm names.
Tensors are read one at a time from memory-mapped safetensors and written into bounded shards of
a temporary directory that is renamed into place only when everything succeeded.
"""

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from .checkpoint import CheckpointWriter, PROJECTIONS
from .config import ConfigError, ModelConfig
from .quant import pack_ternary, ternarize
from .tokenizer import TokenizerError, load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
HF_PROJ_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
# HF norm names by family -> engine names
HF_NORM_NAMES = {
    "bitnet": {"input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
               "attn_sub_norm": "self_attn.attn_sub_norm", "ffn_sub_norm": "mlp.ffn_sub_norm"},
    "1bitllm": {"input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                "attn_sub_norm": "self_attn.inner_attn_ln", "ffn_sub_norm": "mlp.ffn_layernorm"},
}


class ConvertError(Exception):
    """The source cannot be converted; the message says why and what to do."""


@dataclass
class SourceInfo:
    family: str            # "bitnet" or "1bitllm"
    linear_class: str      # "autobitlinear" or "bitlinear"
    mode: str              # "online" or "offline"
    hf_config: dict


def resolve_source(src: str) -> Path:
    """A local directory, or a hub repo id downloaded (safetensors and small files only)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConvertError(f"{src} is a file; give the model's directory")
    looks_like_repo = src.count("/") == 1 and not src.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise ConvertError(f"no such directory: {src}")
    try:
        from huggingface_hub import snapshot_download
        print(f"downloading {src} from the Hugging Face hub ...", file=sys.stderr)
        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]))
    except Exception as e:
        raise ConvertError(f"{src} is not a local directory and could not be downloaded from the hub: {e}") from None


def read_source_info(src: Path) -> SourceInfo:
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ConvertError(f"{src} has no config.json; is it a Hugging Face model directory?")
    try:
        hf = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ConvertError(f"{cfg_file} is not valid JSON: {e}") from None
    model_type = hf.get("model_type")
    archs = [a.lower() for a in hf.get("architectures") or []]
    if model_type == "bitnet":
        family = "bitnet"
    elif model_type == "llama" and any("bitnet" in a for a in archs):
        family = "1bitllm"
    else:
        raise ConvertError(f"unknown architecture: model_type={model_type!r}, architectures={hf.get('architectures')}; "
                           "this engine converts BitNet b1.58 checkpoints (model_type 'bitnet', or 1bitLLM's "
                           "llama-style 'BitnetForCausalLM')")
    qc = hf.get("quantization_config") or {}
    linear_class = qc.get("linear_class", "bitlinear")
    mode = qc.get("quantization_mode", "offline" if qc else "online")
    if linear_class not in ("bitlinear", "autobitlinear") or mode not in ("online", "offline"):
        raise ConvertError(f"unsupported quantization_config {qc}")
    return SourceInfo(family, linear_class, mode, hf)


class SafetensorsSource:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, src: Path):
        index = src / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ConvertError(f"{index} is not a valid safetensors index: {e}") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in src.glob("*.safetensors"))
            weight_map = None
        if not files:
            pickles = [p.name for p in src.glob("*.bin")] + [p.name for p in src.glob("*.pt")]
            hint = (f" (found {pickles}: pickled checkpoints are not loaded, for safety; "
                    "re-save the model with safetensors)") if pickles else ""
            raise ConvertError(f"{src} has no *.safetensors weights{hint}")
        self.handles = {}
        for name in files:
            file = src / name
            if not file.is_file():
                raise ConvertError(f"missing weight file {file} (listed in model.safetensors.index.json)")
            try:
                self.handles[name] = safe_open(str(file), framework="pt")
            except Exception as e:
                raise ConvertError(f"{file} is not a readable safetensors file ({e}); the download may be "
                                   "incomplete or corrupt") from None
        self.where = {}
        for name, h in self.handles.items():
            for key in h.keys():
                self.where[key] = name
        if weight_map:
            absent = [k for k in weight_map if k not in self.where]
            if absent:
                raise ConvertError(f"tensors listed in the index are missing from the shards: {absent[:3]}")

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise ConvertError(f"tensor {key!r} is missing from the checkpoint")
        try:
            return self.handles[self.where[key]].get_tensor(key)
        except Exception as e:
            raise ConvertError(f"cannot read tensor {key!r} from {self.where[key]} ({e}); the file is corrupt") from None


def model_config_from_hf(info: SourceInfo, weights: SafetensorsSource, end_ids: list[int]) -> ModelConfig:
    hf = info.hf_config
    try:
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        rope = hf.get("rope_parameters") or {}
        default_theta = 500000.0 if info.family == "bitnet" else 10000.0
        theta = hf.get("rope_theta", rope.get("rope_theta", default_theta))
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise ConvertError(f"rope scaling {rope or hf.get('rope_scaling')} is not supported")
        act = hf.get("hidden_act", "relu2" if info.family == "bitnet" else "silu")
        if act not in ("relu2", "silu"):
            raise ConvertError(f"unsupported hidden_act {act!r} (relu2 and silu are supported)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConvertError("projection biases are not supported")
        tied = hf.get("tie_word_embeddings")
        if tied is None:  # 2B-4T-style files omit lm_head when tied
            tied = "lm_head.weight" not in weights
        if not tied and "lm_head.weight" not in weights:
            raise ConvertError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
        eos = hf.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5 if info.family == "bitnet" else 1e-6)),
            activation=act, tie_word_embeddings=bool(tied), bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(sorted(set(eos) | set(end_ids))),
        )
    except KeyError as e:
        raise ConvertError(f"config.json lacks {e.args[0]!r}") from None
    except ConfigError as e:
        raise ConvertError(f"config.json: {e}") from None


def unpack_hf_packed(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """HF offline packing (four contiguous blocks of R rows along the output dim, block i in bits
    2i..2i+1) -> raw codes uint8 [out_features, in] (0..3; 3 is invalid)."""
    blocks = [(packed >> (2 * i)) & 3 for i in range(4)]
    return torch.cat(blocks, dim=0)[:out_features]


def convert_projection(weights: SafetensorsSource, info: SourceInfo, key: str,
                       shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Source projection `key` (without .weight) -> (canonical packed codes, fp32 scale [1])."""
    n, k = shape
    w = weights.get(key + ".weight")
    if w.dtype == torch.uint8:
        rows = math.ceil(n / 4)
        if tuple(w.shape) != (rows, k):
            raise ConvertError(f"{key}.weight: packed shape {list(w.shape)}, expected {[rows, k]} for a {n}x{k} projection")
        codes = unpack_hf_packed(w, n)
        if int(codes.max()) > 2:
            raise ConvertError(f"{key}.weight holds packed values that are not ternary (2-bit code 3); "
                               "the file is corrupt or not a BitNet checkpoint")
        ternary = codes.to(torch.int8) - 1
        scale = stored_scale(weights, info, key)
    elif w.dtype.is_floating_point:
        if tuple(w.shape) != (n, k):
            raise ConvertError(f"{key}.weight: shape {list(w.shape)}, expected {[n, k]}")
        if key + ".weight_scale" in weights:  # offline, already ternary but stored unpacked
            ternary = w.to(torch.int8)
            if not torch.equal(ternary.to(w.dtype), w) or int(ternary.abs().max()) > 1:
                raise ConvertError(f"{key}.weight has a weight_scale but its values are not ternary")
            scale = stored_scale(weights, info, key)
        else:
            ternary, scale = ternarize(w)
    else:
        raise ConvertError(f"{key}.weight has unsupported dtype {w.dtype}")
    if not math.isfinite(scale) or scale <= 0:
        raise ConvertError(f"{key}: weight scale {scale} is not a positive finite number")
    return pack_ternary(ternary), torch.tensor([scale], dtype=torch.float32)


def stored_scale(weights: SafetensorsSource, info: SourceInfo, key: str) -> float:
    ws = weights.get(key + ".weight_scale").float()
    if ws.numel() != 1:
        raise ConvertError(f"{key}.weight_scale has {ws.numel()} values; one per-tensor scale expected")
    ws = float(ws)
    # autobitlinear multiplies by the stored scale; legacy bitlinear divides by it
    return ws if info.linear_class == "autobitlinear" else 1.0 / ws if ws else math.inf


def bf16(weights: SafetensorsSource, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = weights.get(key)
    if tuple(t.shape) != shape:
        raise ConvertError(f"{key}: shape {list(t.shape)}, expected {list(shape)}")
    if not t.dtype.is_floating_point:
        raise ConvertError(f"{key} has dtype {t.dtype}, expected a floating-point tensor")
    return t.to(torch.bfloat16)


def default_output(src: str) -> Path:
    """checkpoints/<name>: the directory's own name, or the repo id's model name."""
    path = Path(src).expanduser()
    name = path.resolve().name if path.exists() else src.rstrip("/").split("/")[-1]
    return Path("checkpoints") / (name or "model")


def convert(src: str, output: Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Convert `src` (directory or hub repo id) into `output`; returns the output directory."""
    output = Path(output) if output else default_output(src)
    if output.exists() and not force:
        raise ConvertError(f"{output} already exists; pass --force to replace it")
    src_dir = resolve_source(src)
    info = read_source_info(src_dir)
    weights = SafetensorsSource(src_dir)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tokenizer = copy_tokenizer(src_dir, tmp)
        cfg = model_config_from_hf(info, weights, tokenizer.end_token_ids())
        if tokenizer.vocab_size > cfg.vocab_size:
            print(f"warning: the tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size}",
                  file=sys.stderr)
        write_weights(weights, info, cfg, tmp, progress)
        replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def copy_tokenizer(src: Path, dst: Path):
    present = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not any(f in present for f in ("tokenizer.json", "tokenizer.model")):
        raise ConvertError(f"{src} has no tokenizer (tokenizer.json or tokenizer.model)")
    for f in present:
        shutil.copy2(src / f, dst / f)
    try:
        return load_tokenizer(dst)
    except TokenizerError as e:
        raise ConvertError(f"the tokenizer in {src} cannot be loaded: {e}") from None


def write_weights(weights: SafetensorsSource, info: SourceInfo, cfg: ModelConfig, out: Path, progress: bool) -> None:
    writer = CheckpointWriter(out, cfg)
    h, v = cfg.hidden_size, cfg.vocab_size
    norm_names = HF_NORM_NAMES[info.family]
    norm_sizes = {"input_norm": h, "post_attn_norm": h, "attn_sub_norm": cfg.q_size, "ffn_sub_norm": cfg.intermediate_size}
    shapes = cfg.linear_shapes()
    writer.add("embed_tokens", bf16(weights, "model.embed_tokens.weight", (v, h)))
    writer.add("norm", bf16(weights, "model.norm.weight", (h,)))
    if not cfg.tie_word_embeddings:
        writer.add("lm_head", bf16(weights, "lm_head.weight", (v, h)))
    for i in tqdm(range(cfg.num_layers), desc="converting layers", unit="layer", disable=not progress):
        prefix = f"model.layers.{i}."
        for ours, theirs in norm_names.items():
            writer.add(f"layers.{i}.{ours}", bf16(weights, prefix + theirs + ".weight", (norm_sizes[ours],)))
        for proj in PROJECTIONS:
            codes, scale = convert_projection(weights, info, prefix + HF_PROJ_NAMES[proj], shapes[proj])
            writer.add(f"layers.{i}.{proj}.codes", codes)
            writer.add(f"layers.{i}.{proj}.scale", scale)
    extra = [k for k in weights.where if k.startswith("model.layers.")
             and int(k.split(".")[2]) >= cfg.num_layers]
    if extra:
        raise ConvertError(f"the checkpoint has more layers than config.json says ({extra[0]})")
    source_format = {"bitnet": f"bitnet-{info.mode}-{info.linear_class}", "1bitllm": "1bitllm-latent"}[info.family]
    writer.finish(source={"format": source_format, "hf_model_type": info.hf_config.get("model_type")})


def replace_dir(tmp: Path, output: Path) -> None:
    """Move the finished checkpoint into place; an existing one (with --force) is removed only after."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
