#!/usr/bin/env python3
"""End-to-end benchmark: a model with 2B-4T shapes and random ternary weights (which cost exactly
what real weights cost), run through the engine's LLM runtime on the GPU.

Reports batch-1 decode tok/s (64- and 1024-token prompts, 256 new tokens), prefill tok/s (512 and
2048 tokens), aggregate decode tok/s at batch 1/8/32/64, and peak GPU memory (batch 1, a
4096-token context), each beside the batch-1 bandwidth floor: bytes a decode step must read
(2-bit weights + the LM head + the KV cache) over the copy bandwidth measured in this run.

Two comparisons in the same run:
  * the int8 LM head (LLM(head="int8")): batch-1 decode tok/s (64-token prompt) beside the bf16
    head's, and how far its logits are from the bf16 head's over 512 positions of a random prompt
    (top-1 agreement, mean and max |logit difference| relative to each position's logit range).
    With --head int8 every row uses the int8 head instead, and this comparison is left out;
  * the baseline the W2A8 prefill must not be slower than: the same model with every ternary
    projection as a dense bf16 weight (w * scale) used through torch matmul on bf16 activations
    (not quantized), everything else the same (Bf16WeightOps below), prefill tok/s at 512 and 2048
    tokens through the same LLM runtime path. It runs in a child process with torch's default cuBLAS
    workspace: the engine shrinks that workspace (engine/cuda_ops.py), which would slow the baseline.

    python bench/e2e.py [--json results.json] [--quick] [--head {bf16,int8}]
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import LLM, SamplingParams  # noqa: E402
from engine.checkpoint import expected_tensors  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.cuda_ops import CudaOps  # noqa: E402
from engine.ops import TernaryWeight  # noqa: E402
from engine.quant import pack_ternary, unpack_ternary  # noqa: E402
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


class Bf16WeightOps(CudaOps):
    """The prefill baseline: every ternary projection is a dense bf16 weight (w * scale, fused q|k|v
    and gate|up keeping each projection's scale) used through torch matmul on bf16 activations that
    are not quantized. The norms in front of the projections are torch's rms_norm (no quantization,
    a unit "scale" is passed along), the MLP activation is torch elementwise ops, a residual add is
    addmm's epilogue. Everything else is CudaOps' own: embedding, RoPE + KV-cache write kernel,
    prompt attention (SDPA) and decode attention, final norm, LM head; and the LLM runtime path."""
    name = "cuda-bf16-weights"
    rope_in_gemm = False   # that kernel multiplies int8 activations by 2-bit weights: torch matmul, then RoPE

    def __init__(self, dtype: torch.dtype = torch.bfloat16, device="cuda"):
        super().__init__(dtype, device)
        self._unit = torch.ones((), dtype=torch.float32, device=self.device)

    def prepare_linear(self, parts, in_features: int) -> TernaryWeight:
        dense = [(unpack_ternary(codes.to(self.device), in_features).float()
                  * scale.to(self.device, torch.float32)).to(torch.bfloat16) for codes, scale in parts]
        return TernaryWeight(torch.cat(dense), tuple(d.shape[0] for d in dense), tuple(float(s) for _, s in parts),
                             in_features)

    def _unit_scale(self, x):
        return self._unit.expand(*x.shape[:-1], 1)

    def quantize(self, x):
        return x.to(self.dtype), self._unit_scale(x)

    def rmsnorm_quant(self, x, weight, eps):
        return F.rms_norm(x.to(self.dtype), (x.shape[-1],), weight.to(self.dtype), eps), self._unit_scale(x)

    def bitlinear(self, x_q, x_scale, w: TernaryWeight, residual=None):
        lead = x_q.shape[:-1]
        x = x_q.reshape(-1, w.in_features)
        if residual is None:
            y = torch.mm(x, w.weight.t())
        else:
            y = torch.addmm(residual.reshape(-1, w.out_features).to(self.dtype), x, w.weight.t())
        return y.view(*lead, -1)

    def gate_up_act_norm_quant(self, x_q, x_scale, w: TernaryWeight, activation, sub_norm, eps):
        gate, up = self.bitlinear(x_q, x_scale, w).split(w.segments, dim=-1)
        act = torch.relu(gate).square() if activation == "relu2" else F.silu(gate)
        return self.rmsnorm_quant(act * up, sub_norm, eps)


def decode_floor(cfg: ModelConfig, context: int, bandwidth: float, head: str = "bf16") -> float:
    """Batch-1 tok/s if a step only had to read the weights, the head and the KV cache once."""
    weights = sum(n * k / 4 for n, k in cfg.linear_shapes().values()) * cfg.num_layers
    head = cfg.vocab_size * cfg.hidden_size * 2 if head == "bf16" else cfg.vocab_size * (cfg.hidden_size + 4)
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * context
    return bandwidth / (weights + head + kv)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def decode_rate(llm: LLM, length: int, params: SamplingParams) -> float:
    """Batch-1 decode tok/s after a `length`-token prompt (random ids, seeded by the length)."""
    llm.generate(prompts(1, length, llm.config.vocab_size, length), params)
    s = llm.last_stats
    return (s.generated_tokens - 1) / s.decode_seconds


def prefill_rate(llm: LLM, length: int) -> float:
    """Prefill tok/s of one `length`-token prompt: the best of 3 (the first run of a length pays
    one-time setup: attention kernels' workspaces)."""
    best = 0.0
    for seed in range(3):
        llm.generate(prompts(1, length, llm.config.vocab_size, seed), SamplingParams(temperature=0, max_new_tokens=1))
        best = max(best, llm.last_stats.prompt_tokens / llm.last_stats.prefill_seconds)
    return best


def warm_up(llm: LLM) -> None:
    llm.generate(prompts(1, 16, llm.config.vocab_size, 0), SamplingParams(temperature=0, max_new_tokens=4))


def release_gpu_memory() -> None:
    """Give the memory of dropped models, runtimes and graphs back to the GPU."""
    gc.collect()
    torch.cuda.empty_cache()


def head_agreement(a: LLM, b: LLM, positions: int) -> dict:
    """How far b's logits are from a's over `positions` positions of one random prompt."""
    ids = prompts(1, positions, a.config.vocab_size, 11)[0]
    la, lb = a.logits(ids), b.logits(ids)
    diff = (lb - la).abs()
    spread = la.amax(dim=-1) - la.amin(dim=-1)
    return {"positions": positions,
            "top1_agreement": float((la.argmax(dim=-1) == lb.argmax(dim=-1)).float().mean()),
            "mean_abs_logit_diff_over_range": float((diff.mean(dim=-1) / spread).mean()),
            "max_abs_logit_diff_over_range": float((diff.amax(dim=-1) / spread).max())}


def bf16_baseline_rates(lengths) -> dict[int, float]:
    """Prefill tok/s of the bf16-weights model, measured by a child process (see the docstring)."""
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # torch's Hopper default: 32 MiB
    out = subprocess.run([sys.executable, __file__, "--bf16-baseline", ",".join(map(str, lengths))], env=env,
                         capture_output=True, text=True, check=True).stdout
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer new tokens, batches up to 8")
    parser.add_argument("--head", choices=("bf16", "int8"), default="bf16",
                        help="the LM head of the main model (default: %(default)s); with bf16 the int8 head is "
                             "also measured beside it")
    parser.add_argument("--bf16-baseline", metavar="LENGTHS", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/e2e.py needs a CUDA GPU", file=sys.stderr)
        return 2
    cfg = CONFIG_2B4T
    if args.bf16_baseline:
        with tempfile.TemporaryDirectory() as d:
            tokenizer = byte_tokenizer(Path(d))
        model = LLM.from_tensors(cfg, random_tensors(cfg), tokenizer, ops=Bf16WeightOps(torch.bfloat16, "cuda"),
                                 graphs=False)
        warm_up(model)
        print(json.dumps({n: prefill_rate(model, int(n)) for n in args.bf16_baseline.split(",")}))
        return 0
    gpu = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    with tempfile.TemporaryDirectory() as d:
        tokenizer = byte_tokenizer(Path(d))
    start = time.perf_counter()
    tensors = random_tensors(cfg)   # kept on the host: the comparison models below are built from them
    llm = LLM.from_tensors(cfg, tensors, tokenizer, device="cuda", head=args.head)
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() + 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * 4096
    print(f"{gpu}: copy bandwidth {bandwidth / 1e12:.2f} TB/s; model built in {time.perf_counter() - start:.1f} s, "
          f"{torch.cuda.memory_allocated() / 1e9:.2f} GB on the GPU; {args.head} LM head", flush=True)
    # peak memory first, while nothing but the model is on the GPU: a 4032-token prompt + 64 new tokens
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    llm.generate(prompts(1, 4096 - 64, cfg.vocab_size, 7), SamplingParams(temperature=0, max_new_tokens=64,
                                                                           ignore_eos=True))
    peak = torch.cuda.max_memory_allocated() / 1e9
    print(f"  peak GPU memory, batch 1, 4096-token context: {peak:.3f} GB "
          f"(weights, head and a 4096-token cache alone: {resident / 1e9:.3f} GB)", flush=True)
    llm._runtime = None
    release_gpu_memory()
    new = 64 if args.quick else 256
    greedy = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    rows = []

    def record(what, tok_s, context, head=args.head):
        floor = decode_floor(cfg, context, bandwidth, head)
        rows.append({"what": what, "tok_s": tok_s, "batch1_floor_tok_s": floor})
        print(f"  {what:<44} {tok_s:10.1f} tok/s   (batch-1 floor {floor:7.0f} tok/s)", flush=True)

    warm_up(llm)
    decode = {}
    for length in (64, 1024):
        decode[length] = decode_rate(llm, length, greedy)
        record(f"decode, batch 1, {length}-token prompt", decode[length], length + new // 2)
    w2a8_prefill = {}
    for length in (512, 2048):
        w2a8_prefill[length] = prefill_rate(llm, length)
        record(f"prefill, {length} tokens", w2a8_prefill[length], length)
    for batch in (1, 8) if args.quick else (1, 8, 32, 64):
        llm.generate(prompts(batch, 64, cfg.vocab_size, batch), SamplingParams(temperature=0, max_new_tokens=new // 2,
                                                                                  ignore_eos=True))
        s = llm.last_stats
        record(f"decode, aggregate, batch {batch}", (s.generated_tokens - batch) / s.decode_seconds, 64 + new // 4)

    # the opt-in one-launch decode kernel (BITNET_FUSED_DECODE=1) beside the op-by-op step, same run
    fused = llm.model.ops.fused_decode
    llm.model.ops.fused_decode, llm._runtime = True, None
    record("decode, batch 1, 64-token prompt, one-launch layers", decode_rate(llm, 64, greedy), 64 + new // 2)
    llm.generate(prompts(8, 64, cfg.vocab_size, 8), SamplingParams(temperature=0, max_new_tokens=new // 2,
                                                                      ignore_eos=True))
    s = llm.last_stats
    record("decode, aggregate, batch 8, one-launch layers", (s.generated_tokens - 8) / s.decode_seconds, 64 + new // 4)
    llm.model.ops.fused_decode, llm._runtime = fused, None
    release_gpu_memory()

    # the same model without CUDA graphs (the debugging path), as a baseline in the same run
    llm.graphs, llm._runtime = False, None
    llm.generate(prompts(1, 64, cfg.vocab_size, 64), SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True))
    s = llm.last_stats
    record("decode, batch 1, eager (no graphs)", (s.generated_tokens - 1) / s.decode_seconds, 64 + 16)
    record("prefill, 512 tokens, eager (no graphs)", prefill_rate(llm, 512), 512)
    llm.graphs, llm._runtime = None, None
    release_gpu_memory()

    # the int8 LM head beside the bf16 one: same weights, the head quantized per row
    int8_head = None
    if args.head == "bf16":
        int8 = LLM.from_tensors(cfg, tensors, tokenizer, device="cuda", head="int8")
        warm_up(int8)
        rate = decode_rate(int8, 64, greedy)
        record("decode, batch 1, 64-token prompt, int8 head", rate, 64 + new // 2, head="int8")
        int8_head = {"decode_batch1_64_tok_s": rate, "bf16_head_decode_batch1_64_tok_s": decode[64],
                     **head_agreement(llm, int8, 512)}
        print(f"  int8 head: decode {rate:.1f} tok/s against {decode[64]:.1f} with the bf16 head "
              f"({rate / decode[64]:.2f}x); over {int8_head['positions']} positions, top-1 agreement with the bf16 "
              f"head {int8_head['top1_agreement']:.1%}, |logit difference| mean "
              f"{int8_head['mean_abs_logit_diff_over_range']:.3%} / max {int8_head['max_abs_logit_diff_over_range']:.3%}"
              " of the logit range", flush=True)
        del int8
        release_gpu_memory()

    # the prefill baseline: the same model with dense bf16 weights through torch matmul
    prefill_vs_bf16 = []
    for length, rate in bf16_baseline_rates((512, 2048)).items():
        record(f"prefill, {length} tokens, bf16 weights (torch)", rate, length)
        prefill_vs_bf16.append({"tokens": length, "w2a8_tok_s": w2a8_prefill[length], "bf16_weights_tok_s": rate,
                                "w2a8_over_bf16": w2a8_prefill[length] / rate})
    for r in prefill_vs_bf16:
        print(f"  prefill, {r['tokens']} tokens: W2A8 {r['w2a8_tok_s']:,.0f} tok/s, bf16 weights through torch "
              f"matmul {r['bf16_weights_tok_s']:,.0f} tok/s: W2A8 / bf16 {r['w2a8_over_bf16']:.2f}x", flush=True)

    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "copy_bandwidth_Bps": bandwidth, "head": args.head, "rows": rows,
                                         "peak_memory_GB_4096_ctx": peak, "int8_head": int8_head,
                                         "prefill_vs_bf16_weights": prefill_vs_bf16}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
