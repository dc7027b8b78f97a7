"""The decode step as CUDA graphs: all layers, the LM head and the greedy pick, one graph per
batch-size bucket, replayed with token ids, positions and cache slots held in device tensors.

Nothing about lengths is fixed at capture: the kernels read each row's position from the input
tensor (attention spans 0..position, the KV write lands at position), and their grids depend only
on the cache's shape. A batch smaller than its bucket is padded with copies of its first row,
which recompute that row and write the same keys and values to the same place.
"""

import array

import torch

from .model import BitNetModel, KVCache

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, model: BitNetModel, cache: KVCache, max_batch: int):
        self.model, self.cache = model, cache
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        top = self.buckets[-1]
        dev = model.ops.device
        # each bucket reads its own contiguous [ids; positions; slots], filled by one copy from
        # the pinned staging buffer
        self.inputs = {b: torch.zeros(3, b, dtype=torch.long, device=dev) for b in self.buckets}
        self.staging = torch.zeros(3 * top, dtype=torch.long, pin_memory=True)
        self.staged = torch.cuda.Event()   # the last copy out of `staging` is done
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()   # one memory pool: buckets share their activations
        # capture every bucket now, while the cache holds nothing: warm-up runs write to slot 0
        for b in reversed(self.buckets):
            self.graphs[b] = self._capture(b, pool)

    def _forward(self, b: int):
        inputs = self.inputs[b]
        logits = self.model.forward(inputs[0, :, None], inputs[1, :, None], self.cache, inputs[2])
        return logits, logits.argmax(dim=-1)

    def _capture(self, b: int, pool):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm up outside the graph (lazy initialization, autotuning)
            self._forward(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits, greedy = self._forward(b)
        return graph, logits, greedy

    def run(self, ids: list[int], positions: list[int], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the smallest bucket that holds the batch: fp32 logits [n, V], argmax ids [n].
        Nothing here waits for the GPU (unless the previous step's inputs are still being copied)."""
        n = len(ids)
        b = next(b for b in self.buckets if b >= n)
        pad = b - n
        if pad:
            ids, positions, slots = ids + ids[:1] * pad, positions + positions[:1] * pad, slots + slots[:1] * pad
        values = torch.frombuffer(array.array("q", ids + positions + slots), dtype=torch.long)
        self.staged.synchronize()   # do not overwrite pinned memory a copy is still reading
        staged = self.staging[:3 * b]
        staged.copy_(values)
        self.inputs[b].view(-1).copy_(staged, non_blocking=True)
        self.staged.record()
        graph, logits, greedy = self.graphs[b]
        graph.replay()
        return logits[:n], greedy[:n]
