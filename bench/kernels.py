#!/usr/bin/env python3
"""W2A8 kernel benchmark: our GEMV/GEMM against torch bf16 matmul and the HBM floor, same run.

Method (as reference/anchors.md): each kernel is captured in a CUDA graph that launches it once per
weight copy, the copies rotated over more than 256 MB so weights come from HBM, not L2; the graph
is replayed and timed with CUDA events; the figure is the median replay time per launch. The
floor is the bytes a launch must move (packed weights + int8 activations + bf16 output) over the
device-to-device copy bandwidth measured at the start of this run (bench/timing.py).

    python bench/kernels.py [--json results.json] [--sweep]
"""

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import kernels  # noqa: E402
from engine.quant import pack_ternary  # noqa: E402
from timing import copy_bandwidth, time_graph  # noqa: E402

SHAPES = [("qkv", 3840, 2560), ("o", 2560, 2560), ("gate|up", 13824, 2560), ("down", 2560, 6912),
          ("3B qkv", 4800, 3200), ("3B o", 3200, 3200), ("3B gate|up", 20480, 3200), ("3B down", 3200, 10240),
          ("tiny", 16, 128)]  # one tile: the fixed cost of a launch
LAYER_2B4T = ["qkv", "o", "gate|up", "down"]
MS = (1, 4, 16)
ROTATE_BYTES = 320 << 20


def copies_for(nbytes: int) -> int:
    """Weight copies to rotate through so that they come from HBM (capped: tiny shapes would need
    a graph of hundreds of thousands of launches; theirs are L2-resident anyway)."""
    return min(max(4, math.ceil(ROTATE_BYTES / nbytes)), 1024)


def bench_shape(n: int, k: int, ms, bandwidth: float, sweep: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)
    tiled = kernels.repack(pack_ternary(w).cuda(), n, k)
    copies = [tiled] + [tiled.clone() for _ in range(copies_for(tiled.numel() * 4) - 1)]
    w_bf16 = w.to(torch.bfloat16).cuda()
    bf16_copies = [w_bf16] + [w_bf16.clone() for _ in range(copies_for(w_bf16.numel() * 2) - 1)]
    rows = []
    for m in ms:
        print(f"  {n} x {k}, M={m} ...", file=sys.stderr, flush=True)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x_q, x_s = kernels.quantize(x)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

        def ours(i, rt=0, warps=0):
            kernels.gemm(x_q, x_s, copies[i % len(copies)], n, k, [n], [1.0], out=out,
                         row_tiles_per_block=rt, warps=warps)

        us = time_graph(ours, len(copies))
        best = None
        if sweep:
            configs = [(rt, wp) for rt, wp in itertools.product((1, 2, 4), (2, 4, 5, 7, 8, 12, 16))
                       if not (m > 8 and rt == 4)]
            timed = [(time_graph(lambda i, c=c: ours(i, *c), len(copies)), c) for c in configs]
            best = min(timed)
        torch_us = time_graph(lambda i: torch.mm(x, bf16_copies[i % len(bf16_copies)].t(), out=y), len(bf16_copies))
        floor_bytes = n * k / 4 + m * k + 2 * m * n
        rows.append({"n": n, "k": k, "m": m, "ours_us": us, "torch_bf16_us": torch_us,
                     "floor_us": floor_bytes / bandwidth * 1e6,
                     "sweep_best_us": best[0] if best else None, "sweep_best_config": best[1] if best else None})
    return rows


def bench_quantize(bandwidth: float) -> list[dict]:
    rows = []
    for k, m in itertools.product((2560, 6912), (1, 16)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        q = torch.empty(m, kernels.padded(k), dtype=torch.int8, device="cuda")
        s = torch.empty(m, device="cuda")
        us = time_graph(lambda i: kernels.quantize(x, w, 1e-5, q, s), 20)
        rows.append({"op": "rmsnorm+quant", "m": m, "k": k, "us": us, "floor_us": (3 * m * k + 2 * k) / bandwidth * 1e6})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write all figures to this file")
    parser.add_argument("--sweep", action="store_true", help="also time every launch configuration, report the best")
    parser.add_argument("--shapes", default="all", help="comma-separated shape names, or all")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    kernels.load()
    gpu = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"{gpu}: device-to-device copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    shapes = SHAPES if args.shapes == "all" else [s for s in SHAPES if s[0] in args.shapes.split(",")]
    results = []
    for name, n, k in shapes:
        for row in bench_shape(n, k, MS, bandwidth, args.sweep):
            results.append({"shape": name, **row})

    print(f"\nW2A8 GEMM, median us per launch (CUDA graph replay, weights from HBM) on {gpu}")
    header = f"{'shape':<11} {'N x K':>12} {'M':>3} {'ours':>8} {'bf16':>8} {'floor':>7} {'x floor':>8} {'vs bf16':>8}"
    if args.sweep:
        header += f" {'best':>8} {'config':>8}"
    print(header)
    for r in results:
        line = (f"{r['shape']:<11} {r['n']:>5} x {r['k']:<5} {r['m']:>3} {r['ours_us']:>8.2f} {r['torch_bf16_us']:>8.2f} "
                f"{r['floor_us']:>7.2f} {r['ours_us'] / r['floor_us']:>7.2f}x {r['torch_bf16_us'] / r['ours_us']:>7.2f}x")
        if args.sweep:
            line += f" {r['sweep_best_us']:>8.2f} {str(r['sweep_best_config']):>8}"
        print(line)
    layer = {}
    for m in MS:
        sel = [r for r in results if r["shape"] in LAYER_2B4T and r["m"] == m]
        if len(sel) == 4:
            ours, floor = sum(r["ours_us"] for r in sel), sum(r["floor_us"] for r in sel)
            bf16 = sum(r["torch_bf16_us"] for r in sel)
            layer[m] = {"ours_us": ours, "floor_us": floor, "torch_bf16_us": bf16}
            print(f"one 2B-4T layer (qkv+o+gate|up+down), M={m}: ours {ours:.2f} us, floor {floor:.2f} us "
                  f"({ours / floor:.2f}x), torch bf16 {bf16:.2f} us ({bf16 / ours:.2f}x slower)")

    quant = bench_quantize(bandwidth)
    print("\nactivation quantization (RMSNorm fused), median us")
    for r in quant:
        print(f"  {r['op']} M={r['m']:<3} K={r['k']:<5} {r['us']:6.2f} us (floor {r['floor_us']:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "copy_bandwidth_Bps": bandwidth, "gemm": results,
                                         "layer_2b4t": layer, "quantize": quant}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
