"""The ops the model is written in, and their reference implementation in plain PyTorch.

The model (engine.model) calls only the methods of an ops object. `TorchOps` is the exact
reference: integer dot products computed exactly, every rounding step spelled out. It runs on the
CPU (and on any torch device). Compiled backends subclass it and replace whichever methods they
implement faster, fused or not, as long as they compute the same numbers.

Precision contract (dtype = the activation dtype, float32 or bfloat16):
  * norm+quant reads x, normalizes and quantizes in fp32 with no intermediate rounding;
  * a BitLinear output is `acc * w_scale / x_scale` in fp32 (+ residual in fp32), rounded once to dtype;
  * RoPE, attention (scores, softmax, weighted sum) and the MLP activation run in fp32 on
    dtype-rounded inputs, results rounded to dtype;
  * logits are fp32: the bf16 table's or an Int8Head's (optional, `LLM(head="int8")`), products and
    sums in fp32 either way.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quant import dequantize, int_dot, quantize_activations, quantize_rows_int8, rmsnorm, unpack_codes


@dataclass
class TernaryWeight:
    """A BitLinear weight made of one or more projections fused along the output dim (q|k|v,
    gate|up). Each segment keeps its own scale."""
    weight: torch.Tensor             # backend-specific layout; reference: ternary int8 [N, K]
    segments: tuple[int, ...]        # output rows per fused projection
    scales: tuple[float, ...]        # each segment's fp32 scale
    in_features: int
    row_scale: torch.Tensor | None = None  # reference only: fp32 [N], each row's segment scale

    @property
    def out_features(self) -> int:
        return sum(self.segments)


@dataclass
class Int8Head:
    """The LM head as int8 rows with one fp32 scale per vocabulary entry (engine.quant.quantize_rows_int8),
    used in place of the bf16 table: logits[m, v] = scale[v] * sum_k x[m, k] * w_q[v, k]. Half the
    bytes of the bf16 table per decode step, at the cost of the rows' quantization error."""
    w_q: torch.Tensor       # int8 [V, H]
    scale: torch.Tensor     # fp32 [V]

    @property
    def shape(self) -> torch.Size:
        return self.w_q.shape


# rows of an Int8Head converted to fp32 at a time by the reference (bounds its temporary memory)
HEAD_CHUNK_ROWS = 16384


class TorchOps:
    name = "torch"

    def __init__(self, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.dtype = dtype
        self.device = torch.device(device)

    # ---- loading ----------------------------------------------------------------------------
    def prepare_linear(self, parts: list[tuple[torch.Tensor, torch.Tensor]], in_features: int) -> TernaryWeight:
        """parts: [(canonical packed codes uint8 [N_i, ceil(K/4)], scale fp32 [1]), ...] -> TernaryWeight."""
        rows, row_scales = [], []
        for codes, scale in parts:
            raw = unpack_codes(codes.to(self.device), in_features)
            if bool((raw == 3).any()):
                raise ValueError("packed weights hold the invalid 2-bit code 3; the checkpoint is corrupt")
            rows.append(raw.to(torch.int8) - 1)
            row_scales.append(scale.to(self.device, torch.float32).expand(raw.shape[0]))
        return TernaryWeight(torch.cat(rows), tuple(r.shape[0] for r in rows), tuple(float(s) for _, s in parts),
                             in_features, torch.cat(row_scales))

    # ---- primitives -------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_activations(x)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rmsnorm(x, weight, eps).to(self.dtype)

    def rmsnorm_quant(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_activations(rmsnorm(x, weight, eps))

    def bitlinear(self, x_q: torch.Tensor, x_scale: torch.Tensor, w: TernaryWeight,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
        """int8 [..., K] x ternary -> dtype [..., N]; optional residual [..., N] added in fp32."""
        lead = x_q.shape[:-1]
        acc = int_dot(x_q.reshape(-1, w.in_features), w.weight)
        y = dequantize(acc, x_scale.reshape(-1, 1), w.row_scale)
        if residual is not None:
            y = y + residual.reshape(y.shape).float()
        return y.to(self.dtype).reshape(*lead, -1)

    # ---- model blocks -----------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, table).to(self.dtype)

    def qkv_rope_cache(self, x_q, x_scale, w: TernaryWeight, cos, sin, positions, slots, k_cache, v_cache):
        """QKV projection, rotary embedding of q and k, and the write of k and v into the cache.

        x_q [B, T, H] int8; cos/sin: the fp32 tables [max_positions, head_dim/2] (rope_tables);
        positions [B, T]; slots [B]; k_cache / v_cache [slots, kv_heads, max_len, head_dim].
        Returns roped q [B, T, heads, head_dim].
        """
        b, t = x_q.shape[:2]
        kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
        cos, sin = cos[positions], sin[positions]
        q, k, v = self.bitlinear(x_q, x_scale, w).split(w.segments, dim=-1)
        q = apply_rope(q.reshape(b, t, -1, head_dim), cos, sin).to(self.dtype)
        k = apply_rope(k.reshape(b, t, kv_heads, head_dim), cos, sin).to(self.dtype)
        rows = slots[:, None].expand(b, t)
        k_cache[rows, :, positions] = k
        v_cache[rows, :, positions] = v.reshape(b, t, kv_heads, head_dim)
        return q

    def attention(self, q, positions, slots, k_cache, v_cache, span: int | None = None) -> torch.Tensor:
        """Causal GQA attention of q [B, T, heads, D] over each sequence's cache entries 0..position.

        span: max(positions) + 1 when the caller knows it (saves reading positions back).
        Returns [B, T, heads * D] in dtype. fp32 scores and softmax.
        """
        b, t, heads, d = q.shape
        kv_heads = k_cache.shape[1]
        span = span or int(positions.max()) + 1
        keys = k_cache[slots, :, :span].float()                     # [B, kvH, S, D]
        values = v_cache[slots, :, :span].float()
        qg = q.float().reshape(b, t, kv_heads, heads // kv_heads, d).permute(0, 2, 3, 1, 4)  # [B, kvH, G, T, D]
        scores = (qg @ keys.unsqueeze(2).transpose(-1, -2)) * d ** -0.5                  # [B, kvH, G, T, S]
        visible = torch.arange(span, device=q.device) <= positions[:, None, None, :, None]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out = probs @ values.unsqueeze(2)                                                 # [B, kvH, G, T, D]
        return out.permute(0, 3, 1, 2, 4).reshape(b, t, heads * d).to(self.dtype)

    def attention_norm_quant(self, q, positions, slots, k_cache, v_cache, sub_norm: torch.Tensor,
                             eps: float, span: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """attention(...), then the attention sub-norm and quantization: the o projection's input."""
        return self.rmsnorm_quant(self.attention(q, positions, slots, k_cache, v_cache, span), sub_norm, eps)

    def gate_up_act_norm_quant(self, x_q, x_scale, w: TernaryWeight, activation: str,
                               sub_norm: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """gate|up projection, relu^2(gate) * up (or silu(gate) * up), FFN sub-norm, quantization."""
        gate, up = self.bitlinear(x_q, x_scale, w).float().split(w.segments, dim=-1)
        act = torch.relu(gate).square() if activation == "relu2" else F.silu(gate)
        return self.rmsnorm_quant(act * up, sub_norm, eps)

    def decode_layers(self, model, x, positions, slots, cache):
        """Every layer of a decode step (x [B, 1, H], one token per row) at once, for backends that fuse
        them; None (here) lets the model run its layers one by one."""
        return None

    def int8_head(self, table: torch.Tensor) -> Int8Head:
        """The int8 head made from a head table [V, H]: quantized per row on the CPU, whatever the device
        (torch divides by a scalar through its reciprocal on a GPU, so the scales would differ by an
        ulp), then moved to this device."""
        w_q, scale = quantize_rows_int8(table.cpu())
        return Int8Head(w_q.to(self.device), scale.to(self.device))

    def lm_head(self, x: torch.Tensor, table: torch.Tensor | Int8Head) -> torch.Tensor:
        """x [M, H] dtype -> fp32 logits [M, V]. table: the [V, H] head table, or an Int8Head, whose
        exact int8 values (in fp32) give fp32 dot products then times the row's scale in fp32."""
        if isinstance(table, Int8Head):
            x = x.float()
            out = torch.empty(x.shape[0], table.w_q.shape[0], dtype=torch.float32, device=x.device)
            for start in range(0, table.w_q.shape[0], HEAD_CHUNK_ROWS):
                rows = table.w_q[start:start + HEAD_CHUNK_ROWS]
                out[:, start:start + rows.shape[0]] = x @ rows.float().t()
            return out.mul_(table.scale)
        return x.float() @ table.float().t()


def rope_tables(head_dim: int, theta: float, max_positions: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_dim / 2] in fp32, inv_freq_i = theta^(-2i / head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.arange(max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in fp32: pairs (i, i + D/2). x [B, T, H, D]; cos/sin [B, T, D/2]."""
    x = x.float()
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
