#!/usr/bin/env python3
"""Where a decode step's time goes: GPU time per kernel (torch.profiler over eager steps) beside
the wall time of the same step replayed as a CUDA graph. 2B-4T shapes, random ternary weights.

    python bench/profile_decode.py [--batch 1] [--context 512] [--steps 20]

With BITNET_FUSED_DECODE=1 the step runs the one-launch decode kernel (csrc/decode_layers.cu), and
its phases are broken down from the kernel's own timeline.
"""

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from e2e import CONFIG_2B4T, byte_tokenizer, random_tensors  # noqa: E402
from engine import LLM  # noqa: E402
from engine.graphs import DecodeGraphs  # noqa: E402


PHASES = ("norm + q|k|v", "rope + cache", "attention splits", "attention combine", "sub-norm + o",
          "norm + gate|up", "act + down")


def fused_phases(model, cache, ids, positions, slots, runs: int = 5) -> None:
    """Where the one-launch decode kernel's time goes, from its timeline: per phase, the median block's
    time from the barrier before it to its arrival at the next one (split into norm, GEMV, and the rest:
    the next weights' prefetch), the last block's, and the barrier's own latency (last arrival to the
    median departure); medians over layers and runs."""
    from engine import kernels

    cfg = model.cfg
    blocks = kernels.decode_layers_blocks()
    timeline = torch.zeros(cfg.num_layers, kernels.DECODE_PHASES, 4, blocks, dtype=torch.int64, device="cuda")
    x = model.ops.embed(ids, model.embed_tokens).reshape(ids.shape[0], -1)
    state = model.backend_state
    samples = collections.defaultdict(list)
    for _ in range(runs):
        kernels.decode_layers(state["decode_table"], cfg, x, positions.reshape(-1), slots, model.cos, model.sin,
                              cache.k, cache.v, state["decode_barrier"], timeline)
        t = timeline.cpu().double().flatten(0, 1)[:-1]   # [layers * phases, 4, blocks]; the last has no barrier
        for i in range(1, t.shape[0]):
            p, start = i % len(PHASES), t[i - 1, 1]
            work = t[i, 0] - start
            samples[p, "work"].append(float(work.median()))
            samples[p, "last"].append(float(work.max()))
            samples[p, "barrier"].append(float(t[i, 1].median() - t[i, 0].max()))
            if t[i, 2].min() > 0:
                samples[p, "norm"].append(float((t[i, 2] - start).median()))
                samples[p, "gemv"].append(float((t[i, 3] - t[i, 2]).median()))
                samples[p, "after"].append(float((t[i, 0] - t[i, 3]).median()))

    def med(p, k):
        v = sorted(samples[p, k])
        return v[len(v) // 2] / 1e3 if v else float("nan")

    print(f"fused decode kernel, {blocks} blocks: each phase per layer, us (medians over layers and {runs} runs)")
    print(f"  {'phase':<20} {'median block':>12} {'= norm':>7} {'+ GEMV':>7} {'+ rest':>7} {'last block':>11} "
          f"{'barrier':>8}")
    total = 0.0
    for p, name in enumerate(PHASES):
        total += med(p, "last") + med(p, "barrier")
        print(f"  {name:<20} {med(p, 'work'):12.2f} {med(p, 'norm'):7.2f} {med(p, 'gemv'):7.2f} {med(p, 'after'):7.2f} "
              f"{med(p, 'last'):11.2f} {med(p, 'barrier'):8.2f}")
    print(f"  per layer (last blocks + barriers): {total:.1f} us")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=512, help="tokens already in each sequence's cache")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cfg = CONFIG_2B4T
    with tempfile.TemporaryDirectory() as d:
        tokenizer = byte_tokenizer(Path(d))
    llm = LLM.from_tensors(cfg, random_tensors(cfg), tokenizer, device="cuda")
    model = llm.model
    cache = model.new_cache(args.batch, args.context + args.steps + 1)
    b = args.batch
    ids = torch.randint(0, cfg.vocab_size, (b, 1), device="cuda")
    positions = torch.full((b, 1), args.context, device="cuda")
    slots = torch.arange(b, device="cuda")

    for _ in range(3):
        model.forward(ids, positions, cache, slots)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            model.forward(ids, positions, cache, slots)
        torch.cuda.synchronize()
    per_kernel = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name][0] += e.device_time_total
            per_kernel[e.name][1] += 1
    total = sum(t for t, _ in per_kernel.values())
    launches = sum(n for _, n in per_kernel.values()) / args.steps
    print(f"eager decode step, batch {b}, context {args.context}: {total / args.steps:.1f} us of kernel time "
          f"in {launches:.0f} launches")
    for name, (t, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"  {t / args.steps:8.1f} us  {n / args.steps:5.1f}x  {name[:110]}")

    if model.backend_state.get("decode_table") is not None and model.ops.fused_decode:
        fused_phases(model, cache, ids, positions, slots)

    graphs = DecodeGraphs(model, cache, b, torch.cuda.graph_pool_handle())
    tok = [int(i) for i in ids[:, 0]]
    pos = [args.context] * b
    slot = list(range(b))
    for _ in range(3):
        graphs.run(tok, pos, slot)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        graphs.run(tok, pos, slot)
    torch.cuda.synchronize()
    step = (time.perf_counter() - start) / args.steps
    print(f"graph replay: {step * 1e6:.1f} us per step ({b / step:.0f} tok/s); "
          f"gaps and launch costs: {step * 1e6 - total / args.steps:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
