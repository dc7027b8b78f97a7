#!/usr/bin/env python3
"""Serving benchmark: N concurrent streaming clients against the OpenAI-compatible server.

For each N (default 1, 8, 32, 64) every client sends --rounds requests one after the other, each a
prompt of --prompt-tokens random token ids to /v1/completions with max_tokens --max-tokens and
ignore_eos (so every answer has exactly that length). Reported per N: aggregate output tok/s
(all generated tokens / wall time), time to first token (TTFT: request sent -> first text) p50
and p99, inter-token latency (ITL: the gap between consecutive streamed chunks) p50 and p99, and
tokens per chunk (1.00 when every token reached the client as its own chunk).

By default the server runs in this process (a thread) on a model with 2B-4T shapes and random
ternary weights on the GPU, the same model bench/e2e.py builds. The clients run in processes of
their own (bench/serve_clients.py, one per 16 clients), as a server's clients would: parsing 64
streams in Python takes more CPU than serving them, and in the server's process it would take
the GIL from the engine thread. --client-procs 0 keeps them in this process (how the first
figures were taken). --stub serves a stand-in model that computes nothing but takes an H100's
time per step (bench/stub.py): the server's and runtime's own costs, measured on any machine.

    python bench/serve.py [--json results.json]                    # 2B-4T-shaped random model, cuda
    python bench/serve.py --checkpoint checkpoints/NAME --device cpu --clients 1 4 --prompt-tokens 16
    python bench/serve.py --url http://HOST:PORT --vocab 128000    # a server that is already running
    python bench/serve.py --stub                                   # no GPU: the H100's step times, simulated
"""

import argparse
import asyncio
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import LLM  # noqa: E402
from engine.server import create_app, serve_in_background  # noqa: E402
from engine.tokenizer import load_tokenizer  # noqa: E402
from serve_clients import run_clients  # noqa: E402


def word_tokenizer(directory: Path, vocab_size: int):
    """A tokenizer in which every id is the word "<id>", so every generated token streams as text.
    (bench/e2e.py's byte tokenizer decodes almost every random id to nothing: no chunk to time.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    return load_tokenizer(directory)


def random_2b4t_llm() -> LLM:
    from e2e import CONFIG_2B4T, random_tensors

    with tempfile.TemporaryDirectory() as d:
        tokenizer = word_tokenizer(Path(d), CONFIG_2B4T.vocab_size)
    return LLM.from_tensors(CONFIG_2B4T, random_tensors(CONFIG_2B4T), tokenizer, device="cuda")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (q in [0, 100])."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def run_level(url: str, api_key: str | None, clients: int, rounds: int, prompt_tokens: int,
                    max_tokens: int, vocab: int, seed: int, procs: int = 0) -> dict:
    """All clients at once; procs > 0 runs them in that many processes of their own (split evenly)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (clients, rounds, prompt_tokens), generator=gen).tolist()
    if procs <= 0:
        start = time.monotonic()
        out = await run_clients(url, api_key, prompts, max_tokens)
        results, wall = out["results"], out["end"] - start
    else:
        results, wall = await asyncio.to_thread(in_processes, url, api_key, prompts, max_tokens, min(procs, clients))
    ok = [r for r in results if "ttft" in r]
    ttft = [r["ttft"] * 1e3 for r in ok]
    itl = [g * 1e3 for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "errors": [r["error"] for r in results if "error" in r],
            "output_tok_s": tokens / wall, "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
            "itl_ms_p50": percentile(itl, 50), "itl_ms_p99": percentile(itl, 99),
            "tokens_per_chunk": tokens / max(sum(r["chunks"] for r in ok), 1), "output_tokens": tokens,
            "wall_s": wall}


def in_processes(url: str, api_key: str | None, prompts: list, max_tokens: int, procs: int) -> tuple[list, float]:
    """Run the clients in `procs` processes (bench/serve_clients.py), started together once all
    are ready. Returns every request's result and the wall time from the start to the last end."""
    script = str(Path(__file__).resolve().parent / "serve_clients.py")
    workers = [subprocess.Popen([sys.executable, script, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True) for _ in range(procs)]
    try:
        for w in workers:
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError("a client process did not start")
        start = time.monotonic() + 0.05
        for k, w in enumerate(workers):
            w.stdin.write(json.dumps({"api_key": api_key, "prompts": prompts[k::procs],
                                      "max_tokens": max_tokens, "start_at": start}) + "\n")
            w.stdin.flush()
        outs = [json.loads(w.stdout.readline()) for w in workers]
    except BaseException:
        for w in workers:
            w.kill()
        raise
    finally:
        for w in workers:
            w.stdin.close()
            w.wait(timeout=60)
    if any(w.returncode for w in workers):
        raise RuntimeError(f"a client process failed (exit statuses {[w.returncode for w in workers]})")
    return [r for o in outs for r in o["results"]], max(o["end"] for o in outs) - start


def table(rows: list[dict]) -> str:
    lines = ["| clients | requests | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) "
             "| tokens/chunk | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['output_tok_s']:.1f} | {r['ttft_ms_p50']:.1f} | "
                     f"{r['ttft_ms_p99']:.1f} | {r['itl_ms_p50']:.2f} | {r['itl_ms_p99']:.2f} | "
                     f"{r['tokens_per_chunk']:.2f} | {len(r['errors'])} |")
    return "\n".join(lines)


@contextlib.contextmanager
def server_under_test(args):
    """The server at --url, or one started here in a thread. Yields (url, description, vocab size)."""
    if args.url:
        yield args.url.rstrip("/").removesuffix("/v1"), f"server at {args.url}", args.vocab
        return
    if args.stub:
        from stub import StubLLM
        llm, name = StubLLM(gpu=True), "stub (H100 timings, no compute)"
    elif args.checkpoint:
        llm, name = LLM(args.checkpoint, device=args.device), args.checkpoint.name
    elif torch.cuda.is_available():
        llm, name = random_2b4t_llm(), "random-2B-4T"
    else:
        raise SystemExit("the random 2B-4T-shaped model needs a CUDA GPU (or give --checkpoint or --url)")
    device = torch.cuda.get_device_name() if llm.model.ops.device.type == "cuda" else "cpu"
    batch = max(args.clients)
    app = create_app(llm, model_name=name, max_batch=batch, max_queue=2 * batch)  # no 429 at any level
    with serve_in_background(app) as url:
        yield url, f"{name} on {device}, in-process server, max_batch {batch}", llm.config.vocab_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="benchmark a running server at this base URL instead of starting one")
    where.add_argument("--checkpoint", type=Path,
                       help="serve this converted checkpoint instead of the random 2B-4T-shaped model")
    where.add_argument("--stub", action="store_true",
                       help="serve a stand-in model that computes nothing and takes the H100's time per step "
                            "(bench/stub.py): the server's own costs, on any machine")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="with --checkpoint (default: cuda)")
    p.add_argument("--api-key", help="the server's API key, with --url")
    p.add_argument("--vocab", type=int, default=128000,
                   help="prompt ids are drawn from [0, VOCAB), with --url (default: %(default)s)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64],
                   help="concurrency levels (default: 1 8 32 64)")
    p.add_argument("--rounds", type=int, default=2, help="requests each client sends in turn (default: 2)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length (default: 256)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (default: 128)")
    p.add_argument("--client-procs", type=int, default=None,
                   help="processes the clients run in (default: one per 16 clients); 0: in this process, "
                        "where parsing their streams competes for the GIL with the in-process server")
    p.add_argument("--json", type=Path, help="also write the rows and the setup to this file")
    args = p.parse_args(argv)

    def procs(clients: int) -> int:
        return math.ceil(clients / 16) if args.client_procs is None else args.client_procs

    with server_under_test(args) as (url, setup, vocab):
        where = ("clients in this process" if args.client_procs == 0 else
                 "clients in processes of their own (one per 16)" if args.client_procs is None else
                 f"clients in {args.client_procs} processes of their own")
        setup = f"{setup}, {where}"
        print(f"{setup}; {args.prompt_tokens}-token prompts, {args.max_tokens} new tokens, "
              f"{args.rounds} requests per client", flush=True)

        def level(clients: int, max_tokens: int, rounds: int) -> dict:
            row = asyncio.run(run_level(url, args.api_key, clients, rounds, args.prompt_tokens, max_tokens,
                                        vocab, seed=clients, procs=procs(clients)))
            return {**row, "client_procs": procs(clients)}

        level(max(args.clients), min(8, args.max_tokens), 1)  # warm up
        rows = []
        for clients in args.clients:
            rows.append(level(clients, args.max_tokens, args.rounds))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print("\n" + table(rows))
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "prompt_tokens": args.prompt_tokens,
                                         "max_tokens": args.max_tokens, "rounds": args.rounds, "rows": rows},
                                        indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
