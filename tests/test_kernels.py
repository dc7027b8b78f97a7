"""The CUDA kernels against the exact reference (engine.quant / engine.ops.TorchOps), bit for bit.

Skipped without a GPU; bench/gpu_check.sh runs them on the lent one. Inputs are fresh random
values plus the extremes (-128 and 127 everywhere), outputs are poisoned before each call.
"""

import itertools

import pytest
import torch

from engine.cuda_ops import CudaOps
from engine.ops import TorchOps
from engine.quant import int_dot, pack_ternary, quantize_activations, rmsnorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES_2B4T = [(3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912)]
SHAPES_ANCHORS = [(4800, 3200), (3200, 3200), (20480, 3200), (3200, 10240)]
SHAPES_ODD = [(1, 1), (17, 130), (33, 6913), (100, 4), (7, 255), (640, 2560), (2049, 129)]
POISON_INT = -0x5A5A5A5A


@pytest.fixture(scope="module")
def k():
    from engine import kernels

    kernels.load()
    return kernels


def ternary(n, kk, gen):
    w = torch.randint(-1, 2, (n, kk), dtype=torch.int8, generator=gen)
    w[0, :] = -1  # an all -1 row meets an all -128 activation row: the largest magnitude
    return w


def activations(m, kk, gen):
    x = torch.randint(-128, 128, (m, kk), dtype=torch.int8, generator=gen)
    x[0, :] = -128
    if m > 1:
        x[1, :] = 127
    return x


def gpu_gemm_int32(k, x, w, tiled=None, **config):
    n, kk = w.shape
    tiled = k.repack(pack_ternary(w).cuda(), n, kk) if tiled is None else tiled
    out = torch.full((x.shape[0], n), POISON_INT, dtype=torch.int32, device="cuda")
    k.gemm(x.cuda(), torch.ones(x.shape[0], device="cuda"), tiled, n, kk, [n], [1.0], out_dtype=torch.int32, out=out,
           **config)
    torch.cuda.synchronize()
    return out.cpu()


@pytest.mark.parametrize("n,kk", SHAPES_2B4T + SHAPES_ANCHORS + SHAPES_ODD)
def test_int32_dot_products_are_exact(k, n, kk):
    gen = torch.Generator().manual_seed(n * 7919 + kk)
    w = ternary(n, kk, gen)
    for m in (1, 2, 3, 4, 7, 8, 9, 16):
        x = activations(m, kk, gen)
        got = gpu_gemm_int32(k, x, w)
        assert torch.equal(got, int_dot(x, w)), f"M={m}"
    assert gpu_gemm_int32(k, activations(1, kk, gen), w)[0, 0] == 128 * kk


def test_every_m_up_to_16_and_beyond(k):
    gen = torch.Generator().manual_seed(1)
    w = ternary(300, 640, gen)
    for m in list(range(1, 17)) + [17, 31, 40]:
        x = activations(m, 640, gen)
        assert torch.equal(gpu_gemm_int32(k, x, w), int_dot(x, w)), f"M={m}"


@pytest.mark.parametrize("config", [(1, 1, 4), (2, 3, 2), (4, 8, 4), (4, 16, 2), (1, 16, 2), (2, 5, 4), (1, 4, 2)])
def test_every_launch_configuration_is_exact(k, config):
    gen = torch.Generator().manual_seed(2)
    n, kk = 1000, 2560
    w = ternary(n, kk, gen)
    tiled = k.repack(pack_ternary(w).cuda(), n, kk)
    for m in (1, 5, 12, 16, 40):
        x = activations(m, kk, gen)
        out = k.gemm(x.cuda(), torch.ones(m, device="cuda"), tiled, n, kk, [n], [1.0], out_dtype=torch.int32,
                     row_tiles_per_block=config[0], warps=config[1], unroll=config[2])
        assert torch.equal(out.cpu(), int_dot(x, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_parts,kk", [((2560, 640, 640), 2560), ((6912, 6912), 2560), ((2560,), 6912),
                                        ((48, 17, 5), 130), ((1, 2, 3, 4), 64)])
def test_dequantized_output_equals_reference_epilogue(k, dtype, n_parts, kk):
    """Segments keep their own scales; bf16/fp32 output = the reference epilogue rounded once."""
    gen = torch.Generator().manual_seed(sum(n_parts) + kk)
    ref_ops = TorchOps(dtype)
    parts = [(pack_ternary(ternary(n, kk, gen)), torch.tensor([0.5 + torch.rand(1, generator=gen).item()]))
             for n in n_parts]
    ref_w = ref_ops.prepare_linear(parts, kk)
    gpu_ops = CudaOps(dtype)
    gpu_w = gpu_ops.prepare_linear(parts, kk)
    n = sum(n_parts)
    for m, with_residual in itertools.product((1, 4, 16), (False, True)):
        x = torch.randn(m, kk, generator=gen) * 3
        x_q, x_s = quantize_activations(x)
        res = (torch.randn(m, n, generator=gen) * 10).to(dtype) if with_residual else None
        expected = ref_ops.bitlinear(x_q, x_s, ref_w, residual=res)
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        k.gemm(x_q.cuda(), x_s.cuda(), gpu_w.weight, n, kk, list(itertools.accumulate(n_parts)), gpu_w.scales,
               res.cuda() if res is not None else None, dtype, out=out)
        assert torch.equal(out.cpu().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           expected.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        via_ops = gpu_ops.bitlinear(x_q.cuda(), x_s.cuda(), gpu_w, residual=res.cuda() if res is not None else None)
        assert torch.equal(via_ops.cpu(), expected)


# ---- the large-M (prefill) kernel ----------------------------------------------------------------
LARGE_MS = (17, 63, 64, 65, 100, 128, 129, 512, 1000)
# K split over clusters of 2-4 blocks needs sm_90; elsewhere only unsplit launches are forced
SPLITS = (1, 2, 3, 4) if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 else (1,)
# (kernel, large_tile, large_splits) cycled over the token counts: every tile shape and split meets
# odd shapes and tails (k = 4 and 129: fewer chunks than blocks in a split, whose extra blocks add zeros)
LARGE_CONFIGS = [("large", 1, 1), ("large", 2, 2), ("large", 3, 3), ("auto", 0, 0), ("large", 1, 4),
                 ("large", 3, 2), ("large", 2, 4), ("large", 1, 3), ("large", 2, 1), ("large", 3, 4)]
LARGE_CONFIGS = [c for c in LARGE_CONFIGS if c[2] in SPLITS + (0,)]


@pytest.mark.parametrize("n,kk", list(itertools.product((1, 17, 100, 2049, 3840), (4, 129, 255, 2560, 6913))))
def test_large_m_kernel_int32_is_exact(k, n, kk):
    gen = torch.Generator().manual_seed(n * 7919 + kk + 1)
    w = ternary(n, kk, gen)
    tiled = k.repack(pack_ternary(w).cuda(), n, kk)
    for i, m in enumerate(LARGE_MS):
        kernel, tile, splits = LARGE_CONFIGS[(i + n + kk) % len(LARGE_CONFIGS)]
        x = activations(m, kk, gen)
        got = gpu_gemm_int32(k, x, w, tiled, kernel=kernel, large_tile=tile, large_splits=splits)
        assert torch.equal(got, int_dot(x, w)), f"M={m} kernel={kernel} tile={tile} splits={splits}"
        assert got[0, 0] == 128 * kk  # the all -1 row against the all -128 token: the largest magnitude


@pytest.mark.parametrize("n,kk", SHAPES_2B4T)
def test_large_m_kernel_int32_is_exact_on_2b4t_shapes(k, n, kk):
    gen = torch.Generator().manual_seed(n + kk)
    w = ternary(n, kk, gen)
    tiled = k.repack(pack_ternary(w).cuda(), n, kk)
    for m, tile, splits in ((512, 1, 1), (512, 2, 1), (512, 3, 1), (2048, 0, 0), (129, 1, 1), (512, 0, 0),
                            (512, 1, 2), (512, 2, 3), (1024, 1, 4), (129, 3, 4)):
        if splits not in SPLITS + (0,):
            continue
        x = activations(m, kk, gen)
        got = gpu_gemm_int32(k, x, w, tiled, kernel="large", large_tile=tile, large_splits=splits)
        assert torch.equal(got, int_dot(x, w)), f"M={m} tile={tile} splits={splits}"


@pytest.mark.parametrize("n,kk", [(2560, 2560), (300, 640), (33, 6913)])
def test_small_and_large_kernels_agree(k, n, kk):
    """Both kernels forced on the same inputs: the same int32 dot products and the same bf16 outputs."""
    gen = torch.Generator().manual_seed(n + 3 * kk)
    w = ternary(n, kk, gen)
    tiled = k.repack(pack_ternary(w).cuda(), n, kk)
    for m in (17, 64, 65, 100):
        x = activations(m, kk, gen)
        small = gpu_gemm_int32(k, x, w, tiled, kernel="small")
        for tile, splits in itertools.product((1, 2, 3), SPLITS):
            got = gpu_gemm_int32(k, x, w, tiled, kernel="large", large_tile=tile, large_splits=splits)
            assert torch.equal(got, small), f"M={m} tile={tile} splits={splits}"
        x_s = torch.rand(m, generator=gen).cuda() * 100 + 0.5
        bf16 = [k.gemm(x.cuda(), x_s, tiled, n, kk, [n], [0.75], kernel=kernel) for kernel in ("small", "large")]
        assert torch.equal(bf16[0].view(torch.int16), bf16[1].view(torch.int16)), f"M={m}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_parts,kk", [((2560, 640, 640), 2560), ((6912, 6912), 2560), ((2560,), 6912),
                                        ((48, 17, 5), 130), ((1, 2, 3, 4), 64)])
def test_large_m_dequantized_output_equals_reference_epilogue(k, dtype, n_parts, kk):
    """The large-M kernel's fused epilogue, bit for bit: segments with their own scales (extreme ones
    too: the epilogue's exact fast division must hand those, and zero dot products, to __fdiv_rn),
    an all-zero token (the eps floor: huge x_scale, zero dot products), with and without a residual."""
    gen = torch.Generator().manual_seed(sum(n_parts) + kk + 5)
    ref_ops = TorchOps(dtype)
    scales = [0.5 + torch.rand(1, generator=gen).item() for _ in n_parts]
    if len(n_parts) >= 3:
        scales[1], scales[2] = 3e-25, 7e20  # |acc * scale| outside the fast division's 2^-60 .. 2^60
    parts = [(pack_ternary(ternary(n, kk, gen)), torch.tensor([s])) for n, s in zip(n_parts, scales)]
    ref_w = ref_ops.prepare_linear(parts, kk)
    gpu_ops = CudaOps(dtype)
    gpu_w = gpu_ops.prepare_linear(parts, kk)
    n, ends = sum(n_parts), list(itertools.accumulate(n_parts))
    for i, (m, with_residual) in enumerate(itertools.product((65, 130, 300), (False, True))):
        x = torch.randn(m, kk, generator=gen) * 3
        x[m // 2] = 0.0
        x_q, x_s = quantize_activations(x)
        res = (torch.randn(m, n, generator=gen) * 10).to(dtype) if with_residual else None
        expected = ref_ops.bitlinear(x_q, x_s, ref_w, residual=res)
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        k.gemm(x_q.cuda(), x_s.cuda(), gpu_w.weight, n, kk, ends, gpu_w.scales,
               res.cuda() if res is not None else None, dtype, out=out, kernel="large", large_tile=1 + i % 3,
               large_splits=SPLITS[i % len(SPLITS)])
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert torch.equal(out.cpu().view(bits), expected.view(bits)), f"M={m} residual={with_residual}"
        via_ops = gpu_ops.bitlinear(x_q.cuda(), x_s.cuda(), gpu_w, residual=res.cuda() if res is not None else None)
        assert torch.equal(via_ops.cpu().view(bits), expected.view(bits))  # m > 64: the auto choice, large


def test_gemm_kernel_choice_is_validated(k):
    w = pack_ternary(torch.zeros(32, 64, dtype=torch.int8)).cuda()
    tiled = k.repack(w, 32, 64)
    x = torch.zeros(2, 64, dtype=torch.int8, device="cuda")
    with pytest.raises(ValueError, match="kernel must be"):
        k.gemm(x, torch.ones(2, device="cuda"), tiled, 32, 64, [32], [1.0], kernel="medium")
    with pytest.raises(ValueError, match="large_tile"):
        k.gemm(x, torch.ones(2, device="cuda"), tiled, 32, 64, [32], [1.0], kernel="large", large_tile=4)
    with pytest.raises(ValueError, match="large_splits"):
        k.gemm(x, torch.ones(2, device="cuda"), tiled, 32, 64, [32], [1.0], kernel="large", large_splits=5)
    with pytest.raises(ValueError, match="unroll"):
        k.gemm(x, torch.ones(2, device="cuda"), tiled, 32, 64, [32], [1.0], kernel="small", unroll=3)


def rows_for_quant(m, kk, gen, dtype):
    x = torch.randn(m, kk, generator=gen) * torch.logspace(-4, 4, m)[:, None]
    x[0] = 0.0                       # all zero: the eps floor
    if m > 2:
        x[1, kk // 2] = 3e4          # one outlier
        x[2] = 1.0                   # ties everywhere: 1 * 127 exactly
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kk", [1, 130, 2560, 6912, 6913])
def test_quantize_matches_reference(k, dtype, kk):
    gen = torch.Generator().manual_seed(kk)
    x = rows_for_quant(9, kk, gen, dtype)
    q_ref, s_ref = quantize_activations(x)
    out_q = torch.full((9, k.padded(kk)), 99, dtype=torch.int8, device="cuda")
    out_s = torch.full((9,), float("nan"), device="cuda")
    q, s = k.quantize(x.cuda(), out_q=out_q, out_scale=out_s)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref.view(-1))
    assert (out_q[:, kk:] == 0).all()  # the padding the GEMM relies on


@pytest.mark.parametrize("offset", [1, 8])
def test_quantize_into_unaligned_rows_matches_reference(k, offset):
    """The register path writes 8 int8 values per store; an out_q that does not start on a 16-byte
    boundary takes the strided kernel instead and must give the same bytes."""
    kk, m = 2560, 5
    gen = torch.Generator().manual_seed(offset)
    x = rows_for_quant(m, kk, gen, torch.bfloat16)
    w = (0.5 + torch.rand(kk, generator=gen)).to(torch.bfloat16)
    q_ref, s_ref = quantize_activations(rmsnorm(x, w, 1e-5))
    flat = torch.full((m * k.padded(kk) + offset,), 99, dtype=torch.int8, device="cuda")
    out_q = flat[offset:].view(m, k.padded(kk))
    q, s = k.quantize(x.cuda(), w.cuda(), 1e-5, out_q=out_q)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref.view(-1))
    assert (flat[:offset] == 99).all()  # nothing written before the rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kk", [64, 2560, 6912, 3200])
def test_rmsnorm_quantize_matches_reference(k, dtype, kk):
    gen = torch.Generator().manual_seed(kk + 1)
    x = rows_for_quant(16, kk, gen, dtype)
    w = (0.5 + torch.rand(kk, generator=gen)).to(dtype)
    q_ref, s_ref = quantize_activations(rmsnorm(x, w, 1e-5))
    q, s = k.quantize(x.cuda(), w.cuda(), 1e-5)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref.view(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kk", [256, 2560, 6912])
def test_rmsnorm_quantize_finds_the_max_among_tied_products(k, dtype, kk):
    """Every x * w of a row is the same number, made of different factors (105 / d times d / 64), and the
    factors round differently once multiplied by 1 / rms: the row's scale comes from the largest
    normalized value, which is not simply that of the element with the largest |x * w|."""
    gen = torch.Generator().manual_seed(kk + 3)
    divisors = torch.tensor([1.0, 3.0, 5.0, 7.0, 15.0, 21.0, 35.0, 105.0])
    quotients = torch.tensor([105.0, 35.0, 21.0, 15.0, 7.0, 5.0, 3.0, 1.0])  # 105 / divisors, exactly
    pick = torch.randint(0, len(divisors), (kk,), generator=gen)
    w = divisors[pick] / 64
    m = 24
    signs = torch.randint(0, 2, (m, kk), generator=gen) * 2.0 - 1.0
    x = torch.ldexp(quotients[pick] * signs, torch.randint(-12, 12, (m, 1), generator=gen))  # exact powers of 2
    halved = torch.rand(m, kk, generator=gen) < 0.5
    x[m // 2:] = torch.where(halved[m // 2:], x[m // 2:] / 2, x[m // 2:])  # ties among a random half only
    assert torch.equal(x.to(dtype).float(), x) and torch.equal(w.to(dtype).float(), w)  # the ties survive the cast
    x, w = x.to(dtype), w.to(dtype)
    q_ref, s_ref = quantize_activations(rmsnorm(x, w, 1e-5))
    q, s = k.quantize(x.cuda(), w.cuda(), 1e-5)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref.view(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kk", [64, 2560, 6913, 20000])  # 6913 and 20000: the strided fallback
def test_rmsnorm_matches_reference(k, dtype, kk):
    gen = torch.Generator().manual_seed(kk + 2)
    x = rows_for_quant(16, kk, gen, dtype)
    w = (0.5 + torch.rand(kk, generator=gen)).to(dtype)
    ref = rmsnorm(x, w, 1e-5).to(dtype)
    torch.empty(64 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)  # freed NaN bytes: the output's memory
    y = k.rmsnorm(x.cuda(), w.cuda(), 1e-5)
    assert y.dtype == dtype and y.shape == x.shape and torch.equal(y.cpu(), ref)


def test_repack_rejects_code_three(k):
    codes = pack_ternary(torch.zeros(16, 12, dtype=torch.int8))
    codes[3, 1] = 0xFF
    with pytest.raises(RuntimeError, match="code 3"):
        k.repack(codes.cuda(), 16, 12)


def test_impossible_shapes_are_refused(k):
    w = pack_ternary(torch.zeros(32, 64, dtype=torch.int8)).cuda()
    with pytest.raises(ValueError, match="cannot hold"):
        k.repack(w, 32, 128)
    tiled = k.repack(w, 32, 64)
    x = torch.zeros(2, 96, dtype=torch.int8, device="cuda")
    with pytest.raises(ValueError, match="features"):
        k.gemm(x, torch.ones(2, device="cuda"), tiled, 32, 64, [32], [1.0])
    with pytest.raises(ValueError, match="segments must end"):
        k.gemm(x[:, :64], torch.ones(2, device="cuda"), tiled, 32, 64, [16], [1.0])
    with pytest.raises(ValueError, match="does not match"):
        k.gemm(x[:, :64], torch.ones(2, device="cuda"), tiled, 48, 64, [48], [1.0])


class KernelFreeOps(CudaOps):
    """CudaOps with every bit-exact kernel swapped back to the reference implementation. Attention
    stays CudaOps.attention (the decode kernel, SDPA for prompts): it matches the reference only to
    fp32 rounding (tests/test_kernels_decode.py), so both models share it and everything around it
    (RoPE + cache write, sub-norms, quantization, activation, BitLinear) must agree bit for bit."""
    prepare_linear = TorchOps.prepare_linear
    quantize = TorchOps.quantize
    rmsnorm_quant = TorchOps.rmsnorm_quant
    bitlinear = TorchOps.bitlinear
    qkv_rope_cache = TorchOps.qkv_rope_cache
    attention_norm_quant = TorchOps.attention_norm_quant  # self.attention (shared), then the reference norm
    gate_up_act_norm_quant = TorchOps.gate_up_act_norm_quant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_with_kernels_equals_model_with_reference_ops(tiny_checkpoint, dtype):
    """The one model definition with the kernels plugged in gives bit-identical logits to the same
    model with the reference integer ops on the same GPU (prompt and decode steps)."""
    from engine import LLM, SamplingParams
    from engine.checkpoint import load_checkpoint
    from engine.model import BitNetModel

    llm = LLM(tiny_checkpoint, device="cuda", dtype=dtype)
    assert llm.ops.name == "cuda"
    cfg, tensors = load_checkpoint(tiny_checkpoint)
    reference = BitNetModel(cfg, tensors, KernelFreeOps(dtype, "cuda"))
    ids = llm.encode("Hello, how are you? Grüße!")
    n = len(ids)
    slots = torch.zeros(1, dtype=torch.long, device="cuda")
    caches = llm.model.new_cache(1, n + 1), reference.new_cache(1, n + 1)
    prompt = (torch.tensor([ids], device="cuda"), torch.arange(n, device="cuda")[None])
    step = (torch.tensor([[ids[-1]]], device="cuda"), torch.tensor([[n]], device="cuda"))
    for args, all_logits in ((prompt, True), (step, False)):
        got = llm.model.forward(*args, caches[0], slots, all_logits=all_logits)
        expected = reference.forward(*args, caches[1], slots, all_logits=all_logits)
        assert torch.isfinite(got).all() and torch.equal(got, expected)
    out = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))[0]
    assert len(out.token_ids) == 24


def test_gpu_model_tracks_the_cpu_reference(tiny_checkpoint):
    """fp32 on the GPU (SDPA attention, cuBLAS head) stays within float rounding of the CPU path."""
    from engine import LLM

    gpu, cpu = LLM(tiny_checkpoint, device="cuda", dtype=torch.float32), LLM(tiny_checkpoint)
    ids = cpu.encode("The quick brown fox")
    assert (gpu.logits(ids).cpu() - cpu.logits(ids)).abs().max() < 0.05 * cpu.logits(ids).abs().max()
