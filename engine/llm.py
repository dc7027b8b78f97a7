"""The Python API: load a converted checkpoint and generate, chat or score.

    from engine import LLM, SamplingParams
    llm = LLM("checkpoints/bitnet-b1.58-2B-4T")
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_new_tokens=16))
    print(out[0].text)
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointError, find_checkpoints, load_checkpoint
from .config import ModelConfig
from .model import BitNetModel, KVCache
from .ops import TorchOps
from .sampling import SamplingParams, make_generator, sample
from .tokenizer import load_tokenizer


@dataclass
class Completion:
    text: str
    token_ids: list[int]            # generated ids, without the end token that stopped generation
    prompt_token_ids: list[int]
    finish_reason: str              # "stop" (end token or stop string) or "length"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def line(self) -> str:
        prefill = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0
        decoded = max(self.generated_tokens - 1, 0)  # the first token comes out of prefill
        decode = decoded / self.decode_seconds if self.decode_seconds else 0.0
        return (f"[{self.prompt_tokens} prompt tokens, {self.generated_tokens} generated; "
                f"prefill {prefill:.1f} tok/s, decode {decode:.1f} tok/s]")


@dataclass
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    max_new: int
    generator: torch.Generator
    detok: object
    output: list[int] = field(default_factory=list)
    text: str = ""          # detokenized output so far (stop strings included until found)
    emitted: int = 0        # characters of `text` already handed out
    finish_reason: str | None = None


def make_ops(device: torch.device, dtype: torch.dtype | None) -> TorchOps:
    """The exact reference ops on the CPU (fp32 by default), the CUDA kernels on a GPU (bf16)."""
    if device.type == "cpu":
        return TorchOps(dtype or torch.float32, device)
    if device.type == "cuda":
        from .cuda_ops import CudaOps
        from .kernels import KernelsUnavailable
        try:
            return CudaOps(dtype or torch.bfloat16, device)
        except KernelsUnavailable as e:
            raise RuntimeError(f"device 'cuda' is not usable: {e}") from None
    raise RuntimeError(f"unsupported device {device.type!r}; use 'cpu' or 'cuda'")


class LLM:
    def __init__(self, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
        path = Path(path)
        # a folder with its own config.json is taken as the checkpoint (load_checkpoint says what
        # is wrong with it); otherwise look for the one checkpoint inside
        found = [path] if (path / "config.json").is_file() else find_checkpoints(path)
        if len(found) != 1:
            raise CheckpointError(f"{path} is not a converted checkpoint" if not found else
                                  f"{path} holds several checkpoints ({', '.join(p.name for p in found)}); pick one")
        ops = make_ops(torch.device(device), dtype)
        config, tensors = load_checkpoint(found[0])
        self._setup(config, tensors, load_tokenizer(found[0]), ops)
        self.path = found[0]

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: dict[str, torch.Tensor], tokenizer,
                     device: str = "cpu", dtype: torch.dtype | None = None) -> "LLM":
        """An LLM from tensors in the checkpoint format held in memory (benchmarks build random ones)."""
        llm = cls.__new__(cls)
        llm._setup(config, tensors, tokenizer, make_ops(torch.device(device), dtype))
        llm.path = None
        return llm

    def _setup(self, config: ModelConfig, tensors, tokenizer, ops: TorchOps) -> None:
        self.config, self.tokenizer, self.ops = config, tokenizer, ops
        self.model = BitNetModel(config, tensors, ops)
        self.end_ids = set(config.eos_token_ids) | set(tokenizer.end_token_ids())
        self.context_length = config.max_position_embeddings
        self.last_stats = GenerationStats()
        self._cache: KVCache | None = None

    # ---- public API -------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | None = None) -> list[Completion]:
        """prompts: a string, a list of strings, a list of token ids, or a list of such lists."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return self._drain(self._run(ids, params or SamplingParams()))

    def chat(self, messages, params: SamplingParams | None = None):
        """messages: one conversation (list of {"role", "content"}) -> Completion, or a list of them -> list."""
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else messages
        out = self._drain(self._run([self.tokenizer.encode_chat(c) for c in convs], params or SamplingParams()))
        return out[0] if single else out

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces of one prompt's answer as they are decoded; returns its Completion."""
        gen = self._run([list(prompt_ids)], params or SamplingParams())
        try:
            while True:
                _, piece = next(gen)
                yield piece
        except StopIteration as stop:
            return stop.value[0]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=True)

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Full-sequence fp32 logits [T, V] for a token list (position t predicts token t + 1)."""
        self._check_prompt(token_ids)
        n = len(token_ids)
        cache = self.model.new_cache(1, n)
        ids = torch.tensor([token_ids], device=self.ops.device)
        positions = torch.arange(n, device=self.ops.device)[None]
        slots = torch.zeros(1, dtype=torch.long, device=self.ops.device)
        return self.model.forward(ids, positions, cache, slots, all_logits=True)[0]

    # ---- the generation loop ----------------------------------------------------------------
    @staticmethod
    def _drain(gen) -> list[Completion]:
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("empty prompt")
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < self.config.vocab_size)]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")
        if len(ids) >= self.context_length:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {self.context_length} "
                             "tokens, and at least one must be left for the answer")

    def _get_cache(self, slots: int, length: int) -> KVCache:
        # reuse the last cache when it is large enough: a chat session allocates once
        c = self._cache
        if c is None or c.slots < slots or c.max_len < length:
            self._cache = None
            self._cache = self.model.new_cache(slots, length)
        return self._cache

    @torch.inference_mode()
    def _run(self, prompts: list[list[int]], params: SamplingParams):
        """Generator: yields (index, text piece) as text is produced; returns the Completions."""
        for p in prompts:
            self._check_prompt(p)
        device = self.ops.device
        seqs = [_Sequence(p, params, min(params.max_new_tokens, self.context_length - len(p)),
                          make_generator(params.seed, "cpu"), self.tokenizer.stream_decoder()) for p in prompts]
        cache = self._get_cache(len(seqs), max(len(s.prompt) + s.max_new for s in seqs))
        stats = self.last_stats = GenerationStats(prompt_tokens=sum(len(s.prompt) for s in seqs))

        start = time.perf_counter()
        for i, s in enumerate(seqs):  # prefill one prompt at a time: no padding, any lengths
            n = len(s.prompt)
            logits = self.model.forward(torch.tensor([s.prompt], device=device),
                                        torch.arange(n, device=device)[None], cache,
                                        torch.tensor([i], device=device))
            piece = self._accept(s, sample(logits[0].cpu(), params, self._seen(s), s.generator))
            if piece:
                yield i, piece
        stats.prefill_seconds = time.perf_counter() - start

        start = time.perf_counter()
        while True:
            active = [i for i, s in enumerate(seqs) if s.finish_reason is None]
            if not active:
                break
            ids = torch.tensor([[seqs[i].output[-1]] for i in active], device=device)
            positions = torch.tensor([[len(seqs[i].prompt) + len(seqs[i].output) - 1] for i in active], device=device)
            logits = self.model.forward(ids, positions, cache, torch.tensor(active, device=device)).cpu()
            for row, i in enumerate(active):
                s = seqs[i]
                piece = self._accept(s, sample(logits[row], params, self._seen(s), s.generator))
                if piece:
                    yield i, piece
        stats.decode_seconds = time.perf_counter() - start
        stats.generated_tokens = sum(len(s.output) for s in seqs)
        return [Completion(s.text, s.output, s.prompt, s.finish_reason) for s in seqs]

    @staticmethod
    def _seen(s: _Sequence) -> torch.Tensor | None:
        if s.params.repetition_penalty == 1.0:
            return None
        return torch.tensor(s.prompt + s.output)

    def _accept(self, s: _Sequence, token: int) -> str:
        """Append a sampled token to a sequence, update its text and finish state; return new text."""
        p = s.params
        if (token in self.end_ids and not p.ignore_eos) or token in p.stop_token_ids:
            s.finish_reason = "stop"
            s.text += s.detok.flush()
            return self._release(s, len(s.text))
        s.output.append(token)
        s.text += s.detok.push(token)
        if len(s.output) >= s.max_new:
            s.text += s.detok.flush()
            s.finish_reason = "length"
        if p.stop:
            # search only the tail that new text could have completed
            window = max(0, s.emitted - max(map(len, p.stop)))
            hits = [h for h in (s.text.find(x, window) for x in p.stop) if h >= 0]
            if hits:
                s.text = s.text[:min(hits)]
                s.finish_reason = "stop"
        if s.finish_reason is not None:
            return self._release(s, len(s.text))
        # hold back a tail that could be the start of a stop string
        held = max((k for x in p.stop for k in range(1, len(x)) if s.text.endswith(x[:k])), default=0)
        return self._release(s, len(s.text) - held)

    @staticmethod
    def _release(s: _Sequence, upto: int) -> str:
        upto = min(upto, len(s.text))
        piece = s.text[s.emitted:upto]
        s.emitted = max(s.emitted, upto)
        return piece
