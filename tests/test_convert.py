"""convert_checkpoint: the 1bitLLM format against an independent float64 model, the format's
contents, and every refusal (clear error, nothing left behind)."""

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_models as H
from engine import LLM, SamplingParams
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.convert import ConvertError, convert
from engine.quant import unpack_ternary
from numerics import assert_logits_match, int8_with_raw, record_engine_quants

ROOT = Path(__file__).resolve().parents[1]

# ---- 1bitLLM (llama-style) ------------------------------------------------------------------

ONEBIT = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=322, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)


def write_sentencepiece(directory: Path) -> None:
    import sentencepiece as spm

    lines = [f"line {i}: the cat sat on the mat and the dog ran to the park number {i * 7}" for i in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=320,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "added_tokens.json").write_text(json.dumps({"<pad>": 320, "<mask>": 321}))


def onebit_state(seed: int) -> dict[str, torch.Tensor]:
    """fp32 latent weights with 1bitLLM's tensor names."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = ONEBIT["hidden_size"], ONEBIT["intermediate_size"], ONEBIT["vocab_size"]
    state = {"model.embed_tokens.weight": torch.randn(v, h, generator=g),
             "model.norm.weight": 0.5 + torch.rand(h, generator=g), "lm_head.weight": 0.1 * torch.randn(v, h, generator=g)}
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    for layer in range(ONEBIT["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, shape in shapes.items():
            state[p + name + ".weight"] = 0.05 * torch.randn(*shape, generator=g)
        for name, size in (("input_layernorm", h), ("post_attention_layernorm", h),
                           ("self_attn.inner_attn_ln", h), ("mlp.ffn_layernorm", i)):
            state[p + name + ".weight"] = 0.5 + torch.rand(size, generator=g)
    return state


@pytest.fixture(scope="module")
def onebit(tmp_path_factory):
    src = tmp_path_factory.mktemp("onebit") / "bitnet_b1_58-tiny"
    src.mkdir()
    cfg = dict(ONEBIT, model_type="llama", architectures=["BitnetForCausalLM"], hidden_act="silu",
               num_key_value_heads=4, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    (src / "config.json").write_text(json.dumps(cfg))
    state = onebit_state(seed=3)
    save_file(state, str(src / "model.safetensors"))
    write_sentencepiece(src)
    out = convert(str(src), tmp_path_factory.mktemp("onebit-out") / "tiny", progress=False)
    return state, LLM(out)


def float64_reference(state: dict, ids: list[int]):
    """The 1bitLLM forward pass in float64, written out independently of the engine. Quantization
    follows bitnet-format.md (its scales in fp32 math); everything else is float64. Embedding, norms
    and head are taken at bf16 precision, as the converted format stores them."""
    c = ONEBIT
    state = {k: v if "_proj" in k else v.bfloat16() for k, v in state.items()}
    heads, dim = c["num_attention_heads"], c["hidden_size"] // c["num_attention_heads"]
    quants, raws = [], []

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]) * w.double()

    def bitlinear(x, w, record=True):
        x_q, raw = int8_with_raw(x)
        if record:
            quants.append(x_q)
            raws.append(raw)
        s = 127.0 / x.float().abs().amax(-1, keepdim=True).clamp(min=1e-5)
        w_scale = w.float().abs().mean().clamp(min=1e-5)
        w_t = torch.round(w.float() / w_scale).clamp(-1, 1)
        return (x_q.double() @ w_t.double().t()) * w_scale.double() / s.double()

    n = len(ids)
    pos = torch.arange(n, dtype=torch.float64)
    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = pos[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(t):  # [heads, n, dim]
        rotated = torch.cat([-t[..., dim // 2:], t[..., :dim // 2]], -1)
        return t * cos + rotated * sin

    x = state["model.embed_tokens.weight"].double()[ids]
    for layer in range(c["num_hidden_layers"]):
        w = {k[len(f"model.layers.{layer}."):]: v for k, v in state.items() if k.startswith(f"model.layers.{layer}.")}
        h = norm(x, w["input_layernorm.weight"])
        q = bitlinear(h, w["self_attn.q_proj.weight"])
        k = bitlinear(h, w["self_attn.k_proj.weight"], record=False)
        v = bitlinear(h, w["self_attn.v_proj.weight"], record=False)
        q, k, v = (t.view(n, heads, dim).transpose(0, 1) for t in (q, k, v))
        q, k = rope(q), rope(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)
        x = x + bitlinear(norm(attn, w["self_attn.inner_attn_ln.weight"]), w["self_attn.o_proj.weight"])
        h = norm(x, w["post_attention_layernorm.weight"])
        gate = bitlinear(h, w["mlp.gate_proj.weight"])
        up = bitlinear(h, w["mlp.up_proj.weight"], record=False)
        f = torch.nn.functional.silu(gate) * up
        x = x + bitlinear(norm(f, w["mlp.ffn_layernorm.weight"]), w["mlp.down_proj.weight"])
    return norm(x, state["model.norm.weight"]) @ state["lm_head.weight"].double().t(), quants, raws


def test_onebitllm_matches_float64_reference(onebit):
    state, llm = onebit
    assert llm.config.activation == "silu" and not llm.config.tie_word_embeddings
    ids = [1] + torch.randint(3, 320, (39,), generator=torch.Generator().manual_seed(0)).tolist()
    ours_q = record_engine_quants(llm)
    got = llm.logits(ids)
    del llm.ops.rmsnorm_quant
    expected, ref_q, ref_raw = float64_reference(state, ids)
    assert expected.abs().max() > 1.0
    assert_logits_match(got.double(), expected, ours_q, ref_q, ref_raw, atol=1e-4)


def test_onebitllm_tokenizer_and_generation(onebit):
    _, llm = onebit
    tok = llm.tokenizer
    assert tok.bos_id == 1 and 2 in llm.end_ids
    assert not tok.has_chat_template
    out = llm.generate("the cat sat", SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.prompt_token_ids[0] == 1


# ---- the converted format -------------------------------------------------------------------

def test_converted_contents(tiny_hf_dir, tiny_checkpoint):
    """Packed codes decode to exactly the ternarized source weights; tokenizer files are copied."""
    meta = json.loads((tiny_checkpoint / "config.json").read_text())
    assert meta["format"] == "bitnet-engine" and meta["format_version"] == 1
    assert meta["source"]["format"] == "bitnet-online-autobitlinear"
    cfg, tensors = load_checkpoint(tiny_checkpoint)
    src = load_file(str(tiny_hf_dir / "model.safetensors"))
    for layer in range(cfg.num_layers):
        for ours, theirs in (("q", "self_attn.q_proj"), ("down", "mlp.down_proj")):
            w = src[f"model.layers.{layer}.{theirs}.weight"]
            expected, scale = H.ternarize_reference(w)
            k = w.shape[1]
            assert torch.equal(unpack_ternary(tensors[f"layers.{layer}.{ours}.codes"], k).double(), expected)
            assert math.isclose(float(tensors[f"layers.{layer}.{ours}.scale"]), scale, rel_tol=1e-6)
    assert torch.equal(tensors["embed_tokens"], src["model.embed_tokens.weight"])
    assert (tiny_checkpoint / "tokenizer.json").is_file() and (tiny_checkpoint / "tokenizer_config.json").is_file()
    assert set(cfg.eos_token_ids) >= {1, 2}  # config eos and the tokenizer's <|eot_id|>


# ---- refusals -------------------------------------------------------------------------------

def copy_src(tiny_hf_dir: Path, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_dir, src)
    return src


def assert_refused(src, out: Path, *fragments: str):
    with pytest.raises(ConvertError) as e:
        convert(str(src), out, progress=False)
    for f in fragments:
        assert f in str(e.value), str(e.value)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp left
    return str(e.value)


def edit_config(src: Path, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def test_refuses_missing_directory(tmp_path):
    assert_refused(tmp_path / "nowhere" / "x", tmp_path / "out", "no such directory")


def test_refuses_missing_config(tiny_hf_dir, tmp_path):
    src = copy_src(tiny_hf_dir, tmp_path)
    (src / "config.json").unlink()
    assert_refused(src, tmp_path / "out", "no config.json")


def test_refuses_unknown_architecture(tiny_hf_dir, tmp_path):
    src = copy_src(tiny_hf_dir, tmp_path)
    edit_config(src, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    assert_refused(src, tmp_path / "out", "unknown architecture", "gpt2")


def test_refuses_pickles(tiny_hf_dir, tmp_path):
    src = copy_src(tiny_hf_dir, tmp_path)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    assert_refused(src, tmp_path / "out", "no *.safetensors", "pytorch_model.bin")


def test_refuses_shape_mismatch(tiny_hf_dir, tmp_path):
    src = copy_src(tiny_hf_dir, tmp_path)
    edit_config(src, intermediate_size=208)
    assert_refused(src, tmp_path / "out", "shape [200], expected [208]")


def test_refuses_non_ternary_packed_values(tiny_hf_dir, tmp_path, tiny_tokenizer_dir):
    cfg = H.bitnet_config()
    src = tmp_path / "packed"
    H.save_hf(src, cfg, H.random_bitnet_state(cfg, seed=2), "offline", tokenizer_from=tiny_tokenizer_dir)
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = 0b11011001  # one 2-bit field holds 3
    save_file(state, str(src / "model.safetensors"))
    assert_refused(src, tmp_path / "out", "not ternary", "layers.1.mlp.up_proj")


def test_refuses_corrupt_safetensors(tiny_hf_dir, tmp_path):
    src = copy_src(tiny_hf_dir, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    assert_refused(src, tmp_path / "out", "model.safetensors", "corrupt")


def test_refuses_missing_shard(tiny_hf_dir, tmp_path, tiny_tokenizer_dir):
    cfg = H.bitnet_config()
    src = tmp_path / "sharded"
    H.save_hf(src, cfg, H.random_bitnet_state(cfg, seed=2), "online", shards=2, tokenizer_from=tiny_tokenizer_dir)
    (src / "model-00002-of-00002.safetensors").unlink()
    assert_refused(src, tmp_path / "out", "missing weight file", "model-00002-of-00002")


def test_refuses_missing_tokenizer(tiny_hf_dir, tmp_path):
    src = copy_src(tiny_hf_dir, tmp_path)
    (src / "tokenizer.json").unlink()
    assert_refused(src, tmp_path / "out", "no tokenizer")


def test_refuses_existing_output_unless_forced(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ConvertError, match="already exists.*--force"):
        convert(str(tiny_hf_dir), out, progress=False)
    assert (out / "keep.txt").read_text() == "user data"
    convert(str(tiny_hf_dir), out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    LLM(out)  # the replacement is complete and loads


def test_failure_midway_leaves_nothing(tiny_hf_dir, tmp_path, monkeypatch):
    import engine.convert as conv

    calls = {"n": 0}
    real = conv.convert_projection

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # in the second layer, after a shard may have been written
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(conv, "convert_projection", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(str(tiny_hf_dir), out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_damaged_converted_checkpoint_is_refused_on_load(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    shard = next(ckpt.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=shard.name):
        LLM(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        LLM(ckpt)


def test_cli(tiny_hf_dir, tmp_path):
    run = [sys.executable, str(ROOT / "convert_checkpoint.py")]
    ok = subprocess.run(run + [str(tiny_hf_dir)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "checkpoints" / tiny_hf_dir.name / "config.json").is_file()  # default location
    again = subprocess.run(run + [str(tiny_hf_dir)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr
    help_ = subprocess.run(run + ["--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--force" in help_.stdout
