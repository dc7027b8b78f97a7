"""The optional int8 LM head: per-row quantization (engine.quant.quantize_rows_int8), the reference
head (TorchOps.lm_head with an Int8Head), LLM(head="int8"), generate.py --head, and on a GPU the
kernel of csrc/lm_head.cu.

Tolerances. A logit is scale[v] * sum_k x[m, k] * w_q[v, k]: products of exact values (x bf16/fp32,
w_q int8), summed in fp32, then one fp32 product with the scale. If no term passes through more than
d fp32 roundings on its way into the sum, |computed - exact| <= d * u * sum_k |x_k * w_k| (to first
order; u = 2^-24), and the scale adds u * |result|. So against float64:
  * the CPU reference (a BLAS fp32 matmul, order unknown): d <= K;
  * the kernel: each lane runs an fma chain over its own k positions, 16 * ceil(K / 512) long at
    most, then the warp adds 32 partials in 5 butterfly levels: d = 16 * ceil(K / 512) + 5.
The tests allow (d + 2) * u * (|x| . |w_q|) * scale. For the kernel at K = 2560 that is 87 * 2^-24 of
the sum of |terms|: a term lost, doubled, or taken from the wrong row or k (about 1/K of that sum)
exceeds it by a factor of ~75, a wrong scale or row by far more.

The same kernel streams the bf16 head (the checkpoint's own table, no scale) for decode batches:
8 weights per 16-byte lane load, so d = 8 * ceil(K / 256) + 5; bf16 products are exact in fp32.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.checkpoint import load_checkpoint
from engine.ops import HEAD_CHUNK_ROWS, Int8Head, TorchOps
from engine.quant import quantize_rows_int8
from engine.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
U = 2.0 ** -24
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_cli(*args) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                       timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    return p.returncode, p.stdout.decode("utf-8"), p.stderr.decode("utf-8")


def exact_logits(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, rows: int = 16384):
    """float64 logits and float64 sum_k |x_k w_k| * scale (for the bounds), on the CPU, in row chunks."""
    x = x.cpu().double()
    exact = torch.empty(x.shape[0], w_q.shape[0], dtype=torch.float64)
    magnitude = torch.empty_like(exact)
    for start in range(0, w_q.shape[0], rows):
        w = w_q[start:start + rows].cpu().double()
        s = scale[start:start + rows].cpu().double()
        exact[:, start:start + w.shape[0]] = (x @ w.t()) * s
        magnitude[:, start:start + w.shape[0]] = (x.abs() @ w.abs().t()) * s
    return exact, magnitude


def random_head(v: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows over the whole code range, with rows of extremes (+127, -127, alternating), and scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (v, k), dtype=torch.int8, generator=g)
    w[0] = 127
    if v > 1:
        w[1] = -127
    if v > 2:
        w[2, 0::2], w[2, 1::2] = 127, -127
    scale = torch.rand(v, generator=g) * 0.05 + 1e-3
    return w, scale


# ---- quantization --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(300, 96, generator=g) * torch.logspace(-4, 3, 300)[:, None]  # rows of any magnitude
    table[6] = 0
    table[6, 3] = -7.5
    table = table.to(dtype)
    w_q, scale = quantize_rows_int8(table)
    assert w_q.dtype == torch.int8 and w_q.shape == table.shape
    assert scale.dtype == torch.float32 and scale.shape == (300,)
    assert int(w_q.abs().max()) <= 127 and (w_q != -128).all()
    # the scale is absmax / 127 in fp32, each row's largest entry maps to +-127
    assert torch.equal(scale, table.float().abs().amax(dim=1) / 127)
    assert (w_q.abs().amax(dim=1) == 127).all()
    assert w_q[6, 3] == -127 and (w_q[6, :3] == 0).all() and (w_q[6, 4:] == 0).all()
    # half a step per entry (the fp32 division can add 127 * 2^-24 of a step)
    w, s = table.double(), scale.double()[:, None]
    assert ((w_q.double() * s - w).abs() <= s * (0.5 + 1e-5)).all()
    # chunking and the table's dtype change nothing
    w_q2, scale2 = quantize_rows_int8(table.float(), chunk_rows=7)
    assert torch.equal(w_q2, w_q) and torch.equal(scale2, scale)


def test_zero_rows_and_bad_tables():
    table = torch.zeros(5, 32)
    table[1] = -0.0
    table[2, 0] = 1e-45        # so small that absmax / 127 underflows to 0
    table[3] = 1.0
    table[4, 7] = -3.0
    w_q, scale = quantize_rows_int8(table)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(scale[:3], torch.ones(3)) and (w_q[:3] == 0).all()
    assert (w_q[3] == 127).all() and w_q[4, 7] == -127 and int(w_q[4].abs().sum()) == 127
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = table.clone()
        t[3, 5] = bad
        with pytest.raises(ValueError, match="inf or NaN"):
            quantize_rows_int8(t)
    for shape_or_dtype in (torch.zeros(8), torch.zeros(0, 4), torch.zeros(4, 0), torch.zeros(4, 4, dtype=torch.int32)):
        with pytest.raises(ValueError, match="head table"):
            quantize_rows_int8(shape_or_dtype)


# ---- the reference head ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_int8_head_against_float64(dtype):
    v, k = 2 * HEAD_CHUNK_ROWS + 1000, 64   # several chunks of the reference's row loop
    w_q, scale = random_head(v, k, 1)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(5, k, generator=g) * 100).to(dtype)
    x[0] = 3e4                                # large activations against rows of +-127
    x[1, ::3] = -3e4
    got = TorchOps(dtype).lm_head(x, Int8Head(w_q, scale))
    assert got.dtype == torch.float32 and got.shape == (5, v)
    exact, magnitude = exact_logits(x, w_q, scale)
    assert ((got.double() - exact).abs() <= (k + 2) * U * magnitude).all()


def test_int8_head_is_within_its_quantization_error_of_the_bf16_head():
    g = torch.Generator().manual_seed(3)
    table = (torch.randn(500, 128, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(4, 128, generator=g)
    ops = TorchOps(torch.float32)
    head = ops.int8_head(table)
    diff = (ops.lm_head(x, head).double() - ops.lm_head(x, table).double()).abs()
    # each weight moves by at most half a step: |delta| <= sum_k |x_k| * scale / 2, plus both fp32 sums
    step = x.double().abs().sum(dim=1, keepdim=True) * head.scale.double() * (0.5 + 1e-5)
    rounding = (128 + 2) * U * (x.double().abs() @ table.double().abs().t()) * 2
    assert (diff <= step + rounding).all()
    assert diff.max() > 0   # it is not the bf16 head


# ---- LLM and generate.py -------------------------------------------------------------------------

def test_llm_int8_head_uses_the_reference_head_and_generates(tiny_checkpoint, monkeypatch):
    ref, llm = LLM(tiny_checkpoint), LLM(tiny_checkpoint, head="int8")
    assert ref.head == "bf16" and llm.head == "int8"
    assert isinstance(llm.model.head, Int8Head) and not isinstance(ref.model.head, Int8Head)
    assert torch.equal(llm.model.embed_tokens, ref.model.embed_tokens)   # token lookups keep the table
    assert torch.equal(llm.model.head.w_q, quantize_rows_int8(ref.model.embed_tokens)[0])

    hidden = []   # the final hidden states the bf16 model hands its head
    head = ref.ops.lm_head
    monkeypatch.setattr(ref.ops, "lm_head", lambda x, table: (hidden.append(x.clone()), head(x, table))[1])
    ids = ref.encode("The quick brown fox jumps")
    bf16_logits = ref.logits(ids)
    logits = llm.logits(ids)
    assert torch.equal(logits, TorchOps(torch.float32).lm_head(hidden[0], llm.model.head))
    spread = bf16_logits.max(dim=1).values - bf16_logits.min(dim=1).values
    assert ((logits - bf16_logits).abs().amax(dim=1) < 0.05 * spread).all()

    out = llm.generate("Hello", SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    sampled = llm.generate(["Hi", "The quick"], SamplingParams(temperature=1.0, seed=3, max_new_tokens=6))
    assert all(c.token_ids for c in sampled)


def test_from_tensors_takes_the_head(tiny_checkpoint):
    config, tensors = load_checkpoint(tiny_checkpoint)
    tok = load_tokenizer(tiny_checkpoint)
    assert isinstance(LLM.from_tensors(config, tensors, tok, head="int8").model.head, Int8Head)
    assert not isinstance(LLM.from_tensors(config, tensors, tok).model.head, Int8Head)


@pytest.mark.parametrize("bad", ["fp8", "INT8", "", None, 8])
def test_bad_head_values_are_refused(tiny_checkpoint, bad):
    with pytest.raises(ValueError, match="'bf16'.*'int8'"):
        LLM(tiny_checkpoint, head=bad)
    config, tensors = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match="'bf16'.*'int8'"):
        LLM.from_tensors(config, tensors, load_tokenizer(tiny_checkpoint), head=bad)


def test_generate_py_head_int8(tiny_checkpoint):
    rc, out, err = run_cli(tiny_checkpoint, "--prompt", "Hello", "--head", "int8", "--greedy", "--max-new-tokens", "8")
    assert rc == 0, err
    llm = LLM(tiny_checkpoint, head="int8")
    expected = llm.chat([{"role": "user", "content": "Hello"}],
                        SamplingParams(temperature=0.0, top_p=0.95, max_new_tokens=8)).text
    assert out == expected + "\n" and "prompt tokens" in err

    rc, out, err = run_cli(tiny_checkpoint, "--prompt", "Hello", "--head", "fp8")
    assert rc == 2 and "--head" in err and "Traceback" not in err
    rc, out, err = run_cli("--help")
    assert rc == 0 and "--head {bf16,int8}" in out


def test_generate_py_serve_passes_the_head(tiny_checkpoint, monkeypatch):
    import engine.server
    import generate

    served = {}

    def fake_serve(llm, host, port, **kw):
        served["llm"] = llm
        return 0

    monkeypatch.setattr(engine.server, "serve", fake_serve)
    assert generate.main([str(tiny_checkpoint), "--serve", "--port", "0", "--head", "int8"]) == 0
    assert isinstance(served["llm"].model.head, Int8Head)
    assert generate.main([str(tiny_checkpoint), "--serve", "--port", "0"]) == 0
    assert not isinstance(served["llm"].model.head, Int8Head)


def test_kernel_wrapper_refuses_bad_arguments_before_the_gpu():
    from engine import kernels

    w, s = random_head(10, 32, 0)
    with pytest.raises(ValueError, match="CUDA"):
        kernels.lm_head_int8(torch.zeros(1, 32), w, s)
    with pytest.raises(ValueError, match="CUDA"):
        kernels.lm_head_bf16(torch.zeros(1, 32), w.to(torch.bfloat16))


# ---- the CUDA kernel ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def k():
    from engine import kernels

    kernels.load()
    return kernels


def kernel_bound(magnitude: torch.Tensor, k_: int) -> torch.Tensor:
    return (16 * math.ceil(k_ / 512) + 5 + 2) * U * magnitude


SHAPES = [(1000, 2560), (1000, 128), (999, 48), (1001, 40), (37, 2560), (300, 3200), (64, 24576), (5, 7)]


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("v,kk", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 16, 64])
def test_kernel_matches_float64(k, dtype, v, kk, m):
    """Odd V, K not a multiple of 16 (byte loads), K past the tile's shared memory (3200, 24576),
    extremes +-127 and large x, output poisoned with NaN."""
    w, s = random_head(v, kk, v + kk)
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, kk, generator=g) * 1e3).to(dtype)
    x[0] = 3e4
    if m > 2:
        x[2, ::2] = -3e4
    wd, sd, xd = w.cuda(), s.cuda(), x.cuda()
    out = torch.full((m, v), float("nan"), device="cuda")
    got = k.lm_head_int8(xd, wd, sd, out=out)
    assert got.data_ptr() == out.data_ptr()
    exact, magnitude = exact_logits(x, w, s)
    err = (got.cpu().double() - exact).abs()
    assert not got.isnan().any()
    assert (err <= kernel_bound(magnitude, kk)).all(), float((err / magnitude.clamp(min=1e-30)).max())
    assert torch.equal(k.lm_head_int8(xd, wd, sd), got)                        # allocating: the same
    for i in sorted({0, m // 2, m - 1}):                                       # alone: bit-identical
        assert torch.equal(k.lm_head_int8(xd[i:i + 1], wd, sd)[0], got[i])


@cuda
@pytest.mark.parametrize("m", [1, 3])
def test_kernel_full_2b4t_vocabulary(k, m):
    v, kk = 128256, 2560
    w, s = random_head(v, kk, 7)
    x = (torch.randn(m, kk, generator=torch.Generator().manual_seed(8)) * 4).to(torch.bfloat16)
    got = k.lm_head_int8(x.cuda(), w.cuda(), s.cuda(), out=torch.full((m, v), float("nan"), device="cuda"))
    exact, magnitude = exact_logits(x, w, s)
    assert ((got.cpu().double() - exact).abs() <= kernel_bound(magnitude, kk)).all()


@cuda
def test_kernel_refuses_bad_arguments(k):
    w, s = random_head(10, 32, 0)
    w, s, x = w.cuda(), s.cuda(), torch.zeros(2, 32, device="cuda")
    bad = [dict(x=x.half()), dict(x=x[:, :16]), dict(w_q=w.to(torch.uint8)), dict(w_q=w.t().contiguous().t()),
           dict(scale=s[:9]), dict(scale=s.double()), dict(out=torch.empty(2, 9, device="cuda")),
           dict(out=torch.empty(2, 10, device="cuda", dtype=torch.bfloat16)),
           dict(x=torch.zeros(1, 24577, device="cuda"), w_q=torch.zeros(10, 24577, dtype=torch.int8, device="cuda"))]
    for case in bad:
        args = {"x": x, "w_q": w, "scale": s, **case}
        with pytest.raises(ValueError):
            k.lm_head_int8(**args)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_replays_in_a_cuda_graph(k, dtype):
    w, s = random_head(5000, 2560, 9)
    w, s = w.cuda(), s.cuda()
    x = torch.randn(4, 2560, device="cuda").to(dtype)
    out = torch.full((4, 5000), float("nan"), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm up outside the graph
        k.lm_head_int8(x, w, s, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k.lm_head_int8(x, w, s, out=out)
        allocated = k.lm_head_int8(x[:1], w, s)
    for seed in range(3):
        x.copy_(torch.randn(4, 2560, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected = k.lm_head_int8(x, w, s)
        assert torch.equal(out, expected) and torch.equal(allocated[0], expected[0])


@cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_gpu_int8_head_gives_the_reference_tokens(tiny_checkpoint, graphs):
    cpu = LLM(tiny_checkpoint, head="int8")
    gpu = LLM(tiny_checkpoint, device="cuda", dtype=torch.float32, graphs=graphs, head="int8")
    assert isinstance(gpu.model.head, Int8Head) and gpu.model.head.w_q.is_cuda
    assert torch.equal(gpu.model.head.w_q.cpu(), cpu.model.head.w_q)
    assert torch.equal(gpu.model.head.scale.cpu(), cpu.model.head.scale)
    params = SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True)
    prompts = ["Hello there", "The quick brown fox", "1 2 3", "Grüße aus Köln"]
    alone = [gpu.generate(p, params)[0].token_ids for p in prompts]
    for p, tokens in zip(prompts[:2], alone):
        assert tokens == cpu.generate(p, params)[0].token_ids
    # a batch runs the head with other m-tiles: each row's logits, hence its tokens, stay the same
    assert [c.token_ids for c in gpu.generate(prompts + prompts[:1], params)] == alone + alone[:1]
    ids = cpu.encode("The quick brown fox jumps")
    ref = cpu.logits(ids)   # GPU and CPU differ in attention's summation order (as for the bf16 head)
    assert (gpu.logits(ids).cpu() - ref).abs().max() < 0.05 * ref.abs().max()


# ---- the bf16 head through the same kernel -----------------------------------------------------------

def random_bf16_table(v: int, k: int, seed: int) -> torch.Tensor:
    """bf16 rows of mixed magnitudes, with rows of extremes (large, alternating sign, tiny)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, k, generator=g) * torch.exp2(torch.randint(-12, 4, (v, 1), generator=g).float())
    w = w.to(torch.bfloat16)
    w[0] = 6.0e4
    if v > 1:
        w[1, ::2], w[1, 1::2] = -6.0e4, 6.0e4
    if v > 2:
        w[2] = 1.0e-30
    return w


def bf16_kernel_bound(magnitude: torch.Tensor, k_: int) -> torch.Tensor:
    return (8 * math.ceil(k_ / 256) + 5 + 2) * U * magnitude


BF16_SHAPES = [(1000, 2560), (999, 48), (1001, 44), (37, 2560), (300, 3200), (64, 24576), (5, 7)]


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("v,kk", BF16_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
def test_bf16_kernel_matches_float64(k, dtype, v, kk, m):
    """Odd V, K not a multiple of 8 (element loads), K past the tile's shared memory, extreme rows,
    large x, output poisoned with NaN; each row alone gets the same bits as in the batch."""
    w = random_bf16_table(v, kk, v + kk)
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, kk, generator=g) * 1e2).to(dtype)
    x[0, :3] = 3e4
    wd, xd = w.cuda(), x.cuda()
    out = torch.full((m, v), float("nan"), device="cuda")
    got = k.lm_head_bf16(xd, wd, out=out)
    assert got.data_ptr() == out.data_ptr()
    exact, magnitude = exact_logits(x, w, torch.ones(v))
    err = (got.cpu().double() - exact).abs()
    assert not got.isnan().any()
    assert (err <= bf16_kernel_bound(magnitude, kk)).all(), float((err / magnitude.clamp(min=1e-30)).max())
    assert torch.equal(k.lm_head_bf16(xd, wd), got)                            # allocating: the same
    for i in sorted({0, m // 2, m - 1}):                                       # alone: bit-identical
        assert torch.equal(k.lm_head_bf16(xd[i:i + 1], wd)[0], got[i])


@cuda
def test_bf16_kernel_unaligned_table_takes_element_loads(k):
    """A table that does not start on a 16-byte boundary: the same numbers through element loads."""
    v, kk = 300, 2560
    w = random_bf16_table(v, kk, 3)
    storage = torch.empty(v * kk + 1, dtype=torch.bfloat16, device="cuda")
    shifted = storage[1:].view(v, kk)
    shifted.copy_(w)
    assert shifted.data_ptr() % 16 != 0
    x = torch.randn(3, kk, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    got = k.lm_head_bf16(x.cuda(), shifted)
    assert torch.equal(got, k.lm_head_bf16(x.cuda(), w.cuda()))
    exact, magnitude = exact_logits(x, w, torch.ones(v))
    assert ((got.cpu().double() - exact).abs() <= bf16_kernel_bound(magnitude, kk)).all()


@cuda
def test_bf16_kernel_full_2b4t_vocabulary_and_refusals(k):
    v, kk = 128256, 2560
    w = (torch.randn(v, kk, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    x = (torch.randn(1, kk, generator=torch.Generator().manual_seed(6)) * 4).to(torch.bfloat16)
    got = k.lm_head_bf16(x.cuda(), w.cuda(), out=torch.full((1, v), float("nan"), device="cuda"))
    exact, magnitude = exact_logits(x, w, torch.ones(v))
    assert ((got.cpu().double() - exact).abs() <= bf16_kernel_bound(magnitude, kk)).all()
    small, xs = w[:10, :32].cuda(), torch.zeros(2, 32, device="cuda")
    for bad in [dict(x=xs.half()), dict(x=xs[:, :16]), dict(table=small.float()), dict(table=small.t().contiguous().t()),
                dict(out=torch.empty(2, 9, device="cuda"))]:
        with pytest.raises(ValueError):
            k.lm_head_bf16(**{"x": xs, "table": small, **bad})


@cuda
def test_cuda_ops_bf16_head_uses_the_kernel_up_to_its_rows(monkeypatch):
    """CudaOps.lm_head: the kernel for up to LM_HEAD_BF16_MAX_ROWS rows of a bf16 table, cuBLAS above;
    both within the summation bound of the exact logits."""
    from engine import kernels
    from engine.cuda_ops import CudaOps

    ops = CudaOps(torch.bfloat16)
    table = random_bf16_table(5000, 2560, 11).cuda()
    calls = []
    real = kernels.lm_head_bf16
    monkeypatch.setattr(kernels, "lm_head_bf16", lambda *a, **kw: (calls.append(a[0].shape[0]), real(*a, **kw))[1])
    for m in (1, kernels.LM_HEAD_BF16_MAX_ROWS, kernels.LM_HEAD_BF16_MAX_ROWS + 1):
        x = torch.randn(m, 2560, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        got = ops.lm_head(x.cuda(), table)
        exact, magnitude = exact_logits(x, table.cpu(), torch.ones(table.shape[0]))
        assert ((got.cpu().double() - exact).abs() <= 2600 * U * magnitude).all()
    assert calls == [1, kernels.LM_HEAD_BF16_MAX_ROWS]
