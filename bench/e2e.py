#!/usr/bin/env python3
"""End-to-end benchmark: a model with 2B-4T shapes and random ternary weights (which cost exactly
what real weights cost), run through the engine's LLM runtime on the GPU.

Reports batch-1 decode tok/s (64- and 1024-token prompts, 256 new tokens), prefill tok/s (512 and
2048 tokens), aggregate decode tok/s at batch 1/8/32/64, and peak GPU memory (batch 1, a
4096-token context), each beside the batch-1 bandwidth floor: bytes a decode step must read
(2-bit weights + the bf16 embedding used as LM head + the KV cache) over the copy bandwidth
measured in this run.

    python bench/e2e.py [--json results.json] [--quick]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import LLM, SamplingParams  # noqa: E402
from engine.checkpoint import expected_tensors  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.quant import pack_ternary  # noqa: E402
from engine.tokenizer import load_tokenizer  # noqa: E402
from timing import copy_bandwidth  # noqa: E402

CONFIG_2B4T = ModelConfig(vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_layers=30, num_heads=20,
                          num_kv_heads=5, head_dim=128, max_position_embeddings=4096, rope_theta=500000.0,
                          rms_norm_eps=1e-5, activation="relu2", tie_word_embeddings=True, bos_token_id=128000,
                          eos_token_ids=(128001, 128009))


def random_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Checkpoint-format tensors with random ternary codes, made on the GPU, kept on the host."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = {}
    for name, (shape, dtype) in expected_tensors(cfg).items():
        if name.endswith(".codes"):
            n, k = shape[0], cfg.linear_shapes()[name.split(".")[2]][1]
            w = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda", generator=gen)
            out[name] = pack_ternary(w).cpu()
        elif name.endswith(".scale"):
            out[name] = torch.tensor([0.02])
        elif name == "embed_tokens" or name == "lm_head":
            out[name] = (torch.randn(shape, device="cuda", generator=gen) * 0.02).to(dtype).cpu()
        else:  # norm gains
            out[name] = (0.5 + torch.rand(shape, device="cuda", generator=gen)).to(dtype).cpu()
    return out


def byte_tokenizer(directory: Path):
    """A byte-level tokenizer (prompts here are token ids; it only detokenizes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))
    return load_tokenizer(directory)


def decode_floor(cfg: ModelConfig, context: int, bandwidth: float) -> float:
    """Batch-1 tok/s if a step only had to read the weights, the head and the KV cache once."""
    weights = sum(n * k / 4 for n, k in cfg.linear_shapes().values()) * cfg.num_layers
    head = cfg.vocab_size * cfg.hidden_size * 2
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * context
    return bandwidth / (weights + head + kv)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer new tokens, batches up to 8")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/e2e.py needs a CUDA GPU", file=sys.stderr)
        return 2
    cfg = CONFIG_2B4T
    gpu = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    with tempfile.TemporaryDirectory() as d:
        tokenizer = byte_tokenizer(Path(d))
    start = time.perf_counter()
    llm = LLM.from_tensors(cfg, random_tensors(cfg), tokenizer, device="cuda")
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() + 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * 4096
    print(f"{gpu}: copy bandwidth {bandwidth / 1e12:.2f} TB/s; model built in {time.perf_counter() - start:.1f} s, "
          f"{torch.cuda.memory_allocated() / 1e9:.2f} GB on the GPU", flush=True)
    new = 64 if args.quick else 256
    greedy = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    rows = []

    def record(what, tok_s, context):
        floor = decode_floor(cfg, context, bandwidth)
        rows.append({"what": what, "tok_s": tok_s, "batch1_floor_tok_s": floor})
        print(f"  {what:<38} {tok_s:10.1f} tok/s   (batch-1 floor {floor:7.0f} tok/s)", flush=True)

    llm.generate(prompts(1, 16, cfg.vocab_size, 0), SamplingParams(temperature=0, max_new_tokens=4))  # warm up
    for length in (64, 1024):
        llm.generate(prompts(1, length, cfg.vocab_size, length), greedy)
        s = llm.last_stats
        record(f"decode, batch 1, {length}-token prompt", (s.generated_tokens - 1) / s.decode_seconds, length + new // 2)
    for length in (512, 2048):
        best = 0.0
        for seed in range(3):   # the first run of a length pays one-time setup (attention kernels' workspaces)
            llm.generate(prompts(1, length, cfg.vocab_size, seed), SamplingParams(temperature=0, max_new_tokens=1))
            best = max(best, llm.last_stats.prompt_tokens / llm.last_stats.prefill_seconds)
        record(f"prefill, {length} tokens", best, length)
    for batch in (1, 8) if args.quick else (1, 8, 32, 64):
        llm.generate(prompts(batch, 64, cfg.vocab_size, batch), SamplingParams(temperature=0, max_new_tokens=new // 2,
                                                                                  ignore_eos=True))
        s = llm.last_stats
        record(f"decode, aggregate, batch {batch}", (s.generated_tokens - batch) / s.decode_seconds, 64 + new // 4)

    # the same model without CUDA graphs (the debugging path), as a baseline in the same run
    llm.graphs, llm._runtime = False, None
    llm.generate(prompts(1, 64, cfg.vocab_size, 64), SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True))
    s = llm.last_stats
    record("decode, batch 1, eager (no graphs)", (s.generated_tokens - 1) / s.decode_seconds, 64 + 16)
    llm.graphs = None

    llm._runtime = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    llm.generate(prompts(1, 4096 - 64, cfg.vocab_size, 7), SamplingParams(temperature=0, max_new_tokens=64,
                                                                           ignore_eos=True))
    peak = torch.cuda.max_memory_allocated() / 1e9
    print(f"  peak GPU memory, batch 1, 4096-token context: {peak:.2f} GB "
          f"(weights, head and a 4096-token cache alone: {resident / 1e9:.2f} GB)")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "copy_bandwidth_Bps": bandwidth, "rows": rows,
                                         "peak_memory_GB_4096_ctx": peak}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
