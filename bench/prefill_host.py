#!/usr/bin/env python3
"""Is a prompt's prefill bound by the host? The same one-prompt forward of a 2B-4T-shaped random
model run eagerly (wall time, synchronized), the host's time to issue it (no wait for the GPU), and
the forward replayed from a CUDA graph (CUDA events): when the host's time is near the eager time
and above the replay's, the GPU waits for launches.

    python bench/prefill_host.py [--tokens 512,1024]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from e2e import CONFIG_2B4T, byte_tokenizer, random_tensors  # noqa: E402
from engine import LLM  # noqa: E402
from engine.graphs import capture  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="512,1024", help="comma-separated prompt lengths")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/prefill_host.py needs a CUDA GPU", file=sys.stderr)
        return 2
    cfg = CONFIG_2B4T
    with tempfile.TemporaryDirectory() as d:
        tokenizer = byte_tokenizer(Path(d))
    model = LLM.from_tensors(cfg, random_tensors(cfg), tokenizer, device="cuda").model
    print(f"{torch.cuda.get_device_name()}: one-prompt prefill forward, median of 7 (ms)")
    for t in (int(v) for v in args.tokens.split(",")):
        cache = model.new_cache(1, t)
        ids = torch.randint(0, cfg.vocab_size, (1, t), device="cuda")
        positions = torch.arange(t, device="cuda")[None]
        slots = torch.zeros(1, dtype=torch.long, device="cuda")

        def forward():
            return model.forward(ids, positions, cache, slots, span=t)

        for _ in range(3):
            forward()
        eager, issue, replay = [], [], []
        for _ in range(7):
            torch.cuda.synchronize()
            start = time.perf_counter()
            forward()
            issue.append(time.perf_counter() - start)
            torch.cuda.synchronize()
            eager.append(time.perf_counter() - start)
        graph, _ = capture(forward, torch.cuda.graph_pool_handle())
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            torch.cuda.synchronize()
            replay.append(a.elapsed_time(b) / 1e3)
        e, h, r = (statistics.median(v) for v in (eager, issue, replay))
        print(f"  {t:>5} tokens: eager {e * 1e3:6.2f} ({t / e:8,.0f} tok/s), host issuing {h * 1e3:6.2f}, "
              f"graph replay {r * 1e3:6.2f} ({t / r:8,.0f} tok/s)", flush=True)
        del graph
    return 0


if __name__ == "__main__":
    sys.exit(main())
