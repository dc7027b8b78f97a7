#!/usr/bin/env python3
"""The Python cost of one decode step, per part, with a model that computes nothing (bench/stub.py).

B streaming requests (greedy, 256-token prompts, bench/serve.py's word tokenizer) decode in steady
state; for each batch size B this prints the microseconds per step spent

  runtime   in Runtime.step (graph-input staging, sampling bookkeeping, detokenizing, stop checks),
  deliver   in the engine thread handing the step's events to the event loop (Engine._deliver),
  loop      on the event loop: queueing each request's text and turning it into its SSE chunk
            (Job.pieces + event_stream), as the server does for a streaming /v1/completions,

and the same per request. Everything runs in one thread, one part after the other, so the
figures add up. Then the same loop again with the stub's simulated GPU (each decode step keeps it
busy for the H100's time at that batch size, bench/stub.py): `GPU idle` is how much longer a step
takes than that device time, i.e. the Python work that the device waits for (work that overlaps
the device's step costs nothing there). Runs on any machine; no GPU is used.

    python bench/step_overhead.py [--batches 1 8 64] [--steps 300] [--json out.json]
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine.sampling import SamplingParams  # noqa: E402
from engine.server import Engine, Job, TextShape, event_stream  # noqa: E402
from stub import StubLLM, decode_seconds  # noqa: E402


def measure(llm: StubLLM, batch: int, steps: int, repeats: int) -> dict:
    rt = llm.runtime(batch, 4096)
    engine = Engine(rt)
    loop = asyncio.new_event_loop()
    engine._loop = loop
    params = SamplingParams(temperature=0, max_new_tokens=(steps + 10) * repeats + 10, ignore_eos=True)
    queues, chunks = [], [0]

    async def consume(job):
        head = {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "stub"}
        async for _ in event_stream(job, TextShape, head, include_usage=True):
            chunks[0] += 1

    def pending(q) -> bool:   # a Mailbox (engine.server), or an asyncio.Queue (older servers)
        return bool(q.items) if hasattr(q, "items") else not q.empty()

    async def settle():
        while any(pending(q) for q in queues):
            await asyncio.sleep(0)

    tasks = []
    for i in range(batch):
        req, queue = engine.submit([5 + i] * 256, params)
        queues.append(queue)
        tasks.append(loop.create_task(consume(Job(None, req, queue))))
    while rt.waiting or len(rt.running) < batch:     # admission and prefill
        engine._deliver(rt.step())
        loop.run_until_complete(settle())
    for _ in range(5):                                # warm up
        engine._deliver(rt.step())
        loop.run_until_complete(settle())

    parts = {"runtime": [], "deliver": [], "loop": [], "period": []}
    for _ in range(repeats):
        t = {k: 0.0 for k in parts}
        start = time.perf_counter()
        for _ in range(steps):
            a = time.perf_counter()
            events = rt.step()
            b = time.perf_counter()
            engine._deliver(events)
            c = time.perf_counter()
            loop.run_until_complete(settle())
            d = time.perf_counter()
            t["runtime"] += b - a
            t["deliver"] += c - b
            t["loop"] += d - c
        t["period"] = time.perf_counter() - start
        for k in parts:
            parts[k].append(t[k] / steps * 1e6)
    for r in list(rt.running) + list(rt.waiting):
        rt.cancel(r)
    while rt.has_work:
        engine._deliver(rt.step())
        loop.run_until_complete(settle())
    loop.run_until_complete(asyncio.gather(*tasks))
    loop.close()
    row = {"batch": batch, **{k: statistics.median(v) for k, v in parts.items()}}
    row["total"] = row["runtime"] + row["deliver"] + row["loop"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--steps", type=int, default=300, help="steps per timed run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per batch size; the median is shown")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    cpu, gpu = StubLLM(gpu=False), StubLLM(gpu=True)
    rows = []
    for b in args.batches:
        row = measure(cpu, b, args.steps, args.repeats)
        device = decode_seconds(b) * 1e6
        row["gpu_step"] = device
        row["gpu_idle"] = measure(gpu, b, args.steps, args.repeats)["period"] - device
        rows.append(row)
    print("| batch | runtime us/step | deliver us/step | loop us/step | total us/step | total us/request "
          "| simulated GPU step (us) | GPU idle us/step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['runtime']:.1f} | {r['deliver']:.1f} | {r['loop']:.1f} | {r['total']:.1f} | "
              f"{r['total'] / r['batch']:.1f} | {r['gpu_step']:.0f} | {r['gpu_idle']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
