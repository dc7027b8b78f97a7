"""The decode-step kernels (csrc/decode.cu, csrc/decode_attention.cu) against the reference ops.

Bit-exact: RoPE + KV-cache write (engine.ops.apply_rope), relu^2 + FFN sub-norm + quantization
(TorchOps.gate_up_act_norm_quant), and the fused attention sub-norm + quantization (equal to the
reference norm + quant of the unfused kernel's own output). Attention itself is fp32 in another
summation order (flash decoding), compared with an fp64 reference: the output may differ from it by
the final rounding to the dtype (half an ulp: 2^-8 |ref| for bf16, 2^-24 for fp32) plus fp32
accumulation error, bounded here by 1e-5 * max|v| (the output is a convex combination of the values;
the observed fp32 error is ~1e-7 * max|v|, a wrong key or weight costs ~1e-1).

References with an RMSNorm run on the GPU: torch's CUDA sqrt is IEEE-rounded like the kernels',
while some CPU builds (MKL, AVX-512) round fp32 sqrt differently for ~15% of inputs.
Outputs and caches are poisoned before every call; cache entries past each row's length hold NaN.
"""

import pytest
import torch
import torch.nn.functional as F

from engine.ops import apply_rope, rope_tables
from engine.quant import quantize_activations, rmsnorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPE_2B4T = (20, 5, 128)  # heads, kv heads, head_dim
SHAPES_TINY = [(4, 2, 8), (6, 3, 24), (3, 3, 16), (6, 2, 16)]
DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def k():
    from engine import kernels

    kernels.load()
    return kernels


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def padded_rows(x_q: torch.Tensor, k) -> torch.Tensor:
    """The whole padded buffer behind a quantized [m, n] view."""
    return torch.as_strided(x_q, (x_q.shape[0], k.padded(x_q.shape[1])), (k.padded(x_q.shape[1]), 1))


# ---- RoPE + KV write ---------------------------------------------------------------------------------

def assert_rope_outputs(q, k_cache, v_cache, qkv, valid, positions, slots, cos, sin, poison, where=""):
    """q [rows, heads, d] and the caches after a RoPE + KV-write kernel, against apply_rope of the
    reference q|k|v of the `valid` rows (qkv [valid rows, (heads + 2 kv_heads) d], in the dtype):
    q of those rows and their cache entries bit for bit, q of the others zero, every other cache
    entry still `poison`."""
    rows, heads, d = q.shape
    kv_heads, dtype = poison.shape[1], poison.dtype
    q_in, k_in, v_in = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    c, s = cos[positions[valid]][None], sin[positions[valid]][None]
    q_ref = apply_rope(q_in.reshape(1, -1, heads, d), c, s).to(dtype)[0]
    k_ref = apply_rope(k_in.reshape(1, -1, kv_heads, d), c, s).to(dtype)[0]
    k_exp, v_exp = poison.clone(), poison.clone()
    k_exp[slots[valid], :, positions[valid]] = k_ref
    v_exp[slots[valid], :, positions[valid]] = v_in.reshape(-1, kv_heads, d)
    q = q.cpu()
    assert torch.equal(bits(q[valid]), bits(q_ref)), where
    assert (q[~valid] == 0).all(), where
    assert torch.equal(bits(k_cache.cpu()), bits(k_exp)), where
    assert torch.equal(bits(v_cache.cpu()), bits(v_exp)), where


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,d", [SHAPE_2B4T] + SHAPES_TINY)
def test_rope_kv_write_is_bit_exact(k, dtype, heads, kv_heads, d):
    gen = torch.Generator().manual_seed(heads * 100 + d)
    slots_n, max_len = 4, 70
    cos, sin = rope_tables(d, 500000.0, 128)
    # rows: a prompt's tokens in slot 2, decode tokens of other slots, the last position, and rows the
    # kernel must skip (position past the cache, negative, slot out of range)
    positions = torch.tensor([0, 1, 2, 3, 69, 17, 5, 70, -1, 9])
    slots = torch.tensor([2, 2, 2, 2, 0, 3, 1, 1, 0, 4])
    valid = (positions >= 0) & (positions < max_len) & (slots < slots_n)
    rows = len(positions)
    qkv = (torch.randn(rows, (heads + 2 * kv_heads) * d, generator=gen) * 4).to(dtype)
    qkv[0, :d] = torch.tensor([3e38, -3e38]).repeat(d // 2).to(dtype)  # extremes: products overflow to inf
    poison = torch.full((slots_n, kv_heads, max_len, d), -777.0, dtype=dtype)
    k_cache, v_cache = poison.cuda(), poison.cuda()
    out = torch.full((rows, heads, d), float("nan"), dtype=dtype, device="cuda")
    q = k.rope_kv_write(qkv.cuda(), positions.cuda(), slots.cuda(), cos.cuda(), sin.cuda(), k_cache, v_cache, heads,
                        out=out)
    assert q.data_ptr() == out.data_ptr()

    assert_rope_outputs(q, k_cache, v_cache, qkv[valid], valid, positions, slots, cos, sin, poison)


# ---- the q|k|v GEMM with RoPE and the KV write in its epilogue ---------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,d,kk", [SHAPE_2B4T + (2560,), (6, 3, 32, 130), (3, 1, 256, 64),
                                                 (4, 2, 64, 6913)])
def test_gemm_rope_kv_equals_gemm_then_rope_reference(k, dtype, heads, kv_heads, d, kk):
    """Bit-exact with the reference BitLinear (q|k|v segments, their own scales) rounded to the dtype,
    then apply_rope: q, and every cache entry (written rows, and poison everywhere else); rows with a
    position or slot out of range get a zero q and write nothing. Every row count the kernel takes
    (token groups of 8 and 16), extreme activations and weights, a one-warp block (several row pairs
    per thread) and the widest."""
    from engine.cuda_ops import CudaOps
    from engine.ops import TorchOps
    from engine.quant import pack_ternary

    gen = torch.Generator().manual_seed(heads * 1000 + d + kk)
    n_parts = (heads * d, kv_heads * d, kv_heads * d)
    parts = []
    for i, n in enumerate(n_parts):
        w = torch.randint(-1, 2, (n, kk), dtype=torch.int8, generator=gen)
        w[i] = -1  # an all -1 row in each segment
        parts.append((pack_ternary(w), torch.tensor([0.25 + torch.rand(1, generator=gen).item()])))
    ref_ops, gpu_w = TorchOps(dtype), CudaOps(dtype).prepare_linear(parts, kk)
    ref_w = ref_ops.prepare_linear(parts, kk)
    ends = [n_parts[0], n_parts[0] + n_parts[1], sum(n_parts)]
    slots_n, max_len = 5, 40
    cos, sin = rope_tables(d, 500000.0, 48)
    for m, warps in ((1, 0), (3, 1), (8, 0), (9, 0), (16, 16), (17, 0), (40, 3), (64, 0)):
        x_q = torch.randint(-128, 128, (m, kk), dtype=torch.int8, generator=gen)
        x_q[0] = -128
        if m > 1:
            x_q[1] = 127
        x_s = torch.rand(m, 1, generator=gen) * 0.5 + 0.01
        positions = torch.randint(0, max_len, (m,), generator=gen)
        slots = torch.randperm(slots_n * 13, generator=gen)[:m] % slots_n
        positions[:: 7] = max_len - 1
        if m > 2:
            positions[2], slots[m - 1] = max_len, slots_n   # past the cache; a slot out of range
        if m > 5:
            positions[5] = -3
        # distinct (slot, position) among the valid rows: each cache entry is written once
        seen, valid = set(), torch.zeros(m, dtype=torch.bool)
        for r in range(m):
            key = (int(slots[r]), int(positions[r]))
            valid[r] = 0 <= key[1] < max_len and key[0] < slots_n and key not in seen
            if valid[r]:
                seen.add(key)
            elif 0 <= key[1] < max_len and key[0] < slots_n:
                positions[r] = max_len + 1   # a duplicate: make it an out-of-range row instead
        poison = torch.full((slots_n, kv_heads, max_len, d), -777.0, dtype=dtype)
        k_cache, v_cache = poison.cuda(), poison.cuda()
        out = torch.full((m, heads, d), float("nan"), dtype=dtype, device="cuda")
        q = k.gemm_rope_kv(x_q.cuda(), x_s.cuda(), gpu_w.weight, kk, ends, gpu_w.scales, positions.cuda(),
                           slots.cuda(), cos.cuda(), sin.cuda(), k_cache, v_cache, heads, out=out, warps=warps)
        assert q.data_ptr() == out.data_ptr()

        qkv = ref_ops.bitlinear(x_q, x_s, ref_w)[valid]
        assert_rope_outputs(q, k_cache, v_cache, qkv, valid, positions, slots, cos, sin, poison, f"M={m}")


def test_gemm_rope_kv_refuses_what_it_cannot_take(k):
    from engine.quant import pack_ternary

    heads, kv_heads, kk = 2, 1, 64
    cache = torch.zeros(1, kv_heads, 8, 16, device="cuda")
    tiled = k.repack(pack_ternary(torch.zeros(64, kk, dtype=torch.int8)).cuda(), 64, kk)
    x_q, one = torch.zeros(1, kk, dtype=torch.int8, device="cuda"), torch.zeros(1, dtype=torch.int64, device="cuda")
    cos, sin = (t.cuda() for t in rope_tables(16, 10000.0, 8))
    assert not k.gemm_rope_kv_fits(1, heads, kv_heads, 16) and k.gemm_rope_kv_fits(64, heads, kv_heads, 32)
    assert not k.gemm_rope_kv_fits(65, heads, kv_heads, 32)
    with pytest.raises(ValueError, match="multiple of 32"):   # head_dim 16
        k.gemm_rope_kv(x_q, torch.ones(1, device="cuda"), tiled, kk, [32, 48, 64], [1.0] * 3, one, one, cos, sin,
                       cache, cache.clone(), heads)
    cache32 = torch.zeros(1, kv_heads, 8, 32, device="cuda")
    with pytest.raises(ValueError, match="does not match a 128x64"):   # (2 + 2 * 1) * 32 rows
        k.gemm_rope_kv(x_q, torch.ones(1, device="cuda"), tiled, kk, [64, 96, 128], [1.0] * 3, one, one, cos, sin,
                       cache32, cache32.clone(), heads)


# ---- decode attention --------------------------------------------------------------------------------

def reference_attention(q, k_cache, v_cache, slots, positions) -> torch.Tensor:
    """fp64 softmax(q k^T / sqrt(D)) v over entries 0..positions[b]; GQA: head h reads kv head h // G."""
    b, heads, d = q.shape
    group = heads // k_cache.shape[1]
    out = torch.zeros(b, heads, d, dtype=torch.float64)
    for i in range(b):
        n = int(positions[i]) + 1
        keys = k_cache[slots[i], :, :n].double().repeat_interleave(group, dim=0)   # [heads, n, D]
        values = v_cache[slots[i], :, :n].double().repeat_interleave(group, dim=0)
        scores = (keys @ q[i].double()[:, :, None])[..., 0] * d ** -0.5           # [heads, n]
        out[i] = (torch.softmax(scores, dim=-1)[:, None, :] @ values)[:, 0]
    return out.reshape(b, heads * d)


def attention_case(heads, kv_heads, d, batch, max_len, dtype, seed):
    """Random q and caches, lengths from the edge cases, slots out of order, NaN past every length."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [n for n in (max_len, 1, max_len - 1, 2, 257, 17, 256, 255) if n <= max_len]  # longest first
    lengths = [lengths[i % len(lengths)] for i in range(batch)]
    slots_n = batch + 2
    slots = torch.randperm(slots_n, generator=gen)[:batch]
    q = (torch.randn(batch, heads, d, generator=gen) * 2).to(dtype)
    k_cache = torch.randn(slots_n, kv_heads, max_len, d, generator=gen).to(dtype)
    v_cache = (torch.randn(slots_n, kv_heads, max_len, d, generator=gen) * 3).to(dtype)
    positions = torch.tensor(lengths) - 1
    for slot, n in zip(slots.tolist(), lengths):
        k_cache[slot, :, n:] = float("nan")
        v_cache[slot, :, n:] = float("nan")
    return q, k_cache, v_cache, slots, positions


def assert_close_to_reference(out, ref, v_cache, dtype, atol=1e-5):
    vmax = v_cache.float().nan_to_num(0.0).abs().max().item()
    rtol = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24
    err = (out.cpu().double() - ref).abs()
    tol = rtol * ref.abs() + atol * vmax
    assert torch.isfinite(out).all(), "NaN: an entry past a row's length was read"
    assert (err <= tol).all(), f"max error {err.max().item():.3g}, {(err > tol).sum().item()} elements out of tolerance"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,max_len", [(1, 4096), (3, 1024), (8, 300), (64, 1024)])
def test_decode_attention_2b4t_matches_fp64_reference(k, dtype, batch, max_len):
    q, k_cache, v_cache, slots, positions = attention_case(*SHAPE_2B4T, batch, max_len, dtype, seed=batch)
    out = k.decode_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), slots.cuda(), positions.cuda())
    assert out.shape == (batch, SHAPE_2B4T[0] * SHAPE_2B4T[2]) and out.dtype == dtype
    assert_close_to_reference(out, reference_attention(q, k_cache, v_cache, slots, positions), v_cache, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,d", SHAPES_TINY + [(10, 1, 2), (5, 5, 100), (16, 2, 64), (8, 2, 256),
                                                                (20, 2, 128), (12, 4, 64), (4, 4, 128)])
def test_decode_attention_any_head_shape(k, dtype, heads, kv_heads, d):
    """head_dim 2..256 (tensor-core, vector and scalar paths), any group size (G = 8: one pass; G = 10:
    two, the second of 2 heads; G = 3 in a pass of 4; G = 1)."""
    q, k_cache, v_cache, slots, positions = attention_case(heads, kv_heads, d, 5, 300, dtype, seed=heads + d)
    out = k.decode_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), slots.cuda(), positions.cuda())
    assert_close_to_reference(out, reference_attention(q, k_cache, v_cache, slots, positions), v_cache, dtype)


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 33, 128])
def test_decode_attention_any_split_count(k, splits):
    q, k_cache, v_cache, slots, positions = attention_case(*SHAPE_2B4T, 8, 1024, torch.bfloat16, seed=splits)
    out = k.decode_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), slots.cuda(), positions.cuda(), splits=splits)
    assert_close_to_reference(out, reference_attention(q, k_cache, v_cache, slots, positions), v_cache, torch.bfloat16)


def test_decode_attention_peaked_softmax_and_invalid_rows(k):
    """Scores of size ~40 (a few keys dominate), and rows whose position lies outside the cache get
    zeros. fp32 score errors grow with |q||k| (~1e-6 here) and the output inherits them: atol 1e-4."""
    q, k_cache, v_cache, slots, positions = attention_case(*SHAPE_2B4T, 6, 512, torch.float32, seed=7)
    q = q * 10
    out = k.decode_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), slots.cuda(), positions.cuda())
    ref = reference_attention(q, k_cache, v_cache, slots, positions)
    assert_close_to_reference(out, ref, v_cache, torch.float32, atol=1e-4)
    bad = torch.tensor([-1, 512, 3, 0, 1000, 5])
    out = k.decode_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), slots.cuda(), bad.cuda()).cpu()
    assert (out[[0, 1, 4]] == 0).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,d,batch,max_len", [SHAPE_2B4T + (1, 4096), SHAPE_2B4T + (64, 512),
                                                            (6, 2, 16, 3, 40), (6, 3, 24, 4, 300)])
def test_fused_attention_norm_quant_is_bit_exact(k, dtype, heads, kv_heads, d, batch, max_len):
    """(x_q, scale) == reference rmsnorm + quant of the unfused kernel's own (dtype) output."""
    q, k_cache, v_cache, slots, positions = attention_case(heads, kv_heads, d, batch, max_len, dtype, seed=d + batch)
    gen = torch.Generator().manual_seed(batch)
    weight = (0.5 + torch.rand(heads * d, generator=gen)).to(dtype).cuda()
    args = (q.cuda(), k_cache.cuda(), v_cache.cuda(), slots.cuda(), positions.cuda())
    out = k.decode_attention(*args)
    x_q, scale = k.decode_attention(*args, norm_weight=weight, eps=1e-5)
    q_ref, s_ref = quantize_activations(rmsnorm(out, weight, 1e-5))
    assert torch.equal(x_q, q_ref) and torch.equal(scale, s_ref.view(-1))
    assert (padded_rows(x_q, k)[:, heads * d:] == 0).all()
    assert_close_to_reference(out, reference_attention(q, k_cache, v_cache, slots, positions), v_cache, dtype)


# ---- activation + sub-norm + quantization --------------------------------------------------------------

def gate_up_rows(m, f, gen, dtype):
    x = torch.randn(m, 2 * f, generator=gen) * torch.logspace(-3, 3, m)[:, None]
    x[0] = 0.0                          # all zero: the eps floors
    x[1, :f] = -torch.rand(f, generator=gen)  # gate <= 0 everywhere: relu^2 gives a zero row
    x[2, f // 2] = 3e4                  # one outlier gate (relu^2 * up ~ 1e9)
    x[3, :] = 1e12                      # squares overflow fp32 (p ~ 1e36, sum of squares -> inf)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f", [7, 64, 200, 6912, 6913])
def test_act_norm_quant_relu2_is_bit_exact(k, dtype, f):
    gen = torch.Generator().manual_seed(f)
    gate_up = gate_up_rows(9, f, gen, dtype).cuda()
    weight = (0.5 + torch.rand(f, generator=gen)).to(dtype).cuda()
    x_q, scale = k.act_norm_quant(gate_up, weight, 1e-5, "relu2")
    gate, up = gate_up.float().split([f, f], dim=-1)
    q_ref, s_ref = quantize_activations(rmsnorm(torch.relu(gate).square() * up, weight, 1e-5))
    assert torch.equal(x_q, q_ref) and torch.equal(scale, s_ref.view(-1))
    assert (padded_rows(x_q, k)[:, f:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f", [7, 2000, 8640])
def test_act_norm_quant_silu_within_rounding(k, dtype, f):
    """silu uses the GPU's expf (2 ulp): x_q may differ by 1 where x * scale sits at a rounding tie."""
    gen = torch.Generator().manual_seed(f + 1)
    gate_up = gate_up_rows(9, f, gen, dtype)[[0, 1, 2, 4, 5, 6, 7, 8]].cuda()  # not the overflow row
    weight = (0.5 + torch.rand(f, generator=gen)).to(dtype).cuda()
    x_q, scale = k.act_norm_quant(gate_up, weight, 1e-5, "silu")
    gate, up = gate_up.float().split([f, f], dim=-1)
    q_ref, s_ref = quantize_activations(rmsnorm(F.silu(gate) * up, weight, 1e-5))
    dq = (x_q.int() - q_ref.int()).abs()
    assert dq.max() <= 1 and (dq > 0).sum() <= max(2, dq.numel() // 100)
    assert ((scale - s_ref.view(-1)).abs() <= 1e-6 * s_ref.view(-1)).all()


def test_decode_kernels_refuse_bad_arguments(k):
    cache = torch.zeros(2, 2, 16, 8, dtype=torch.bfloat16, device="cuda")
    cos, sin = (t.cuda() for t in rope_tables(8, 10000.0, 16))
    one = torch.zeros(1, dtype=torch.long, device="cuda")
    qkv = torch.zeros(1, (4 + 4) * 8, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="features"):
        k.rope_kv_write(qkv[:, :-8], one, one, cos, sin, cache, cache.clone(), 4)
    with pytest.raises(ValueError, match="int64"):
        k.rope_kv_write(qkv, one.int(), one, cos, sin, cache, cache.clone(), 4)
    with pytest.raises(ValueError, match="k_cache"):
        k.rope_kv_write(qkv, one, one, cos, sin, cache.float(), cache.clone(), 4)
    with pytest.raises(ValueError, match="rope table"):
        k.rope_kv_write(qkv, one, one, cos[:, :2], sin, cache, cache.clone(), 4)
    q = torch.zeros(1, 4, 8, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="does not fit"):
        k.decode_attention(q[:, :3], cache, cache, one, one)
    with pytest.raises(ValueError, match="slots"):
        k.decode_attention(q, cache, cache, torch.zeros(2, dtype=torch.long, device="cuda"), one)
    with pytest.raises(ValueError, match="norm_weight"):
        k.decode_attention(q, cache, cache, one, one, norm_weight=torch.ones(31, dtype=torch.bfloat16, device="cuda"))
    gate_up = torch.zeros(2, 14, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="activation"):
        k.act_norm_quant(gate_up, torch.ones(7, dtype=torch.bfloat16, device="cuda"), 1e-5, "gelu")
    with pytest.raises(ValueError, match="weight"):
        k.act_norm_quant(gate_up, torch.ones(7, device="cuda"), 1e-5, "relu2")


# ---- the model's decode step ----------------------------------------------------------------------------

def prefilled(llm, texts, slots, max_len):
    cache = llm.model.new_cache(max(slots) + 1, max_len)
    prompts = [llm.encode(t) for t in texts]
    for slot, ids in zip(slots, prompts):
        llm.model.forward(torch.tensor([ids], device="cuda"), torch.arange(len(ids), device="cuda")[None], cache,
                          torch.tensor([slot], device="cuda"))
    return cache, prompts


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_step_replays_in_a_cuda_graph(tiny_checkpoint, dtype):
    """A captured decode step (B rows, T = 1) replayed with new ids and positions in its static inputs
    gives the eager step's logits bit for bit: no host sync, no launch depending on device values."""
    from engine import LLM

    llm = LLM(tiny_checkpoint, device="cuda", dtype=dtype)
    model = llm.model
    slot_list = [2, 0, 3]
    cache, prompts = prefilled(llm, ["Hello there", "The quick brown fox jumps over", "A"], slot_list, 128)
    slots = torch.tensor(slot_list, device="cuda")
    ids = torch.tensor([[p[-1]] for p in prompts], device="cuda")
    positions = torch.tensor([[len(p)] for p in prompts], device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        model.forward(ids, positions, cache, slots)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model.forward(ids, positions, cache, slots)

    gen = torch.Generator().manual_seed(0)
    seen = []
    for new_positions in ([[20], [9], [3]], [[21], [64], [127]], [[100], [65], [4]]):  # chunk counts change
        new_ids = torch.randint(0, model.cfg.vocab_size, (3, 1), generator=gen).cuda()
        ids.copy_(new_ids)
        positions.copy_(torch.tensor(new_positions))
        graph.replay()
        replayed = logits.clone()
        eager = model.forward(new_ids, torch.tensor(new_positions, device="cuda"), cache, slots)  # same cache writes
        assert torch.isfinite(replayed).all() and torch.equal(replayed, eager)
        seen.append(replayed)
    assert not torch.equal(seen[0], seen[1])  # the replays really ran on the new inputs


def test_decode_step_tracks_the_reference_attention(tiny_checkpoint):
    """fp32 decode steps through the kernels stay within float rounding of the model with every
    reference op (TorchOps on the same GPU: materialized scores, torch softmax)."""
    from engine import LLM
    from engine.checkpoint import load_checkpoint
    from engine.model import BitNetModel
    from engine.ops import TorchOps

    llm = LLM(tiny_checkpoint, device="cuda", dtype=torch.float32)
    cfg, tensors = load_checkpoint(tiny_checkpoint)
    reference = BitNetModel(cfg, tensors, TorchOps(torch.float32, "cuda"))
    texts, slot_list = ["Hello there, how are you", "Grüße"], [1, 0]
    slots = torch.tensor(slot_list, device="cuda")
    cache, prompts = prefilled(llm, texts, slot_list, 64)
    ref_cache = reference.new_cache(len(slot_list), 64)
    for slot, ids in zip(slot_list, prompts):  # the reference's own prompt pass
        reference.forward(torch.tensor([ids], device="cuda"), torch.arange(len(ids), device="cuda")[None], ref_cache,
                          torch.tensor([slot], device="cuda"))
    ids = torch.tensor([[p[-1]] for p in prompts], device="cuda")
    positions = torch.tensor([[len(p)] for p in prompts], device="cuda")
    got = llm.model.forward(ids, positions, cache, slots)
    expected = reference.forward(ids, positions, ref_cache, slots)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
