"""The model's forwards as CUDA graphs, so that the GPU, not the host's launch overhead, sets the pace.

DecodeGraphs: the decode step (all layers, the LM head and the greedy pick), one graph per
batch-size bucket, replayed with token ids, positions and cache slots held in device tensors (the
ids copied from the host, or gathered on the device from the previous step's picks, which lets the
runtime launch a step before it has read the one before: engine/runtime.py).
Nothing about lengths is fixed at capture: the kernels read each row's position from the input
tensor (attention spans 0..position, the KV write lands at position), and their grids depend only
on the cache's shape. A batch smaller than its bucket is padded with copies of its first row,
which recompute that row and write the same keys and values to the same place.

PrefillGraphs: the chunks of a single prompt, one graph per (first position, length rounded up to
a multiple of 64), captured the first time a chunk needs it. Eager, a 512-token prefill of 2B-4T
on an H100 spends 10-14 ms issuing its ~400 launches against 8 ms of GPU work; replayed, the host
issues one. The padding tokens come after the chunk: causal attention keeps them out of the real
positions, and the cache entries they write past the prompt are written again by the decode steps
before anything reads them.
"""

import array
import itertools

import torch

from .model import BitNetModel, KVCache
from .sampling import argmax_rows

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def capture(forward, pool) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm `forward` up on a side stream (lazy initialization, autotuning), then capture it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out


class DecodeGraphs:
    def __init__(self, model: BitNetModel, cache: KVCache, max_batch: int, pool):
        self.model, self.cache = model, cache
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        top = self.buckets[-1]
        dev = model.ops.device
        # each bucket reads its own contiguous [ids; positions; slots; where ids come from], filled
        # by one copy from the pinned staging buffer
        self.inputs = {b: torch.zeros(4, b, dtype=torch.long, device=dev) for b in self.buckets}
        self.staging = torch.zeros(4 * top, dtype=torch.long, pin_memory=True)
        self.staged = torch.cuda.Event()   # the last copy out of `staging` is done
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        # capture every bucket now, while the cache holds nothing: warm-up runs write to slot 0
        for b in reversed(self.buckets):
            self.graphs[b] = capture(lambda b=b: self._forward(b), pool)

    def _forward(self, b: int):
        inputs = self.inputs[b]
        logits = self.model.forward(inputs[0, :, None], inputs[1, :, None], self.cache, inputs[2])
        return logits, argmax_rows(logits)

    def run(self, ids: list[int], positions: list[int], slots: list[int],
            source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the smallest bucket that holds the batch: fp32 logits [n, V], argmax ids [n].
        With `source` (token ids on the device: the previous step's picks, which the host has not
        read yet), `ids` are indices into it. Nothing here waits for the GPU (unless the previous
        step's inputs are still being copied)."""
        n = len(ids)
        b = next(b for b in self.buckets if b >= n)
        pad = b - n
        if pad:
            ids, positions, slots = ids + ids[:1] * pad, positions + positions[:1] * pad, slots + slots[:1] * pad
        values = torch.frombuffer(array.array("q", ids + positions + slots + ids), dtype=torch.long)
        self.staged.synchronize()   # do not overwrite pinned memory a copy is still reading
        staged = self.staging[:4 * b]
        staged.copy_(values)
        inputs = self.inputs[b]
        inputs.view(-1).copy_(staged, non_blocking=True)
        self.staged.record()
        if source is not None:   # on the stream, after the step that wrote `source`
            torch.index_select(source, 0, inputs[3], out=inputs[0])
        graph, (logits, greedy) = self.graphs[b]
        graph.replay()
        return logits[:n], greedy[:n]


class PrefillGraphs:
    STEP = 64   # chunk lengths are padded up to a multiple of this (at most 63 wasted positions)

    def __init__(self, model: BitNetModel, cache: KVCache, max_tokens: int, pool):
        """Graphs for one prompt's chunks of up to max_tokens positions, within the cache's length."""
        self.model, self.cache, self.pool = model, cache, pool
        self.max_tokens = min(max_tokens, cache.max_len)
        # [slot, last, ids...]: one copy from the host per chunk; each graph reads a prefix of the ids
        self.inputs = torch.zeros(2 + self.max_tokens, dtype=torch.long, device=model.ops.device)
        self.positions = torch.arange(cache.max_len, device=model.ops.device)[None]
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def length_for(self, start: int, n: int) -> int | None:
        """The padded length that positions start..start+n-1 run at, or None if no graph takes them."""
        room = min(self.max_tokens, self.cache.max_len - start)
        if not 1 <= n <= room:
            return None
        return min(-(-n // self.STEP) * self.STEP, room)

    def _forward(self, start: int, t: int) -> torch.Tensor:
        ids = self.inputs[2:2 + t].view(1, t)
        return self.model.forward(ids, self.positions[:, start:start + t], self.cache, self.inputs[:1],
                                  span=start + t, last=self.inputs[1:2])

    def run(self, ids: list[int], start: int, slot: int) -> torch.Tensor | None:
        """Prefill positions start..start+len(ids)-1 of cache slot `slot` (0..start-1 are in the cache
        already): fp32 logits [1, V] of the last one; None if no graph takes the chunk (the caller
        runs the forward eagerly)."""
        t = self.length_for(start, len(ids))
        if t is None:
            return None
        values = array.array("q", [slot, len(ids) - 1])
        values.extend(ids)
        values.extend(itertools.repeat(0, t - len(ids)))
        # from pageable memory: the copy is ordered after the stream's earlier work, which may still read inputs
        self.inputs[:2 + t].copy_(torch.frombuffer(values, dtype=torch.long))
        key = (start, t)
        if key not in self.graphs:   # the warm-up run computes this chunk too; the replay below redoes it
            self.graphs[key] = capture(lambda: self._forward(start, t), self.pool)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits
