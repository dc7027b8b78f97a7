"""The reference numerics against independent int64 / float64 computations."""

import pytest
import torch

from engine.ops import TorchOps
from engine.quant import (EXACT_FP32_MAX_K, int_dot, pack_ternary, quantize_activations, ternarize,
                          unpack_ternary)


def test_activation_quant_matches_float64_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 513, generator=g) * torch.logspace(-3, 3, 37)[:, None]
    x[0] = 0.0                      # all-zero row: the eps floor keeps the scale finite
    x[1, 7] = 1e6                   # one huge outlier
    q, s = quantize_activations(x)
    assert q.dtype == torch.int8 and s.shape == (37, 1)
    s64 = 127.0 / x.double().abs().amax(-1, keepdim=True).clamp(min=1e-5)
    assert torch.allclose(s.double(), s64, rtol=1e-6)
    assert torch.equal(q[0], torch.zeros(513, dtype=torch.int8))
    # every row's max maps to +-127 and nothing leaves [-127, 127] with absmax scaling
    assert (q.abs().amax(-1)[1:] == 127).all()
    # rounding is to nearest; compare where the float64 value is not within fp32 noise of a tie
    v = x.double() * s.double()
    clear = ((v - v.floor() - 0.5).abs() > 1e-4)
    assert torch.equal(q.double()[clear], v.round()[clear])


def test_round_half_to_even():
    # 127 / 127 = 1 scale: x * s lands exactly on .5 values
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5]])
    q, _ = quantize_activations(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2]]


def test_ternarize_matches_float64_formula():
    w = torch.randn(65, 130, generator=torch.Generator().manual_seed(1)).bfloat16()
    codes, scale = ternarize(w)
    w64 = w.double()
    scale64 = w64.abs().mean()
    assert abs(scale - scale64.item()) / scale64.item() < 1e-6
    assert torch.equal(codes.double(), (w64 / scale64).round().clamp(-1, 1))
    assert set(codes.unique().tolist()) == {-1, 0, 1}


@pytest.mark.parametrize("k", [1, 3, 4, 5, 127, 2560, 6913])
def test_pack_roundtrip_odd_k(k):
    w = torch.randint(-1, 2, (11, k), dtype=torch.int8, generator=torch.Generator().manual_seed(k))
    packed = pack_ternary(w)
    assert packed.dtype == torch.uint8 and packed.shape == (11, (k + 3) // 4)
    assert torch.equal(unpack_ternary(packed, k), w)
    # the documented layout: weight 4j + i in bits 2i..2i+1 of byte j, code w + 1
    j, i = (k - 1) // 4, (k - 1) % 4
    assert torch.equal(((packed[:, j] >> (2 * i)) & 3).to(torch.int8) - 1, w[:, k - 1])


@pytest.mark.parametrize("m,n,k", [(1, 3840, 2560), (16, 2560, 6912), (5, 33, 131), (3, 7, EXACT_FP32_MAX_K + 4)])
def test_int_dot_is_exact(m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    x[0] = -128                               # extreme values everywhere in one row
    if m > 1:
        x[1] = 127
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
    w[0] = -1
    expected = x.long() @ w.long().t()
    got = int_dot(x, w)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), expected)
    assert expected[0, 0] == 128 * k          # the largest magnitude a row can reach


def test_bitlinear_epilogue_and_segments():
    """Fused q|k|v keeps each projection's scale; output = acc * w_scale / x_scale (+ residual)."""
    ops = TorchOps(torch.float32)
    g = torch.Generator().manual_seed(3)
    k, sizes, scales = 130, (48, 16, 16), (0.5, 2.0, 0.03125)
    ws = [torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g) for n in sizes]
    weight = ops.prepare_linear([(pack_ternary(w), torch.tensor([s])) for w, s in zip(ws, scales)], k)
    x = torch.randn(4, k, generator=g)
    x_q, x_s = quantize_activations(x)
    residual = torch.randn(4, sum(sizes), generator=g)
    y = ops.bitlinear(x_q, x_s, weight, residual=residual)
    expected = torch.cat([(x_q.double() @ w.double().t()) * s for w, s in zip(ws, scales)], dim=1)
    expected = expected / x_s.double() + residual.double()
    assert torch.allclose(y.double(), expected, rtol=1e-6, atol=1e-6)


def test_prepare_rejects_code_three():
    ops = TorchOps(torch.float32)
    packed = torch.full((2, 3), 0b11111111, dtype=torch.uint8)
    with pytest.raises(ValueError, match="code 3"):
        ops.prepare_linear([(packed, torch.tensor([1.0]))], 12)
