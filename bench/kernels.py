#!/usr/bin/env python3
"""W2A8 kernel benchmark: our GEMV/GEMM against torch bf16 matmul and the HBM floor, same run.

Method (as reference/anchors.md): each kernel is captured in a CUDA graph that launches it once per
weight copy, the copies rotated over more than 256 MB so weights come from HBM, not L2; the graph
is replayed and timed with CUDA events; the figure is the median replay time per launch. The
floor is the bytes a launch must move (packed weights + int8 activations + bf16 output) over the
device-to-device copy bandwidth measured at the start of this run (bench/timing.py).
Prefill rows (the 2B-4T shapes at M = 512 and 2048 tokens, the large-M kernel) report int8 TOPS
(2 M N K / time) against torch bf16 matmul's TFLOPS on the same shape; --sweep adds every GEMV
launch (row tiles per block, warps, chunks each warp loads at once), every large-M tile and K split
(clusters of 1-4 blocks) and both kernels around the small/large dispatch threshold;
--prefill-only --prefill-ms 512,1024 times only those rows.

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
from engine.ops import rope_tables  # noqa: E402
from engine.quant import pack_ternary  # noqa: E402
from timing import copy_bandwidth, time_graph  # noqa: E402

SHAPES = [("qkv", 3840, 2560), ("o", 2560, 2560), ("gate|up", 13824, 2560), ("down", 2560, 6912),
          ("3B qkv", 4800, 3200), ("3B o", 3200, 3200), ("3B gate|up", 20480, 3200), ("3B down", 3200, 10240),
          ("tiny", 16, 128)]  # one tile: the fixed cost of a launch
LAYER_2B4T = ["qkv", "o", "gate|up", "down"]
MS = (1, 4, 16)
PREFILL_MS = (512, 2048)            # prompt tokens per GEMM: the large-M kernel
CROSSOVER_MS = (16, 32, 48, 64, 96, 128, 192, 256)  # --sweep: small-M vs large-M kernel, to place the threshold
ROTATE_BYTES = 320 << 20


def copies_for(nbytes: int) -> int:
    """Weight copies to rotate through so that they come from HBM (capped: tiny shapes would need
    a graph of hundreds of thousands of launches; theirs are L2-resident anyway)."""
    return min(max(4, math.ceil(ROTATE_BYTES / nbytes)), 1024)


def rotated_weights(n: int, k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A random ternary n x k weight as enough tiled copies (ours) and bf16 copies (torch's) to
    rotate through so that each launch reads its weights from HBM."""
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)
    tiled = kernels.repack(pack_ternary(w).cuda(), n, k)
    copies = [tiled] + [tiled.clone() for _ in range(copies_for(tiled.numel() * 4) - 1)]
    w_bf16 = w.to(torch.bfloat16).cuda()
    bf16_copies = [w_bf16] + [w_bf16.clone() for _ in range(copies_for(w_bf16.numel() * 2) - 1)]
    return copies, bf16_copies


def bench_shape(n: int, k: int, ms, bandwidth: float, sweep: bool) -> list[dict]:
    copies, bf16_copies = rotated_weights(n, k)
    rows = []
    for m in ms:
        print(f"  {n} x {k}, M={m} ...", file=sys.stderr, flush=True)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x_q, x_s = kernels.quantize(x)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

        def ours(i, rt=0, warps=0, unroll=0):
            kernels.gemm(x_q, x_s, copies[i % len(copies)], n, k, [n], [1.0], out=out,
                         row_tiles_per_block=rt, warps=warps, unroll=unroll)

        us = time_graph(ours, len(copies))
        best = None
        if sweep:
            configs = list(itertools.product((1, 2, 4), (2, 4, 5, 7, 8, 12, 16), (2, 4)))
            timed = [(time_graph(lambda i, c=c: ours(i, *c), len(copies)), c) for c in configs]
            best = min(timed)
            # the default again after the sweep: how far one figure moves within a run
            timed.append((time_graph(ours, len(copies)), "default again"))
        torch_us = time_graph(lambda i: torch.mm(x, bf16_copies[i % len(bf16_copies)].t(), out=y), len(bf16_copies))
        floor_bytes = n * k / 4 + m * k + 2 * m * n
        rows.append({"n": n, "k": k, "m": m, "ours_us": us, "torch_bf16_us": torch_us,
                     "floor_us": floor_bytes / bandwidth * 1e6,
                     "sweep_best_us": best[0] if best else None, "sweep_best_config": best[1] if best else None,
                     **({"sweep_us": {str(c): t for t, c in timed}} if sweep else {})})
    return rows


def bench_layer_chain(bandwidth: float, ms) -> list[dict]:
    """The four 2B-4T projections of a layer launched one after the other, layer after layer, in one
    graph (as in a decode step, without the kernels between them), weights rotated over enough layer
    copies that they come from HBM: microseconds per layer. Unlike the sum of the rows above, a
    projection here may prefetch its weights while the one before it, of another shape, runs."""
    dims = {name: (n, k) for name, n, k in SHAPES if name in LAYER_2B4T}
    layer_bytes = sum(n * k // 4 for n, k in dims.values())
    copies = copies_for(layer_bytes)
    gen = torch.Generator().manual_seed(5)
    weights = {name: [kernels.repack(pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)).cuda(),
                                     n, k)] for name, (n, k) in dims.items()}
    for name in dims:
        weights[name] += [weights[name][0].clone() for _ in range(copies - 1)]
    rows = []
    for m in ms:
        print(f"  layer chain M={m} ...", file=sys.stderr, flush=True)
        inputs = {name: kernels.quantize(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
                  for name, (n, k) in dims.items()}
        outs = {name: torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for name, (n, k) in dims.items()}

        def layer(i):
            for name in LAYER_2B4T:
                n, k = dims[name]
                kernels.gemm(*inputs[name], weights[name][i % copies], n, k, [n], [1.0], out=outs[name])

        floor = sum(n * k / 4 + m * k + 2 * m * n for n, k in dims.values()) / bandwidth * 1e6
        rows.append({"m": m, "us": time_graph(layer, copies), "floor_us": floor})
    return rows


def bench_prefill(n: int, k: int, ms, sweep: bool) -> list[dict]:
    """Many tokens: the large-M kernel against torch bf16 matmul, in int8 TOPS (2 M N K / time)."""
    copies, bf16_copies = rotated_weights(n, k)
    rows = []
    for m in ms:
        print(f"  prefill {n} x {k}, M={m} ...", file=sys.stderr, flush=True)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x_q, x_s = kernels.quantize(x)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

        def ours(i, kernel="auto", tile=0, splits=0):
            kernels.gemm(x_q, x_s, copies[i % len(copies)], n, k, [n], [1.0], out=out, kernel=kernel, large_tile=tile,
                         large_splits=splits)

        us = time_graph(ours, len(copies))
        torch_us = time_graph(lambda i: torch.mm(x, bf16_copies[i % len(bf16_copies)].t(), out=y), len(bf16_copies))
        ops = 2.0 * m * n * k
        row = {"n": n, "k": k, "m": m, "ours_us": us, "torch_bf16_us": torch_us,
               "ours_tops": ops / us * 1e-6, "torch_bf16_tflops": ops / torch_us * 1e-6}
        if sweep:  # every large-M tile and split, and the small-M kernel
            splits = kernels.LARGE_SPLITS if torch.cuda.get_device_capability()[0] >= 9 else (1,)
            timed = {f"tile {t} x{s}": time_graph(lambda i, t=t, s=s: ours(i, "large", t, s), len(copies))
                     for t, s in itertools.product(kernels.LARGE_TILES, splits)}
            timed["small"] = time_graph(lambda i: ours(i, "small"), len(copies))
            row["sweep_us"] = timed
        rows.append(row)
    return rows


def bench_crossover(n: int, k: int) -> list[dict]:
    """Both kernels forced at token counts around kLargeMThreshold (w2a8_gemm.cu)."""
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)
    tiled = kernels.repack(pack_ternary(w).cuda(), n, k)
    copies = [tiled] + [tiled.clone() for _ in range(copies_for(tiled.numel() * 4) - 1)]
    rows = []
    for m in CROSSOVER_MS:
        x_q, x_s = kernels.quantize(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        timed = {kernel: time_graph(lambda i, kernel=kernel: kernels.gemm(x_q, x_s, copies[i % len(copies)], n, k, [n],
                                                                         [1.0], out=out, kernel=kernel), len(copies))
                 for kernel in ("small", "large")}
        rows.append({"n": n, "k": k, "m": m, "small_us": timed["small"], "large_us": timed["large"]})
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


def bench_qkv_rope(ms, sweep: bool) -> list[dict]:
    """The decode step's q|k|v projection (2B-4T: 20 query heads, 5 kv heads of 128) with RoPE and the
    KV-cache write: one kernel (gemm_rope_kv, RoPE in the GEMM's epilogue) against the two it replaces
    (gemm, then rope_kv_write), weights rotated as in the GEMM rows."""
    heads, kv_heads, d, k = 20, 5, 128, 2560
    n = (heads + 2 * kv_heads) * d
    ends, scales = [heads * d, (heads + kv_heads) * d, n], [1.0, 1.0, 1.0]
    copies, _ = rotated_weights(n, k)
    cos, sin = (t.cuda() for t in rope_tables(d, 500000.0, 4096))
    rows = []
    for m in ms:
        print(f"  q|k|v + RoPE, M={m} ...", file=sys.stderr, flush=True)
        x_q, x_s = kernels.quantize(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        k_cache = torch.zeros(m, kv_heads, 1024, d, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.arange(m, device="cuda")
        positions = torch.randint(0, 1024, (m,), device="cuda")
        q = torch.empty(m, heads, d, device="cuda", dtype=torch.bfloat16)
        qkv = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

        def fused(i, warps=0):
            kernels.gemm_rope_kv(x_q, x_s, copies[i % len(copies)], k, ends, scales, positions, slots, cos, sin,
                                 k_cache, v_cache, heads, out=q, warps=warps)

        def separate(i):
            kernels.gemm(x_q, x_s, copies[i % len(copies)], n, k, ends, scales, out=qkv)
            kernels.rope_kv_write(qkv, positions, slots, cos, sin, k_cache, v_cache, heads, out=q)

        row = {"m": m, "fused_us": time_graph(fused, len(copies)), "separate_us": time_graph(separate, len(copies))}
        if sweep:
            row["fused_sweep_us"] = {w: time_graph(lambda i, w=w: fused(i, w), len(copies)) for w in (4, 8, 12, 16)}
        rows.append(row)
    return rows


DECODE_ATTENTION = [(1, 1024), (1, 4096), (64, 1024), (64, 4096)]  # (batch, context), 2B-4T heads


def bench_decode_attention(bandwidth: float) -> list[dict]:
    """Decode attention at the 2B-4T head shape (20 query heads, 5 kv heads of 128, bf16), every row at
    full context, plain and fused with the sub-norm + quantization. Caches are rotated like the weights
    above so they come from HBM; the floor is the K and V bytes read over the copy bandwidth."""
    heads, kv_heads, d = 20, 5, 128
    rows = []
    for batch, ctx in DECODE_ATTENTION:
        print(f"  decode attention B={batch} context={ctx} ...", file=sys.stderr, flush=True)
        k_cache = torch.randn(batch, kv_heads, ctx, d, device="cuda", dtype=torch.bfloat16)
        kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
        caches = [(k_cache, k_cache.clone())] + [(k_cache.clone(), k_cache.clone())
                                                 for _ in range(copies_for(kv_bytes) - 1)]
        q = torch.randn(batch, heads, d, device="cuda", dtype=torch.bfloat16)
        weight = torch.rand(heads * d, device="cuda", dtype=torch.bfloat16) + 0.5
        slots = torch.arange(batch, device="cuda")
        positions = torch.full((batch,), ctx - 1, device="cuda")

        def attention(i, norm=None, caches=caches):
            kernels.decode_attention(q, *caches[i % len(caches)], slots, positions, norm_weight=norm)

        us = time_graph(attention, len(caches))
        fused_us = time_graph(lambda i: attention(i, weight), len(caches))
        rows.append({"batch": batch, "context": ctx, "us": us, "fused_us": fused_us,
                     "floor_us": (kv_bytes + 2 * q.numel() * q.element_size()) / bandwidth * 1e6})
        del caches, k_cache
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write all figures to this file")
    parser.add_argument("--sweep", action="store_true", help="also time every launch configuration, report the best")
    parser.add_argument("--shapes", default="all", help="comma-separated shape names, or all")
    parser.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated token counts of the GEMV rows")
    parser.add_argument("--gemv-only", action="store_true", help="only the GEMV rows and layers (no prefill, "
                        "quantization or attention rows)")
    parser.add_argument("--prefill-only", action="store_true", help="only the prefill (large-M) rows")
    parser.add_argument("--prefill-ms", default=",".join(map(str, PREFILL_MS)),
                        help="comma-separated token counts of the prefill rows")
    args = parser.parse_args()
    ms = () if args.prefill_only else tuple(int(m) for m in args.ms.split(","))
    prefill_ms = tuple(int(m) for m in args.prefill_ms.split(","))
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
        for row in bench_shape(n, k, ms, bandwidth, args.sweep):
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
    if args.sweep:
        print("\nevery configuration (row_tiles_per_block, warps, unroll), fastest first:")
        for r in results:
            ranked = sorted(r["sweep_us"].items(), key=lambda kv: kv[1])
            print(f"{r['shape']:<11} M={r['m']:<3} " + ", ".join(f"{c} {t:.2f}" for c, t in ranked))
    layer = {}
    for m in ms:
        sel = [r for r in results if r["shape"] in LAYER_2B4T and r["m"] == m]
        if len(sel) == 4:
            ours, floor = sum(r["ours_us"] for r in sel), sum(r["floor_us"] for r in sel)
            bf16 = sum(r["torch_bf16_us"] for r in sel)
            layer[m] = {"ours_us": ours, "floor_us": floor, "torch_bf16_us": bf16}
            print(f"one 2B-4T layer (qkv+o+gate|up+down), M={m}: ours {ours:.2f} us, floor {floor:.2f} us "
                  f"({ours / floor:.2f}x), torch bf16 {bf16:.2f} us ({bf16 / ours:.2f}x slower)")
    chain = bench_layer_chain(bandwidth, ms) if all(name in [s[0] for s in shapes] for name in LAYER_2B4T) else []
    for r in chain:
        print(f"2B-4T layers back to back (qkv, o, gate|up, down, qkv, ... in one graph), M={r['m']}: "
              f"{r['us']:.2f} us per layer, floor {r['floor_us']:.2f} us ({r['us'] / r['floor_us']:.2f}x)")

    prefill, crossover = [], []
    for name, n, k in shapes:
        if name in LAYER_2B4T and not args.gemv_only:
            prefill += [{"shape": name, **row} for row in bench_prefill(n, k, prefill_ms, args.sweep)]
            if args.sweep and not args.prefill_only:
                crossover += [{"shape": name, **row} for row in bench_crossover(n, k)]
    if prefill:
        print(f"\nW2A8 GEMM, prefill (large-M kernel), median us per launch on {gpu}")
        print(f"{'shape':<11} {'N x K':>12} {'M':>5} {'ours':>9} {'bf16':>9} {'ours TOPS':>10} {'bf16 TFLOPS':>12} "
              f"{'vs bf16':>8}")
        for r in prefill:
            print(f"{r['shape']:<11} {r['n']:>5} x {r['k']:<5} {r['m']:>5} {r['ours_us']:>9.2f} {r['torch_bf16_us']:>9.2f} "
                  f"{r['ours_tops']:>10.1f} {r['torch_bf16_tflops']:>12.1f} {r['torch_bf16_us'] / r['ours_us']:>7.2f}x"
                  + ("  " + ", ".join(f"{c} {t:.2f}" for c, t in sorted(r["sweep_us"].items(), key=lambda kv: kv[1]))
                     if "sweep_us" in r else ""))
    if crossover:
        print("\nsmall-M vs large-M kernel (us) around the dispatch threshold")
        for r in crossover:
            print(f"  {r['shape']:<9} M={r['m']:<4} small {r['small_us']:8.2f}  large {r['large_us']:8.2f}")

    qkv_rope = [] if args.prefill_only or "qkv" not in [s[0] for s in shapes] else bench_qkv_rope(ms, args.sweep)
    if qkv_rope:
        print("\nq|k|v projection + RoPE + KV-cache write (2B-4T), median us: one kernel against gemm + rope_kv_write")
    for r in qkv_rope:
        print(f"  M={r['m']:<3} fused {r['fused_us']:6.2f}  separate {r['separate_us']:6.2f}"
              + ("  warps " + ", ".join(f"{w}: {t:.2f}" for w, t in r["fused_sweep_us"].items())
                 if "fused_sweep_us" in r else ""))
    quant = [] if args.gemv_only or args.prefill_only else bench_quantize(bandwidth)
    if quant:
        print("\nactivation quantization (RMSNorm fused), median us")
    for r in quant:
        print(f"  {r['op']} M={r['m']:<3} K={r['k']:<5} {r['us']:6.2f} us (floor {r['floor_us']:.2f})")
    attention = [] if args.gemv_only or args.prefill_only else bench_decode_attention(bandwidth)
    if attention:
        print("\ndecode attention, 2B-4T heads (20 q / 5 kv x 128, bf16), full context, median us")
    for r in attention:
        print(f"  B={r['batch']:<3} context={r['context']:<5} {r['us']:8.2f} us (floor {r['floor_us']:.2f}, "
              f"{r['us'] / r['floor_us']:.2f}x); + sub-norm + quant {r['fused_us']:8.2f} us")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "copy_bandwidth_Bps": bandwidth, "gemm": results,
                                         "prefill": prefill, "crossover": crossover,
                                         "layer_2b4t": layer, "layer_chain": chain, "qkv_rope": qkv_rope,
                                         "quantize": quant,
                                         "decode_attention": attention}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
