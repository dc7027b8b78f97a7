"""The scheduler: requests join a running batch, decode together one token per step, and leave
as soon as they finish (continuous batching). Used by LLM.generate and by the HTTP server.

    rt = Runtime(model, tokenizer, end_ids, max_batch=16, max_len=4096)
    req = rt.add(prompt_ids, SamplingParams(...))      # any thread
    while rt.has_work:
        for req, piece in rt.step():                    # one thread: prefill newcomers, decode all
            ...                                         # piece: new text; req.finished when done

A step does, in this order:

0. run ahead: when no prompt can be prefilled in this step (none is being prefilled, and none
   waits or no slot is free or freed by a length reached now), launch the next decode step at
   once, fed with the tokens of the one in flight straight from the device (their indices go to
   the graph's inputs; the host has not read them yet). So the GPU goes from one decode step to
   the next without waiting for the host to read tokens and launch. Such a step holds every
   request of the one in flight that may go on: a request that the token being read ends (an end
   token) gets its token in the step run ahead dropped. Requests with a repetition penalty need
   their tokens on the host to pick the next, so a batch holding one does not run ahead;
1. collect the tokens of the decode step launched by the previous step (the host waits here);
2. prefill (unless the step ran ahead): run at most one forward of newcomers' prompts. Waiting
   requests that fit the free cache slots are admitted together as a group whose padded size
   (rows x the longest prompt, capped at prefill_chunk) stays within `prefill_tokens`; the
   group's prompts, right-padded to a common length, go through the model together, in chunks
   of `prefill_chunk` positions (one chunk per step, so running requests keep decoding between
   chunks of a long prompt). Each row's first token is sampled from the logits at its own last
   prompt position, all of them with one host synchronization. On a GPU a lone prompt's chunks
   are CUDA graph replays (engine.graphs.PrefillGraphs); groups of prompts run eagerly;
3. launch the next decode step for every request that goes on, unless step 0 did (a CUDA graph
   replay on a GPU, engine.graphs; eager on the CPU). Its tokens are collected by the next step, so
4. the host's bookkeeping of this step's tokens (detokenizing, stop strings, the events
   returned) runs while the GPU computes the next one.

A request ended by a token (an end token, its length) frees its slot in step 1, for the prefill
of the same step (or of the next, when the step ran ahead). One ended by a stop string, found in
step 4, is already in the decode step just launched: that step's token for it is dropped, and its
slot is free from the next step (which first waits for that decode step). Padding rows and such
dropped rows write keys and values only at positions that the slot's sequence writes again before
it reads them: a decode step writes its token's entry, then attends to 0..position.
"""

import array
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from .model import BitNetModel
from .sampling import SamplingParams, argmax_rows, make_generator, pick


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
    # fixed at add(): the token ids that end this request, and whether a token needs `pick`
    # (sampling or a repetition penalty) rather than the greedy argmax computed for the batch
    stop_ids: frozenset = field(default=frozenset(), repr=False)
    sampled: bool = field(default=False, repr=False)

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


def _longs(values) -> torch.Tensor:
    """A CPU int64 tensor from Python ints (several times faster than torch.tensor(list))."""
    return torch.frombuffer(array.array("q", values), dtype=torch.long)


class Runtime:
    def __init__(self, model: BitNetModel, tokenizer, end_ids, max_batch: int, max_len: int,
                 graphs: bool | None = None, prefill_chunk: int = 1024, prefill_tokens: int = 8192):
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"a runtime needs max_batch >= 1 and max_len >= 2, got {max_batch}, {max_len}")
        if prefill_chunk < 1 or prefill_tokens < 1:
            raise ValueError(f"prefill_chunk and prefill_tokens must be >= 1, got {prefill_chunk}, {prefill_tokens}")
        self.model, self.tokenizer, self.end_ids = model, tokenizer, set(end_ids)
        self.device = model.ops.device
        self.cache = model.new_cache(max_batch, max_len)
        self.max_batch, self.max_len = max_batch, self.cache.max_len
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens = prefill_tokens   # padded tokens in one prefill forward (at least one prompt)
        self.free = list(range(max_batch - 1, -1, -1))   # pop() hands out slot 0 first
        self.waiting: collections.deque[Request] = collections.deque()  # add() appends, step() takes
        self.running: list[Request] = []       # holding a slot, decoding
        self.prefilling: list[Request] = []    # holding a slot, the prompt partly prefilled (long prompts)
        self._prefill_at = 0                   # the next chunk's first position, for self.prefilling
        # the decode step launched last: its rows, the copy of its tokens to the host, the tokens on the device
        self._inflight: tuple[list[Request], object, torch.Tensor] | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._cancels = False                  # a cancel() since the last look
        # time spent, for throughput figures
        self.prefill_seconds = self.decode_seconds = 0.0
        if graphs is None:
            graphs = self.device.type == "cuda"
        self.graphs = self.prefill_graphs = None
        if graphs:
            from .graphs import DecodeGraphs, PrefillGraphs
            pool = torch.cuda.graph_pool_handle()   # one memory pool: graphs replay one at a time
            self.graphs = DecodeGraphs(model, self.cache, max_batch, pool)
            self.prefill_graphs = PrefillGraphs(model, self.cache, prefill_chunk, pool)
        # where sampled tokens land: two buffers for decode steps in turn (one can be in flight
        # while the host reads the other), one for prefills
        self._decode_buffer = 0
        if self.device.type == "cuda":
            self._pinned = torch.empty(3, max_batch, dtype=torch.long, pin_memory=True)
            self._copied = [torch.cuda.Event() for _ in range(3)]

    # ---- called from any thread -------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams) -> Request:
        """Queue a request; raises ValueError if the prompt cannot run here."""
        self.check_prompt(prompt)
        gen_device = self.device if not params.greedy else "cpu"
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.end_ids)
        req = Request(list(prompt), params, min(params.max_new_tokens, self.max_len - len(prompt)),
                      make_generator(params.seed, gen_device), self.tokenizer.stream_decoder(),
                      stop_ids=frozenset(stop_ids),
                      sampled=not params.greedy or params.repetition_penalty != 1.0)
        with self._lock:
            req.id = next(self._ids)
            self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request at the next step and free its slot (a client went away)."""
        req.cancelled = True
        self._cancels = True

    def check_prompt(self, ids: list[int]) -> None:
        check_prompt(ids, self.model.cfg.vocab_size, self.max_len)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling or self._inflight)

    # ---- the step loop (one thread) ---------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Request, str]]:
        """Collect the last decode step's tokens, prefill (part of) the newcomers, launch the next
        decode step.

        Returns (request, new text) for each request that produced text or finished this step;
        a finished request (req.finished) appears exactly once more, with its last piece."""
        start = time.perf_counter()
        events: list[tuple[Request, str]] = []
        if self._cancels:
            self._reap(events)
        ahead = self._run_ahead()
        going: list[Request] = []               # requests in the next decode step
        taken: list[tuple[Request, int]] = []   # (request, token) sampled for it
        decoding = self._inflight is not None
        if decoding:
            rows, fetch, _ = self._inflight
            self._inflight = ahead
            taken = [(r, t) for r, t in zip(rows, self._host(fetch)) if not r.finished]
            self._take(taken, going)             # frees the slots of requests that end here
        prefill = 0.0
        if ahead is None and (self.prefilling or (self.waiting and self.free)):
            begin = time.perf_counter()
            first = self._prefill(events)
            self._take(first, going)
            taken += first
            prefill = time.perf_counter() - begin
        if going and ahead is None:
            decoding = True
            self._inflight = (going, *self._launch_decode(going))
        for req, token in taken:   # while the GPU computes the next tokens
            events.append((req, self._text(req, token)))
        spent = time.perf_counter() - start - prefill
        if decoding:
            self.decode_seconds += spent
            self.prefill_seconds += prefill
        else:
            self.prefill_seconds += prefill + spent
        return events

    def _run_ahead(self) -> tuple[list[Request], object, torch.Tensor] | None:
        """Launch the next decode step before reading the tokens of the one in flight (step 0 of
        the docstring); returns what self._inflight holds, or None where the step cannot."""
        if self._inflight is None or self.prefilling:
            return None
        rows, _, tokens = self._inflight
        if any(r.params.repetition_penalty != 1.0 for r in rows):
            return None
        # the rows whose token being read cannot end them by length (an end token still might)
        index = [i for i, r in enumerate(rows) if not r.finished and len(r.output) + 1 < r.max_new]
        if not index or (self.waiting and (self.free or len(index) < len(rows))):
            return None   # a slot is free, or frees now: prefill a newcomer in this step
        going = [rows[i] for i in index]
        return (going, *self._launch_decode(going, (tokens, index)))

    def _take(self, taken: list[tuple[Request, int]], going: list[Request]) -> None:
        """What a token means for its request: it ends it (an end token; the length reached), or
        the request goes on into the next decode step. An ending request's slot is free at once."""
        for req, token in taken:
            if token in req.stop_ids:
                self._vacate(req)
            else:
                req.output.append(token)
                if len(req.output) < req.max_new:
                    going.append(req)
                else:
                    self._vacate(req)

    def _reap(self, events: list) -> None:
        """Finish cancelled requests wherever they are: waiting, being prefilled, or running."""
        self._cancels = False   # cleared before looking: a cancel() from now on is seen next step
        with self._lock:
            gone = [r for r in self.waiting if r.cancelled]
            if gone:
                kept = [r for r in self.waiting if not r.cancelled]
                self.waiting.clear()
                self.waiting.extend(kept)
        gone += [r for r in self.prefilling + self.running if r.cancelled]
        for req in gone:
            self._finish(req, "cancelled")
            events.append((req, ""))

    # ---- prefill ----------------------------------------------------------------------------
    def _admit(self, events: list) -> None:
        """Take waiting requests into free slots, as one group within the prefill token budget."""
        group, width = [], 0
        while self.waiting and len(group) < len(self.free):
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                req.finish_reason = "cancelled"
                events.append((req, ""))
                continue
            w = max(width, min(len(req.prompt), self.prefill_chunk))
            if group and (len(group) + 1) * w > self.prefill_tokens:
                break
            group.append(self.waiting.popleft())
            width = w
        for req in group:
            req.slot = self.free.pop()
        # shortest first: rows that end in an earlier chunk are a prefix, and drop out of later ones
        self.prefilling = sorted(group, key=lambda r: len(r.prompt))
        self._prefill_at = 0

    def _prefill(self, events: list) -> list[tuple[Request, int]]:
        """One forward over the next chunk of the prefilling group's prompts (admitting a new group
        first if there is none). Returns (request, first token) for the rows whose prompt ended."""
        if not self.prefilling:
            self._admit(events)
            if not self.prefilling:
                return []
        start = self._prefill_at
        rows = [r for r in self.prefilling if len(r.prompt) > start]
        end = min(start + self.prefill_chunk, len(rows[-1].prompt))
        done = sum(len(r.prompt) <= end for r in rows)   # rows whose prompt ends in this chunk
        logits = None
        if self.prefill_graphs is not None and len(rows) == 1:   # one prompt's chunk
            logits = self.prefill_graphs.run(rows[0].prompt[start:end], start, rows[0].slot)
        if logits is None:
            logits = self._prefill_forward(rows, start, end)
        logits = logits[:done]
        tokens = self._host(self._fetch(self._pick(rows[:done], logits, argmax_rows(logits)), 2)) if done else []
        self._prefill_at = end
        finished, self.prefilling = rows[:done], rows[done:]
        self.running += finished
        return list(zip(finished, tokens))

    def _prefill_forward(self, rows: list[Request], start: int, end: int) -> torch.Tensor:
        """The eager forward of positions start..end-1 of the rows' prompts: logits [rows, V] at each
        row's last position in the chunk."""
        t, b = end - start, len(rows)
        flat = array.array("q")
        for r in rows:   # right-padded token ids, then the slots, then each row's last position
            piece = r.prompt[start:end]
            flat.extend(piece)
            flat.extend(itertools.repeat(0, t - len(piece)))
        flat.extend(r.slot for r in rows)
        flat.extend(min(len(r.prompt), end) - 1 - start for r in rows)
        inputs = torch.frombuffer(flat, dtype=torch.long).to(self.device)
        ids, slots, last = inputs[:b * t].view(b, t), inputs[b * t:b * t + b], inputs[b * t + b:]
        positions = torch.arange(start, end, device=self.device).repeat(b, 1)
        return self.model.forward(ids, positions, self.cache, slots, span=end, last=last)

    # ---- decode -----------------------------------------------------------------------------
    def _launch_decode(self, rows: list[Request], ahead: tuple[torch.Tensor, list[int]] | None = None
                       ) -> tuple[object, torch.Tensor]:
        """Start one decode step for the rows, each fed its last token: from its output, or with
        `ahead` = (the tokens of the step in flight on the device, each row's index there) the one
        that step picks for it, not yet in its output. Returns what _host reads, and the tokens on
        the device."""
        n = len(rows)
        if ahead is None:
            source, ids, behind = None, [r.output[-1] for r in rows], 1
        else:
            (source, ids), behind = ahead, 0
        positions = [len(r.prompt) + len(r.output) - behind for r in rows]
        slots = [r.slot for r in rows]
        if self.graphs is not None:
            logits, greedy = self.graphs.run(ids, positions, slots, source)
        else:
            inputs = _longs(ids + positions + slots).to(self.device)
            tokens = inputs[:n] if source is None else source.index_select(0, inputs[:n])
            logits = self.model.forward(tokens[:, None], inputs[n:2 * n, None], self.cache, inputs[2 * n:])
            greedy = argmax_rows(logits)
        picked = self._pick(rows, logits, greedy)
        self._decode_buffer ^= 1   # the step in flight may still be copying into the other one
        return self._fetch(picked, self._decode_buffer), picked

    def _pick(self, rows: list[Request], logits: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
        """The rows' tokens on the device: the greedy argmax, replaced by `pick` where a request samples."""
        picked = greedy
        sampled = [i for i, r in enumerate(rows) if r.sampled]
        if sampled:
            picked = greedy.clone()
            for i in sampled:
                r = rows[i]
                picked[i] = pick(logits[i], r.params, self._seen(r), r.generator)
        return picked

    # the host synchronization: _fetch starts the copy of sampled tokens, _host waits for it
    def _fetch(self, tokens: torch.Tensor, buffer: int) -> object:
        if self.device.type != "cuda":
            return tokens
        host = self._pinned[buffer, :tokens.numel()]
        host.copy_(tokens, non_blocking=True)
        self._copied[buffer].record()
        return host, self._copied[buffer]

    def _host(self, fetch) -> list[int]:
        if isinstance(fetch, torch.Tensor):
            return fetch.tolist()
        host, copied = fetch
        copied.synchronize()
        return host.tolist()

    def _seen(self, req: Request) -> torch.Tensor | None:
        if req.params.repetition_penalty == 1.0:
            return None
        return torch.tensor(req.prompt + req.output, device=self.device)

    # ---- bookkeeping ------------------------------------------------------------------------
    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = req.finish_reason or reason
        self._vacate(req)

    def _vacate(self, req: Request) -> None:
        """Give the request's slot back (once)."""
        for holders in (self.running, self.prefilling):
            if req in holders:
                holders.remove(req)
                self.free.append(req.slot)
                return

    def _text(self, req: Request, token: int) -> str:
        """Account for a token in the request's text (after _take): detokenize it, check the end,
        the length and stop strings; return the text that can be handed out."""
        if token in req.stop_ids:   # an end token: not part of the output
            req.text += req.detok.flush()
            self._finish(req, "stop")
            return self._release(req, len(req.text))
        p = req.params
        piece = req.detok.push(token)
        if not p.stop and len(req.output) < req.max_new:   # the usual case: all new text goes out
            if piece:
                req.text += piece
                req.emitted = len(req.text)
            return piece
        req.text += piece
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
        if not p.stop:
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
