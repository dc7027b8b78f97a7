"""BitNet b1.58 numerics: the one definition of what "correct" means.

Every backend (the CPU reference ops here, the CUDA kernels later) must reproduce these functions:
activations are quantized per token to int8 with absmax scaling, weights are ternary with one
multiplicative scale per tensor, and a BitLinear output is the exact integer dot product
dequantized as ``acc * w_scale / x_scale`` in fp32.
"""

import torch

ACT_EPS = 1e-5  # floor on max|x| (activations) and mean|W| (weights)
ACT_QMAX = 127.0


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 quantization of x [..., K].

    Returns (x_q int8 [..., K], scale fp32 [..., 1]) with x ~= x_q / scale. The scale is
    127 * (1 / absmax), two IEEE roundings: that is what `127 / t` means in torch (and so in
    transformers), and differs from one correctly rounded division for about a quarter of inputs.
    torch.round rounds half to even, as the kernels' rint does.
    """
    x = x.float()
    scale = ACT_QMAX * torch.reciprocal(x.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS))
    x_q = torch.round(x * scale).clamp(-128, 127).to(torch.int8)
    return x_q, scale


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32: x * (1 / sqrt(mean(x^2) + eps)) * weight.

    The sum of squares is taken in fp64 (exact squares, so any summation order rounds to the same
    fp32 mean) and sqrt and division are IEEE-rounded: a parallel GPU reduction reproduces it exactly.
    """
    x = x.float()
    mean_sq = (x.double().square().sum(dim=-1, keepdim=True) / x.shape[-1]).float()
    # sqrt taken in fp64 then rounded: the correctly rounded fp32 sqrt, which some CPUs' vectorized
    # fp32 sqrt is not (1 ulp off for ~15% of inputs); the kernels use the IEEE __fsqrt_rn
    root = torch.sqrt((mean_sq + eps).double()).float()
    return x * torch.reciprocal(root) * weight.float()


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Latent full-precision weight -> (ternary int8 codes in {-1, 0, 1}, multiplicative scale)."""
    w = weight.float()
    scale = w.abs().mean().clamp(min=ACT_EPS)
    codes = torch.round(w / scale).clamp(-1, 1).to(torch.int8)
    return codes, float(scale)


# Largest K for which an fp32 matmul of int8 x ternary values is exact: every partial sum is an
# integer of magnitude <= 128 * K, and fp32 represents all integers up to 2**24 exactly.
EXACT_FP32_MAX_K = (1 << 24) // 128


def int_dot(x_q: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 dot products x_q [M, K] (int8) @ w_t [N, K]^T (ternary int8) -> [M, N].

    On the CPU, torch's int8 GEMM accumulates in int32. Elsewhere (the reference ops on another
    device), a floating-point GEMM on integer-valued operands, exact because no partial sum can
    leave the float's integer range (fp32 up to K = 131072, fp64 beyond).
    """
    if x_q.device.type == "cpu":
        return torch._int_mm(x_q.contiguous(), w_t.t())
    ftype = torch.float32 if x_q.shape[-1] <= EXACT_FP32_MAX_K else torch.float64
    return (x_q.to(ftype) @ w_t.to(ftype).t()).to(torch.int32)


def dequantize(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The BitLinear epilogue in fp32: acc [M, N] int32, x_scale [M, 1], w_scale [N] -> fp32 [M, N]."""
    return acc.float() * w_scale.float() / x_scale.float()


# ---- canonical 2-bit packing (the engine's checkpoint format) ------------------------------------
# Along the input dimension, four consecutive weights per byte, lowest bits first:
#   byte[n, j] = sum_i (W[n, 4j + i] + 1) << 2i          (codes 0, 1, 2 for -1, 0, +1; 3 unused)
# K is padded to a multiple of 4 with zero weights (code 1). Row-major and K-contiguous, so a row
# of the file is a row of the matrix; kernels repack this into their own tile layout at load time.


def pack_ternary(w_t: torch.Tensor) -> torch.Tensor:
    """Ternary int8 [N, K] -> canonical packed uint8 [N, ceil(K / 4)]."""
    n, k = w_t.shape
    pad = (-k) % 4
    codes = (w_t.to(torch.int16) + 1).to(torch.uint8)
    if pad:
        codes = torch.cat([codes, torch.ones(n, pad, dtype=torch.uint8, device=codes.device)], dim=1)
    codes = codes.view(n, -1, 4)
    return codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)


def unpack_codes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Canonical packed uint8 [N, ceil(K / 4)] -> raw 2-bit codes uint8 [N, K] (0..3)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    return codes.reshape(packed.shape[0], -1)[:, :k]


def unpack_ternary(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Canonical packed uint8 [N, ceil(K / 4)] -> ternary int8 [N, K]."""
    return unpack_codes(packed, k).to(torch.int8) - 1


# ---- the optional int8 LM head ------------------------------------------------------------------
HEAD_QMAX = 127  # symmetric: codes in [-127, 127]


def quantize_rows_int8(table: torch.Tensor, chunk_rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization of an LM head table [V, K] (engine.ops.Int8Head).

    In fp32: scale[v] = max_k |table[v, k]| / 127, w_q[v, k] = clamp(round_half_even(table[v, k] / scale[v]),
    -127, 127); so |w_q * scale - table| <= scale / 2 (up to the rounding of the division) and each
    row's largest entry maps to +-127. A row with nothing to scale (all zeros, or so tiny that the
    scale underflows to 0) gets scale 1 and zero codes: never inf or NaN. Returns (w_q int8 [V, K],
    scale fp32 [V]) on the table's device. Pure torch (any device), in chunks of rows so the fp32
    temporaries stay small; refuses a table holding inf or NaN.
    """
    if table.dim() != 2 or not table.is_floating_point() or table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(f"the head table must be a non-empty 2-D floating-point tensor, got {table.dtype} "
                         f"{list(table.shape)}")
    v, k = table.shape
    w_q = torch.empty(v, k, dtype=torch.int8, device=table.device)
    scale = torch.empty(v, dtype=torch.float32, device=table.device)
    finite = torch.ones((), dtype=torch.bool, device=table.device)
    for start in range(0, v, chunk_rows):
        rows = table[start:start + chunk_rows].float()
        finite &= torch.isfinite(rows).all()
        s = rows.abs().amax(dim=1) / HEAD_QMAX
        s = torch.where(s > 0, s, torch.ones_like(s))
        w_q[start:start + chunk_rows] = torch.round(rows / s[:, None]).clamp_(-HEAD_QMAX, HEAD_QMAX).to(torch.int8)
        scale[start:start + chunk_rows] = s
    if not bool(finite):
        raise ValueError("the head table holds inf or NaN values; the checkpoint is corrupt")
    return w_q, scale
