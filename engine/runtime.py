"""The scheduler: requests join a running batch, decode together one token per step, and leave
as soon as they finish (continuous batching). Used by LLM.generate and by the HTTP server.

    rt = Runtime(model, tokenizer, end_ids, max_batch=16, max_len=4096)
    req = rt.add(prompt_ids, SamplingParams(...))      # any thread
    while rt.has_work:
        for req, piece in rt.step():                    # one thread: prefill newcomers, decode all
            ...                                         # piece: new text; req.finished when done

Each step admits waiting requests into free cache slots (their prompts are prefilled one at a
time, in chunks) and then runs one decode step for every running request: on a GPU that step is
a CUDA graph replay (engine.graphs), eager on the CPU. Sampling happens on the logits' device;
the only host synchronization per step is reading the sampled tokens.
"""

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from .model import BitNetModel
from .sampling import SamplingParams, make_generator, pick


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    max_new: int                    # new tokens allowed (max_new_tokens clamped to the cache)
    generator: torch.Generator
    detok: object                   # the tokenizer's incremental decoder
    id: int = 0
    output: list[int] = field(default_factory=list)  # generated ids, without a final end token
    text: str = ""                  # detokenized output so far (stop strings included until found)
    emitted: int = 0                # characters of `text` already handed out
    finish_reason: str | None = None  # "stop", "length", or "cancelled"
    slot: int | None = None
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def check_prompt(ids: list[int], vocab_size: int, context: int) -> None:
    """Raise ValueError unless ids is a non-empty list of valid token ids leaving room for an answer."""
    if not ids:
        raise ValueError("empty prompt")
    bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")
    if len(ids) >= context:
        raise ValueError(f"the prompt has {len(ids)} tokens; the context is {context} tokens, "
                         "and at least one must be left for the answer")


class Runtime:
    def __init__(self, model: BitNetModel, tokenizer, end_ids, max_batch: int, max_len: int,
                 graphs: bool | None = None, prefill_chunk: int = 1024):
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"a runtime needs max_batch >= 1 and max_len >= 2, got {max_batch}, {max_len}")
        self.model, self.tokenizer, self.end_ids = model, tokenizer, set(end_ids)
        self.device = model.ops.device
        self.cache = model.new_cache(max_batch, max_len)
        self.max_batch, self.max_len = max_batch, self.cache.max_len
        self.prefill_chunk = prefill_chunk
        self.free = list(range(max_batch - 1, -1, -1))   # pop() hands out slot 0 first
        self.waiting: collections.deque[Request] = collections.deque()  # append / popleft: thread-safe
        self.running: list[Request] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()
        # time spent and tokens processed, for throughput figures
        self.prefill_seconds = self.decode_seconds = 0.0
        if graphs is None:
            graphs = self.device.type == "cuda"
        self.graphs = None
        if graphs:
            from .graphs import DecodeGraphs
            self.graphs = DecodeGraphs(model, self.cache, max_batch)

    # ---- called from any thread -------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams) -> Request:
        """Queue a request; raises ValueError if the prompt cannot run here."""
        self.check_prompt(prompt)
        with self._lock:
            rid = next(self._ids)
        gen_device = self.device if not params.greedy else "cpu"
        req = Request(list(prompt), params, min(params.max_new_tokens, self.max_len - len(prompt)),
                      make_generator(params.seed, gen_device), self.tokenizer.stream_decoder(), rid)
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request at the next step and free its slot (a client went away)."""
        req.cancelled = True

    def check_prompt(self, ids: list[int]) -> None:
        check_prompt(ids, self.model.cfg.vocab_size, self.max_len)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step loop (one thread) ---------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Request, str]]:
        """Admit waiting requests, decode one token for every running one.

        Returns (request, new text) for each request that produced text or finished this step;
        a finished request (req.finished) appears exactly once more, with its last piece."""
        events: list[tuple[Request, str]] = []
        for req in [r for r in self.running if r.cancelled]:
            self._finish(req, "cancelled")
            events.append((req, ""))

        start = time.perf_counter()
        while self.waiting and self.free:
            req = self.waiting.popleft()
            if req.cancelled:
                req.finish_reason = "cancelled"
                events.append((req, ""))
                continue
            req.slot = self.free.pop()
            self.running.append(req)
            logits = self._prefill(req)
            token = pick(logits[0], req.params, self._seen(req), req.generator)
            events.append((req, self._accept(req, int(token))))
        self.prefill_seconds += time.perf_counter() - start

        rows = [r for r in self.running if not r.finished]
        if rows:
            start = time.perf_counter()
            tokens = self._decode(rows)
            for req, token in zip(rows, tokens):
                events.append((req, self._accept(req, token)))
            self.decode_seconds += time.perf_counter() - start
        return events

    def _prefill(self, req: Request) -> torch.Tensor:
        """Run the prompt through the model in chunks; the last chunk's logits [1, V]."""
        dev, n = self.device, len(req.prompt)
        slots = torch.tensor([req.slot], device=dev)
        prompt = torch.tensor(req.prompt, device=dev)
        for start in range(0, n, self.prefill_chunk):
            end = min(start + self.prefill_chunk, n)
            logits = self.model.forward(prompt[None, start:end], torch.arange(start, end, device=dev)[None],
                                        self.cache, slots, span=end)
        return logits

    def _decode(self, rows: list[Request]) -> list[int]:
        """One decode step for the running rows; the sampled token of each."""
        ids = [r.output[-1] for r in rows]
        positions = [len(r.prompt) + len(r.output) - 1 for r in rows]
        slots = [r.slot for r in rows]
        if self.graphs is not None:
            logits, greedy = self.graphs.run(ids, positions, slots)
        else:
            dev = self.device
            logits = self.model.forward(torch.tensor(ids, device=dev)[:, None],
                                        torch.tensor(positions, device=dev)[:, None],
                                        self.cache, torch.tensor(slots, device=dev))
            greedy = logits.argmax(dim=-1)
        picked = greedy.clone()
        for i, r in enumerate(rows):
            p = r.params
            if not p.greedy or p.repetition_penalty != 1.0:
                picked[i] = pick(logits[i], p, self._seen(r), r.generator)
        return picked.tolist()  # the one host synchronization of a step

    def _seen(self, req: Request) -> torch.Tensor | None:
        if req.params.repetition_penalty == 1.0:
            return None
        return torch.tensor(req.prompt + req.output, device=self.device)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = req.finish_reason or reason
        if req in self.running:
            self.running.remove(req)
            self.free.append(req.slot)

    def _accept(self, req: Request, token: int) -> str:
        """Append a sampled token to a request, update its text and finish state; return new text."""
        p = req.params
        if (token in self.end_ids and not p.ignore_eos) or token in p.stop_token_ids:
            req.text += req.detok.flush()
            self._finish(req, "stop")
            return self._release(req, len(req.text))
        req.output.append(token)
        req.text += req.detok.push(token)
        reason = None
        if len(req.output) >= req.max_new:
            req.text += req.detok.flush()
            reason = "length"
        if p.stop:
            # search only the tail that new text could have completed
            window = max(0, req.emitted - max(map(len, p.stop)))
            hits = [h for h in (req.text.find(x, window) for x in p.stop) if h >= 0]
            if hits:
                req.text = req.text[:min(hits)]
                reason = "stop"
        if reason is not None:
            self._finish(req, reason)
            return self._release(req, len(req.text))
        # hold back a tail that could be the start of a stop string
        held = max((k for x in p.stop for k in range(1, len(x)) if req.text.endswith(x[:k])), default=0)
        return self._release(req, len(req.text) - held)

    @staticmethod
    def _release(req: Request, upto: int) -> str:
        upto = min(upto, len(req.text))
        piece = req.text[req.emitted:upto]
        req.emitted = max(req.emitted, upto)
        return piece
