"""A stand-in for the model and the GPU, to measure what the runtime and the server cost in Python.

The runtime (engine/runtime.py), the decode-graph front end (engine/graphs.py, its `run` method),
the server and its clients run for real; the model computes nothing: every forward returns the
same logits, and the "GPU" is a clock. Work handed to it (a prefill forward, a graph replay)
keeps it busy for the time the same work takes on an H100 with 2B-4T shapes (bench/e2e.py's
figures), and a host synchronization (Runtime._host) sleeps until it is idle: sleeping releases
the GIL, as waiting for a CUDA stream does. With `gpu=False` the clock stays at zero and what is
left is the Python cost alone.

    llm = StubLLM(vocab=128256, gpu=True)                 # what create_app and Runtime need
    rt = llm.runtime(max_batch=64)                        # a Runtime with stub graphs
"""

import bisect
import contextlib
import ctypes
import os
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from engine.config import ModelConfig
from engine.graphs import BUCKETS, DecodeGraphs
from engine.runtime import Runtime
from engine.tokenizer import load_tokenizer

# (batch, seconds per decode step) on an H100, 2B-4T shapes: 1 / (tok/s) of bench/e2e.py's rows
DECODE_STEP = ((1, 1 / 683), (8, 8 / 5031), (32, 32 / 12261), (64, 64 / 16932))
PREFILL_FIXED, PREFILL_RATE = 2.2e-3, 80_000     # a prefill forward: 2.2 ms + tokens / 80k tok/s


def decode_seconds(batch: int) -> float:
    """Linear interpolation of DECODE_STEP (extrapolated past 64 with the last slope)."""
    xs = [b for b, _ in DECODE_STEP]
    i = min(max(bisect.bisect_left(xs, batch), 1), len(xs) - 1)
    (b0, t0), (b1, t1) = DECODE_STEP[i - 1], DECODE_STEP[i]
    return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)


def prefill_seconds(tokens: int) -> float:
    return PREFILL_FIXED + tokens / PREFILL_RATE


class Clock:
    """The simulated GPU: one stream of work, executed in order."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.busy_until = 0.0
        self.lock = threading.Lock()

    def launch(self, seconds: float) -> None:
        if self.enabled:
            with self.lock:
                self.busy_until = max(self.busy_until, time.perf_counter()) + seconds

    def wait(self) -> None:
        until(self.busy_until)


def until(t: float) -> None:
    """Wait until perf_counter() reaches t: most of it asleep, the last 0.3 ms spinning on
    sched_yield (a plain sleep overshoots by 50-100 us; a CUDA synchronization spins). Both release
    the GIL, as waiting for a CUDA event does."""
    left = t - time.perf_counter()
    if left > 3e-4:
        _precise_sleep_here()
        time.sleep(left - 3e-4)
    while time.perf_counter() < t:
        os.sched_yield()


_local = threading.local()


def _precise_sleep_here() -> None:
    """Linux: this thread's sleeps end within microseconds of their time (timer slack 1 us)."""
    if not getattr(_local, "done", False):
        _local.done = True
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)   # PR_SET_TIMERSLACK, in nanoseconds


class StubModel:
    """The interface Runtime uses (cfg, ops.device, new_cache, forward), with no compute. Row i
    of every batch picks token `first + i` (greedy)."""

    def __init__(self, cfg: ModelConfig, clock: Clock, first: int = 1000):
        self.cfg, self.clock = cfg, clock
        self.ops = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
        self.first = first
        self.forwards = 0

    def new_cache(self, slots: int, max_len: int):
        return SimpleNamespace(max_len=min(max_len, self.cfg.max_position_embeddings), slots=slots)

    def logits(self, rows: int) -> torch.Tensor:
        out = torch.zeros(rows, self.cfg.vocab_size)
        out[torch.arange(rows), (self.first + torch.arange(rows)) % self.cfg.vocab_size] = 1.0
        return out

    def forward(self, ids, positions, cache, slots, all_logits=False, span=None, last=None):
        self.forwards += 1
        b, t = ids.shape
        self.clock.launch(prefill_seconds(b * t) if t > 1 else decode_seconds(b))
        return self.logits(b)


class _Event:
    def record(self):
        pass

    def synchronize(self):
        pass


class _Replay:
    def __init__(self, clock: Clock, batch: int):
        self.clock, self.batch = clock, batch

    def replay(self):
        self.clock.launch(decode_seconds(self.batch))


class StubGraphs(DecodeGraphs):
    """DecodeGraphs' `run` as it is (staging, bucket choice, input copy), on CPU tensors, with
    replays that only advance the clock."""

    def __init__(self, model: StubModel, max_batch: int):   # noqa: super().__init__ captures graphs
        self.model = model
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        top = self.buckets[-1]
        self.inputs = {b: torch.zeros(4, b, dtype=torch.long) for b in self.buckets}
        self.staging = torch.zeros(4 * top, dtype=torch.long)
        self.staged = _Event()
        logits = model.logits(top)
        greedy = logits.argmax(dim=-1)
        self.graphs = {b: (_Replay(model.clock, b), (logits[:b], greedy[:b])) for b in self.buckets}


def word_tokenizer(vocab_size: int):
    """Every id is the word "<id>" (bench/serve.py's tokenizer): every token streams as text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    with tempfile.TemporaryDirectory() as d:
        tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(str(Path(d) / "tokenizer.json"))
        return load_tokenizer(d)


STUB_CONFIG = ModelConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=32, max_position_embeddings=4096, rope_theta=500000.0,
                          rms_norm_eps=1e-5)


class StubLLM:
    """What create_app needs from an LLM: a tokenizer, encode, path, runtime(max_batch)."""

    def __init__(self, gpu: bool = True, cfg: ModelConfig = STUB_CONFIG, tokenizer=None):
        self.config, self.context_length = cfg, cfg.max_position_embeddings
        self.clock = Clock(gpu)
        self.model = StubModel(cfg, self.clock)
        self.tokenizer = tokenizer or word_tokenizer(cfg.vocab_size)
        self.end_ids = set(cfg.eos_token_ids)
        self.path = Path("stub")
        self._runtime = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=True)

    def runtime(self, max_batch: int, max_len: int | None = None, **kw) -> Runtime:
        rt = Runtime(self.model, self.tokenizer, self.end_ids, max_batch, max_len or self.context_length,
                     graphs=False, **kw)
        rt.graphs = StubGraphs(self.model, max_batch)
        if hasattr(rt, "_fetch"):   # tokens are ready when the work launched before them is done
            clock, fetch, host = self.clock, rt._fetch, rt._host

            def fetched(tokens, *args):
                return fetch(tokens, *args), clock.busy_until

            def synced(handle):
                inner, ready = handle
                until(ready)
                return host(inner)
            rt._fetch, rt._host = fetched, synced
        else:   # an older runtime, synchronous: wait at each launch instead
            self.clock.launch = _waiting_launch(self.clock)
        self._runtime = rt
        return rt


def _waiting_launch(clock: Clock):
    launch = clock.launch

    def go(seconds):
        launch(seconds)
        clock.wait()
    return go
