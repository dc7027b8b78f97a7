"""The model's ops on the GPU: the CUDA kernels where they exist, the reference ops elsewhere.

Same numbers as TorchOps (engine/ops.py), bit for bit where a kernel replaces a reference op:
activation quantization (plain and fused with RMSNorm) and the W2A8 BitLinear. Two ops differ
from the reference only in floating-point summation order, to keep memory at one copy of the
model: the LM head (a bf16 GEMM accumulating and returning fp32, instead of an fp32 copy of the
embedding) and prompt attention (fused SDPA, instead of materialized [T, T] scores).
"""

import itertools

import torch
import torch.nn.functional as F

from . import kernels
from .ops import TernaryWeight, TorchOps


class CudaOps(TorchOps):
    name = "cuda"

    def __init__(self, dtype: torch.dtype, device: torch.device | str = "cuda"):
        super().__init__(dtype, device)
        kernels.load()

    def prepare_linear(self, parts, in_features: int) -> TernaryWeight:
        """Fused projections are concatenated along the output dim and repacked once on the GPU."""
        codes = torch.cat([c for c, _ in parts]).to(self.device)
        segments = tuple(c.shape[0] for c, _ in parts)
        tiled = kernels.repack(codes, codes.shape[0], in_features)
        return TernaryWeight(tiled, segments, tuple(float(s) for _, s in parts), in_features)

    def quantize(self, x):
        x_q, scale = kernels.quantize(x.reshape(-1, x.shape[-1]))
        return x_q.view(*x.shape), scale.view(*x.shape[:-1], 1)

    def rmsnorm_quant(self, x, weight, eps):
        # x may be fp32 (the MLP's activation product): quantized as is, like the reference
        x_q, scale = kernels.quantize(x.reshape(-1, x.shape[-1]), weight.to(x.dtype), eps)
        return x_q.view(*x.shape), scale.view(*x.shape[:-1], 1)

    def bitlinear(self, x_q, x_scale, w: TernaryWeight, residual=None):
        lead = x_q.shape[:-1]
        ends = list(itertools.accumulate(w.segments))
        res = residual.reshape(-1, ends[-1]).to(self.dtype) if residual is not None else None
        y = kernels.gemm(x_q.reshape(-1, w.in_features), x_scale, w.weight, ends[-1], w.in_features,
                         ends, w.scales, res, self.dtype)
        return y.view(*lead, -1)

    def attention(self, q, positions, slots, k_cache, v_cache):
        """Prompts (T > 1) start at position 0 in this runtime: causal SDPA over their own keys,
        GQA-aware and without a [T, T] score matrix. Decode steps use the reference."""
        b, t, heads, d = q.shape
        if t == 1:
            return super().attention(q, positions, slots, k_cache, v_cache)
        keys, values = k_cache[slots, :, :t], v_cache[slots, :, :t]         # [B, kvH, T, D]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, is_causal=True,
                                             enable_gqa=heads != keys.shape[1])
        return out.transpose(1, 2).reshape(b, t, heads * d).to(self.dtype)

    def lm_head(self, x, table):
        if table.dtype == torch.float32:
            return x.float() @ table.t()
        return torch.mm(x.to(table.dtype), table.t(), out_dtype=torch.float32)  # fp32 accumulation and result
