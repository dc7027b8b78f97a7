#!/usr/bin/env python3
"""Streaming clients for bench/serve.py, in the benchmark's process or in processes of their own.

In a process of its own (so that parsing every client's stream does not take the GIL from the
server it measures), `serve_clients.py URL` asks URL/health once (so that the first timed request
does not pay for Python's first use of the HTTP stack), prints "ready", reads one JSON job from
stdin, waits until the job's start time (time.monotonic, shared by all processes on the machine),
runs its clients, and prints one JSON line: each request's result and the time its last client
finished.

    {"api_key", "prompts": [client][round][ids], "max_tokens", "start_at"}  ->  {"results", "end"}

Imports nothing but httpx, so it starts in a fraction of a second.
"""

import asyncio
import json
import sys
import time

import httpx


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict:
    """Stream one completion; the arrival time of each chunk that carried text, and the usage."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    sent, arrivals, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    if not arrivals:
        return {"error": "no text streamed"}
    return {"ttft": arrivals[0] - sent, "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
            "tokens": tokens, "chunks": len(arrivals)}


async def run_clients(url: str, api_key: str | None, prompts: list[list[list[int]]], max_tokens: int,
                      start_at: float | None = None) -> dict:
    """One client per entry of prompts, each sending its prompts one after the other, all clients
    at once (from start_at, a time.monotonic() value, if given). Returns the results and the
    time.monotonic() at which the last one finished."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    n = max(len(prompts), 1)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=600) as client:
        async def one_client(rounds: list[list[int]]) -> list[dict]:
            return [await one_request(client, p, max_tokens) for p in rounds]

        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        results = [r for rs in await asyncio.gather(*(one_client(p) for p in prompts)) for r in rs]
        end = time.monotonic()
    return {"results": results, "end": end}


async def warm_up(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await client.get("/health")   # any answer will do (a server without /health says 404)


def main() -> int:
    url = sys.argv[1]
    asyncio.run(warm_up(url))
    print("ready", flush=True)
    job = json.loads(sys.stdin.readline())
    out = asyncio.run(run_clients(url, job.get("api_key"), job["prompts"], job["max_tokens"], job.get("start_at")))
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
