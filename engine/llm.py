"""The Python API: load a converted checkpoint and generate, chat or score.

    from engine import LLM, SamplingParams
    llm = LLM("checkpoints/bitnet-b1.58-2B-4T")
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_new_tokens=16))
    print(out[0].text)
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, find_checkpoints, load_checkpoint
from .config import ModelConfig
from .model import BitNetModel
from .ops import TorchOps
from .runtime import Runtime, check_prompt
from .sampling import SamplingParams
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


HEADS = ("bf16", "int8")


def check_head(head) -> str:
    """The LM head choice: "bf16" (the checkpoint's table as it is: exact) or "int8" (per-row int8 with
    fp32 scales: half the head's bytes per decode step, logits no longer exact)."""
    if not isinstance(head, str) or head not in HEADS:
        raise ValueError(f"head must be 'bf16' (the checkpoint's table, exact) or 'int8' (per-row int8, half the "
                         f"head's memory traffic), got {head!r}")
    return head


class LLM:
    """A loaded model. head: "bf16" (default) uses the checkpoint's head table as it is; "int8"
    replaces it by per-row int8 values and fp32 scales (engine.ops.Int8Head): half the bytes the
    head reads per decode step, at a small accuracy cost. On the CPU the int8 head is the reference
    the GPU kernel is tested against (same int8 values and scales, fp32 sums)."""

    def __init__(self, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                 graphs: bool | None = None, head: str = "bf16"):
        check_head(head)
        path = Path(path)
        # a folder with its own config.json is taken as the checkpoint (load_checkpoint says what
        # is wrong with it); otherwise look for the one checkpoint inside
        found = [path] if (path / "config.json").is_file() else find_checkpoints(path)
        if len(found) != 1:
            raise CheckpointError(f"{path} is not a converted checkpoint" if not found else
                                  f"{path} holds several checkpoints ({', '.join(p.name for p in found)}); pick one")
        ops = make_ops(torch.device(device), dtype)
        config, tensors = load_checkpoint(found[0])
        self._setup(config, tensors, load_tokenizer(found[0]), ops, graphs, head)
        self.path = found[0]

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: dict[str, torch.Tensor], tokenizer,
                     device: str = "cpu", dtype: torch.dtype | None = None, graphs: bool | None = None,
                     head: str = "bf16", ops: TorchOps | None = None) -> "LLM":
        """An LLM from tensors in the checkpoint format held in memory (benchmarks build random ones).
        ops: an ops object to run the model with instead of the device's own (device and dtype are then
        ignored), e.g. a benchmark's baseline."""
        check_head(head)
        llm = cls.__new__(cls)
        ops = ops if ops is not None else make_ops(torch.device(device), dtype)
        llm._setup(config, tensors, tokenizer, ops, graphs, head)
        llm.path = None
        return llm

    def _setup(self, config: ModelConfig, tensors, tokenizer, ops: TorchOps, graphs: bool | None,
               head: str = "bf16") -> None:
        self.config, self.tokenizer, self.ops = config, tokenizer, ops
        self.model = BitNetModel(config, tensors, ops)
        self.head = head
        if head == "int8":  # the bf16 table stays for token lookups (embed_tokens) when the head is tied
            self.model.head = ops.int8_head(self.model.head)
        self.end_ids = set(config.eos_token_ids) | set(tokenizer.end_token_ids())
        self.context_length = config.max_position_embeddings
        self.graphs = graphs            # None: CUDA graphs on a GPU, eager on the CPU
        self.last_stats = GenerationStats()
        self._runtime: Runtime | None = None

    def runtime(self, max_batch: int, max_len: int | None = None) -> Runtime:
        """A scheduler with at least `max_batch` cache slots of at least `max_len` tokens (default:
        the whole context). The last one is reused when it is large enough: graphs are captured once."""
        need = min(max_len or self.context_length, self.context_length)
        rt = self._runtime
        if rt is None or rt.max_batch < max_batch or rt.max_len < need:
            self._runtime = None  # free the old cache before allocating the new one
            if self.ops.device.type == "cuda":
                torch.cuda.empty_cache()
            # round the length up so that slightly longer requests reuse it
            length = min(-(-need // 256) * 256, self.context_length)
            self._runtime = Runtime(self.model, self.tokenizer, self.end_ids, max_batch, length, self.graphs)
        return self._runtime

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
        return self.model.forward(ids, positions, cache, slots, all_logits=True, span=n)[0]

    # ---- the generation loop ----------------------------------------------------------------
    @staticmethod
    def _drain(gen) -> list[Completion]:
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value

    def _check_prompt(self, ids: list[int]) -> None:
        check_prompt(ids, self.config.vocab_size, self.context_length)

    def _run(self, prompts: list[list[int]], params: SamplingParams):
        """Generator: yields (index, text piece) as text is produced; returns the Completions.
        All prompts decode together; each leaves the batch when it finishes."""
        for p in prompts:
            self._check_prompt(p)
        longest = max(len(p) + min(params.max_new_tokens, self.context_length - len(p)) for p in prompts)
        rt = self.runtime(len(prompts), longest)
        prefill, decode = rt.prefill_seconds, rt.decode_seconds
        reqs = [rt.add(p, params) for p in prompts]
        index = {id(r): i for i, r in enumerate(reqs)}
        try:
            while not all(r.finished for r in reqs):
                for req, piece in rt.step():
                    if piece:
                        yield index[id(req)], piece
        finally:  # a caller that stops early leaves no request behind
            for r in reqs:
                if not r.finished:
                    rt.cancel(r)
            while rt.has_work and any(not r.finished for r in reqs):
                rt.step()
        self.last_stats = GenerationStats(prompt_tokens=sum(map(len, prompts)),
                                          generated_tokens=sum(len(r.output) for r in reqs),
                                          prefill_seconds=rt.prefill_seconds - prefill,
                                          decode_seconds=rt.decode_seconds - decode)
        return [Completion(r.text, r.output, r.prompt, r.finish_reason) for r in reqs]
