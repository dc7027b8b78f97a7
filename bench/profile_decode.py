#!/usr/bin/env python3
"""Where a decode step's time goes: GPU time per kernel (torch.profiler over eager steps) beside
the wall time of the same step replayed as a CUDA graph. 2B-4T shapes, random ternary weights.

    python bench/profile_decode.py [--batch 1] [--context 512] [--steps 20]
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

    graphs = DecodeGraphs(model, cache, b)
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
