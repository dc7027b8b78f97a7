"""The one-launch decode kernel (csrc/decode_layers.cu) against the same layers run op by op.

Both paths run on the GPU from the same weights and the same cache contents; the fused kernel
claims the same bits (it runs the op-by-op kernels' device code in the same order and the same
integer GEMV), so logits and every cache entry are compared for equality, not within a tolerance.
Rows have different lengths (1 token up to the end of the cache), some share a cache slot's
neighbours, the batch sizes cover 1..8 (one MMA column block), and the scratch memory the kernel
reuses is filled with garbage first. Skipped without a GPU; bench/gpu_check.sh runs it.
"""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from engine import kernels
from engine.config import ModelConfig
from engine.cuda_ops import CudaOps
from engine.model import BitNetModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=512, hidden_size=512, intermediate_size=1376, num_layers=3, num_heads=4, num_kv_heads=1,
                head_dim=128, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


CONFIGS = {
    "head_dim 128, group 4": config(),
    "head_dim 16, group 3 (the tiny test model's heads)": config(hidden_size=96, intermediate_size=200, num_heads=6,
                                                                  num_kv_heads=2, head_dim=16, num_layers=2),
    "odd sizes: 3 groups of 3, ffn 1000": config(hidden_size=1152, intermediate_size=1000, num_heads=9,
                                                 num_kv_heads=3, head_dim=128, num_layers=2),
}


def with_2b4t_shapes() -> ModelConfig:
    from e2e import CONFIG_2B4T

    return dataclasses.replace(CONFIG_2B4T, num_layers=4, vocab_size=4096)   # every layer has the same shapes


CONFIGS["2B-4T layers"] = None


def model_for(cfg: ModelConfig, seed: int) -> BitNetModel:
    from e2e import random_tensors

    tensors = random_tensors(cfg, seed=seed)
    for i, name in enumerate(tensors):   # scales that differ per projection (each segment keeps its own)
        if name.endswith(".scale"):
            tensors[name] = torch.tensor([0.01 + 0.002 * (i % 7)])
    return BitNetModel(cfg, tensors, CudaOps(torch.bfloat16))


def fill_cache(model: BitNetModel, slots: int, max_len: int, seed: int):
    cache = model.new_cache(slots, max_len)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen, device="cuda"))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen, device="cuda"))
    return cache


def step(model: BitNetModel, cache, ids, positions, slots, fused: bool) -> torch.Tensor:
    model.ops.fused_decode = fused
    dev = "cuda"
    ids = torch.tensor(ids, device=dev)[:, None]
    positions = torch.tensor(positions, device=dev)[:, None]
    slots = torch.tensor(slots, device=dev)
    return model.forward(ids, positions, cache, slots)


def garbage_in_the_allocator():
    # scratch the kernels take from torch's caching allocator then holds leftover non-zero bytes
    junk = torch.full((64 << 20,), 0x7F, dtype=torch.uint8, device="cuda")
    del junk


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_fused_decode_step_is_bit_identical_to_the_op_by_op_step(name, batch):
    cfg = CONFIGS[name] or with_2b4t_shapes()
    model = model_for(cfg, seed=batch)
    max_len = 1024
    gen = torch.Generator().manual_seed(batch)
    slots = torch.randperm(8, generator=gen)[:batch].tolist()
    # lengths: the first token, short, long, the last cache entry
    positions = [[0, 5, 700, max_len - 1, 63, 64, 300, 1][i % 8] for i in range(batch)]
    ids = torch.randint(0, cfg.vocab_size, (batch,), generator=gen).tolist()
    base = fill_cache(model, 8, max_len, seed=batch)
    fused_cache = model.new_cache(8, max_len)
    fused_cache.k.copy_(base.k), fused_cache.v.copy_(base.v)
    assert kernels.decode_layers_unsupported(cfg, batch) == ""
    garbage_in_the_allocator()
    want = step(model, base, ids, positions, slots, fused=False)
    garbage_in_the_allocator()
    got = step(model, fused_cache, ids, positions, slots, fused=True)
    torch.cuda.synchronize()
    assert torch.isfinite(want).all() and want.abs().max() > 0
    assert torch.equal(got, want), f"max |diff| {(got - want).abs().max():.3e}"
    assert torch.equal(fused_cache.k, base.k) and torch.equal(fused_cache.v, base.v)
    # the kernel's barrier is left ready: a second launch gives the same again
    again = step(model, fused_cache, ids, positions, slots, fused=True)
    assert torch.equal(again, want)


def test_fused_decode_replays_in_a_cuda_graph_with_new_lengths():
    cfg = CONFIGS["head_dim 128, group 4"]
    model = model_for(cfg, seed=11)
    base = fill_cache(model, 4, 512, seed=11)
    fused_cache = model.new_cache(4, 512)
    fused_cache.k.copy_(base.k), fused_cache.v.copy_(base.v)
    ids = torch.tensor([[3], [9]], device="cuda")
    positions = torch.tensor([[10], [20]], device="cuda")
    slots = torch.tensor([2, 0], device="cuda")
    model.ops.fused_decode = True
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model.forward(ids, positions, fused_cache, slots)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model.forward(ids, positions, fused_cache, slots)
    for pos in ([10, 20], [11, 21], [300, 2], [511, 0]):
        positions.copy_(torch.tensor(pos, device="cuda")[:, None])
        graph.replay()
        want = step(model, base, [3, 9], pos, [2, 0], fused=False)
        torch.cuda.synchronize()
        assert torch.equal(logits, want), pos
        assert torch.equal(fused_cache.k, base.k) and torch.equal(fused_cache.v, base.v)


def test_the_2b4t_shapes_take_the_fused_kernel_with_up_to_8_rows():
    from e2e import CONFIG_2B4T

    assert kernels.decode_layers_unsupported(CONFIG_2B4T, 1) == ""
    assert kernels.decode_layers_unsupported(CONFIG_2B4T, 8) == ""
    assert kernels.decode_layers_unsupported(CONFIG_2B4T, 9) != ""


def test_generation_with_the_fused_kernel_gives_the_op_by_op_tokens(tiny_checkpoint):
    """Through the runtime and its graphs (3 prompts: a padded bucket of 4), greedy, 64 tokens."""
    from engine import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True)
    llm = LLM(tiny_checkpoint, device="cuda")
    prompts = [llm.encode(t) for t in ("Hello", "The quick brown fox jumps over", "1 2 3")]
    llm.model.ops.fused_decode, llm._runtime = False, None
    want = [c.token_ids for c in llm.generate(prompts, params)]
    llm.model.ops.fused_decode, llm._runtime = True, None
    got = [c.token_ids for c in llm.generate(prompts, params)]
    assert llm.model.backend_state["decode_table"] is not None   # the fused kernel ran
    assert got == want
