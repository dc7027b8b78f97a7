"""Tiny random checkpoints in the real Hugging Face layouts, for tests.

The packed (offline) form is produced with transformers' own `pack_weights`, and latent weights are
ternarized here with the plain formula of bitnet-format.md, so the engine's converter is checked
against code it does not share.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

# transformers wraps its BitNet quantization in torch.compile; eager mode is enough for tiny models
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
BITNET_CHAT_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first %}{{ bos_token }}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '<|eot_id|>' }}"
    "{%- elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '<|eot_id|>' }}"
    "{%- elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ 'Assistant: ' }}{%- endif %}"
)
PROJ_NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def write_tiny_tokenizer(directory: Path, vocab_size: int = 290) -> None:
    """A byte-level BPE tokenizer.json trained on a little text, with 2B-4T's specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = ["Hello, how are you today? I am fine, thank you.", "The quick brown fox jumps over the lazy dog.",
            "User: What is two plus two? Assistant: Four.", "def main():\n    print('hi')\n",
            "Grüße aus Köln! Ça va très bien. 東京は晴れです。 😀"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "chat_template": BITNET_CHAT_TEMPLATE}))


def bitnet_config(**overrides):
    from transformers import BitNetConfig

    kw = dict(vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
              bos_token_id=0, eos_token_id=1, initializer_range=0.1, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kw.update(overrides)
    return BitNetConfig(**kw)


def random_bitnet_state(cfg, seed: int) -> dict[str, torch.Tensor]:
    """A bf16 state dict of a BitNetForCausalLM with random latent weights and random norm gains."""
    from transformers import BitNetForCausalLM

    torch.manual_seed(seed)
    model = BitNetForCausalLM(cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if k.endswith("norm.weight") or "layernorm" in k:
            state[k] = torch.empty_like(v).uniform_(0.5, 1.5)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def ternarize_reference(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    w = w.double()
    scale = max(w.abs().mean().item(), 1e-5)
    return (w / scale).round().clamp(-1, 1), scale


def save_hf(directory: Path, cfg, state: dict, form: str, shards: int = 1, tokenizer_from: Path | None = None):
    """Write a checkpoint directory.

    form: "online" (bf16 latent weights), "offline" (packed uint8 + multiplicative weight_scale,
    linear_class autobitlinear) or "offline-bitlinear" (packed + inverse scale, legacy class).
    """
    from transformers.integrations.bitnet import pack_weights

    directory.mkdir(parents=True, exist_ok=True)
    state = dict(state)
    qc = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
    if form != "online":
        qc = {"quant_method": "bitnet", "linear_class": "autobitlinear" if form == "offline" else "bitlinear",
              "quantization_mode": "offline"}
        for key in [k for k in state if any(p in k for p in PROJ_NAMES)]:
            ternary, scale = ternarize_reference(state[key])
            state[key] = pack_weights(ternary.to(torch.int8).clone()).contiguous()
            stored = scale if form == "offline" else 1.0 / scale
            state[key.replace(".weight", ".weight_scale")] = torch.tensor([stored], dtype=torch.bfloat16)
    hf_cfg = cfg.to_dict()
    hf_cfg["quantization_config"] = qc
    hf_cfg["architectures"] = ["BitNetForCausalLM"]
    (directory / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    write_shards(directory, state, shards)
    if tokenizer_from is not None:
        for f in tokenizer_from.iterdir():
            (directory / f.name).write_bytes(f.read_bytes())


def write_shards(directory: Path, state: dict, shards: int) -> None:
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def load_hf_reference(directory: Path):
    """transformers' BitNetForCausalLM from the directory, in float32, eval mode."""
    from transformers import BitNetForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = BitNetForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    # quantized loads keep the non-quantized tensors (embedding, norms) in the file's bf16
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.float()
    return model.eval()
