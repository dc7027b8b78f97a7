"""Sampling parameters and the token sampler."""

import os
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""
    temperature: float = 1.0
    top_k: int = 0                   # 0: off
    top_p: float = 1.0               # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; >1 discourages tokens already in prompt or output
    max_new_tokens: int = 256
    seed: int | None = None          # same seed, same prompt, same output
    stop: list[str] = field(default_factory=list)   # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)  # extra ids that end generation
    ignore_eos: bool = False         # keep going past the model's end ids (benchmarks)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def make_generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> the index of each row's first largest value, as torch.argmax(dim=-1).

    On a GPU (fp32 logits) the kernel of csrc/argmax.cu: chunks of each row reduced in parallel,
    then their maxima, in two launches (4 us of a batch-1 decode step on an H100, where torch's
    argmax, one block per row, took 37 us and the same two steps in torch ops 16 us). Elsewhere
    those two steps in torch: the largest of each chunk of the vocabulary, then the largest of those."""
    v = logits.shape[-1]
    rows = logits.numel() // v if v else 0
    if logits.is_cuda and logits.dtype == torch.float32 and 0 < rows <= 65535:
        from . import kernels

        return kernels.argmax_rows(logits.reshape(rows, v)).reshape(logits.shape[:-1])
    chunks = next((c for c in range(256, 1, -1) if v % c == 0 and v // c >= 64), 1)
    if chunks == 1:
        return logits.argmax(dim=-1)
    best, where = logits.unflatten(-1, (chunks, v // chunks)).max(dim=-1)   # first largest in each chunk
    chunk = best.argmax(dim=-1, keepdim=True)                                # the first chunk holding the largest
    return (chunk * (v // chunks) + where.gather(-1, chunk)).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive logits of seen tokens by `penalty`, multiply negative ones (CTRL's rule)."""
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
           generator: torch.Generator) -> int:
    """Pick one token from fp32 logits [V]. `seen`: ids of the prompt and output so far."""
    return int(pick(logits, params, seen, generator))


def pick(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
         generator: torch.Generator) -> torch.Tensor:
    """`sample` without leaving the logits' device: returns the token as a 0-d tensor there.
    `seen` and `generator` live on the same device."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = apply_repetition_penalty(logits, seen.unique(), params.repetition_penalty)
    if params.greedy:
        return argmax_rows(logits)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]
