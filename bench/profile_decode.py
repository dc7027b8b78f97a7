#!/usr/bin/env python3
"""Where a decode step's time goes: GPU time per kernel (torch.profiler over eager steps) beside
the wall time of the same step replayed as a CUDA graph. 2B-4T shapes, random ternary weights.

    python bench/profile_decode.py [--batch 1] [--context 512] [--steps 20]

Last, the replayed step kernel by kernel from CUPTI's timestamps (graph_timeline): with programmatic
dependent launch kernels overlap, so each kernel's cost in the chain (previous kernel's end to its
own) is what a step pays for it, not its duration.

With BITNET_FUSED_DECODE=1 the step runs the one-launch decode kernel (csrc/decode_layers.cu), and
its phases are broken down from the kernel's own timeline.
"""

import argparse
import collections
import statistics
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


def short_name(kernel: str) -> str:
    """`void ns::(anonymous namespace)::gemm_kernel<4, 1, ...>(...)` -> `gemm_kernel<4, 1, ...>` (60 chars)."""
    name = kernel.split("(anonymous namespace)::")[-1].removeprefix("void ")
    depth, out = 0, []
    for ch in name:   # drop the argument list, keep template arguments
        if ch == "(" and depth == 0:
            break
        depth += ch == "<"
        depth -= ch == ">"
        out.append(ch)
    return "".join(out)[:60]


def graph_timeline(graphs, tok, pos, slot, layers: int, replays: int = 20) -> None:
    """Where a replayed decode step's time goes, kernel by kernel, under programmatic dependent launch
    (kernel start and end times from CUPTI, through torch.profiler): for each kernel of a layer, the
    median over layers and replays of its duration, how long before the previous kernel's end it
    started, and its cost in the chain, from the previous kernel's end to its own. The costs of a
    layer's kernels add up to the layer's time."""
    cuda = torch.autograd.DeviceType.CUDA
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graphs.run(tok, pos, slot)
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == cuda and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
    print_timeline(kernels, replays, layers)


def print_timeline(kernels: list[tuple[float, float, str]], replays: int, layers: int) -> None:
    """graph_timeline's table from (start us, end us, name) of every kernel of `replays` steps."""
    if not kernels or len(kernels) % replays:
        print(f"graph timeline: {len(kernels)} kernel records for {replays} replays; not broken down")
        return
    per_step = len(kernels) // replays
    steps = [kernels[i * per_step:(i + 1) * per_step] for i in range(replays)]
    names = [k[2] for k in steps[0]]
    first = next((i for i, n in enumerate(names) if "quantize_vec_kernel" in n), None)  # layer 0's input norm
    last = max((i for i, n in enumerate(names) if "gemm_kernel" in n), default=None)    # the last layer's down
    if first is None or last is None or last < first:  # the one-launch decode kernel: no op-by-op layers
        print(f"graph timeline: {per_step} kernels a step, no op-by-op layers; not broken down")
        return
    if (last + 1 - first) % layers:
        print(f"graph timeline: {last + 1 - first} layer kernels do not split into {layers} layers")
        return
    width = (last + 1 - first) // layers
    rows = collections.defaultdict(lambda: ([], [], []))   # position -> durations, early starts, costs

    def add(key, step, i):
        start, end, _ = step[i]
        prev_end = step[i - 1][1] if i > 0 else start
        rows[key][0].append(end - start)
        rows[key][1].append(prev_end - start)
        rows[key][2].append(end - prev_end)

    for step in steps:
        for i in range(first, last + 1):
            add((i - first) % width, step, i)
        for i in list(range(first)) + list(range(last + 1, per_step)):
            add(("outside", i), step, i)
    med = statistics.median
    print(f"graph timeline ({replays} replays, {per_step} kernels each; us, medians over layers and replays):")
    print(f"  {'kernel':<62} {'duration':>8} {'early':>6} {'cost':>6}")
    total = 0.0
    for p in range(width):
        d, e, c = rows[p]
        total += med(c)
        print(f"  {short_name(names[first + p]):<62} {med(d):8.2f} {med(e):6.2f} {med(c):6.2f}")
    print(f"  per layer: {total:.1f} us of chain cost, {layers} layers {total * layers:.0f} us")
    for key in sorted(k for k in rows if isinstance(k, tuple)):
        d, e, c = rows[key]
        print(f"  {short_name(names[key[1]]):<62} {med(d):8.2f} {med(e):6.2f} {med(c):6.2f}  (outside the layers)")
    span = med([s[-1][1] - s[0][0] for s in steps])
    print(f"  first kernel's start to last kernel's end: {span:.0f} us")


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
    graph_timeline(graphs, tok, pos, slot, cfg.num_layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
