"""The model's ops on the GPU: the CUDA kernels where they exist, the reference ops elsewhere.

Same numbers as TorchOps (engine/ops.py), bit for bit where a kernel replaces a reference op:
activation quantization (plain and fused with RMSNorm), the final RMSNorm, the W2A8 BitLinear,
RoPE + KV-cache write (in the q|k|v GEMM's epilogue for 1 to 64 rows), the MLP activation + sub-norm + quantization, and the attention sub-norm +
quantization of the attention output. Attention differs from the reference only in floating-point
summation order: decode steps (flash-decoding kernel, no host sync, so a step replays in a CUDA
graph) and prompts (fused SDPA, instead of materialized [T, T] scores); so does the LM head (fp32
products and sums of the bf16 table itself, to keep memory at one copy of the embedding: the
streaming kernel of csrc/lm_head.cu for one row, a cuBLAS GEMM for more; or, with an
Int8Head, the same kernel over the int8 table: fp32 products and sums of the same int8 values as
the reference).
"""

import itertools
import os

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from . import kernels
from .ops import Int8Head, TernaryWeight, TorchOps

# The bf16 LM head of more than one row is the engine's only cuBLAS call. On Hopper torch gives cuBLAS
# a 32 MiB workspace per stream (the runtime uses three: prompts, graph warm-up, graph capture): 100 MB
# of a 1.6 GB budget, for a GEMV that needs none. 4 MiB each, unless the user chose (read at cuBLAS's
# first use).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:1")


class CudaOps(TorchOps):
    name = "cuda"
    rope_in_gemm = True   # q|k|v projections of 1-64 rows through the W2A8 GEMM with the RoPE epilogue

    def __init__(self, dtype: torch.dtype, device: torch.device | str = "cuda"):
        super().__init__(dtype, device)
        kernels.load()
        # decode steps through the one-launch kernel (decode_layers) where it applies: off unless asked
        # for (BITNET_FUSED_DECODE=1), because on an H100 it is still slower than the op-by-op step
        # (README, "GPU runtime")
        self.fused_decode = os.environ.get("BITNET_FUSED_DECODE") == "1"

    def prepare_linear(self, parts, in_features: int) -> TernaryWeight:
        """Fused projections are concatenated along the output dim and repacked once on the GPU."""
        codes = torch.cat([c for c, _ in parts]).to(self.device)
        segments = tuple(c.shape[0] for c, _ in parts)
        tiled = kernels.repack(codes, codes.shape[0], in_features)
        return TernaryWeight(tiled, segments, tuple(float(s) for _, s in parts), in_features)

    def quantize(self, x):
        x_q, scale = kernels.quantize(x.reshape(-1, x.shape[-1]))
        return x_q.view(*x.shape), scale.view(*x.shape[:-1], 1)

    def rmsnorm(self, x, weight, eps):
        if x.dtype != self.dtype or x.numel() == 0:
            return super().rmsnorm(x, weight, eps)
        return kernels.rmsnorm(x.reshape(-1, x.shape[-1]), weight.to(x.dtype), eps).view(x.shape)

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

    def qkv_rope_cache(self, x_q, x_scale, w: TernaryWeight, cos, sin, positions, slots, k_cache, v_cache):
        """1 to 64 rows (decode steps, short prompts): one kernel, the q|k|v GEMM with RoPE and the cache
        write in its epilogue. Otherwise (longer prompt chunks) the q|k|v BitLinear, then one kernel for
        RoPE and the cache write. Same bits either way.

        One row joined the fused kernel once the attention split ran on the tensor cores: H100 decode
        steps at batch 1 (512 / 2,048 / 128-token context) 1,051-1,052 / 1,113-1,114 / 1,032-1,033 us
        against 1,067-1,073 / 1,134 / 1,036 with the two launches (README, "GPU runtime")."""
        b, t = x_q.shape[:2]
        rows = positions.reshape(-1).long()
        row_slots = slots.long() if t == 1 else slots.long()[:, None].expand(b, t).reshape(-1)
        heads = w.segments[0] // k_cache.shape[3]
        if self.rope_in_gemm and k_cache.dtype == self.dtype and \
                kernels.gemm_rope_kv_fits(b * t, heads, k_cache.shape[1], k_cache.shape[3]):
            q = kernels.gemm_rope_kv(x_q.reshape(b * t, -1), x_scale, w.weight, w.in_features,
                                     list(itertools.accumulate(w.segments)), w.scales, rows, row_slots, cos, sin,
                                     k_cache, v_cache, heads)
        else:
            qkv = self.bitlinear(x_q, x_scale, w)
            q = kernels.rope_kv_write(qkv.reshape(b * t, -1), rows, row_slots, cos, sin, k_cache, v_cache, heads)
        return q.view(b, t, heads, -1)

    def attention(self, q, positions, slots, k_cache, v_cache, span=None):
        """Decode steps (T = 1): the flash-decoding kernel, no host sync. Prompt chunks (T > 1):
        fused SDPA over cache entries 0..span-1, without a [T, T] score matrix. The runtime's prompt
        chunks are contiguous: positions span-T .. span-1 of their sequence."""
        b, t, heads, d = q.shape
        if t == 1:
            out = kernels.decode_attention(q.reshape(b, heads, d), k_cache, v_cache, slots.long(),
                                           positions.reshape(-1).long())
            return out.view(b, 1, heads * d)
        span = span or int(positions.max()) + 1
        keys, values = k_cache[slots, :, :span], v_cache[slots, :, :span]      # [B, kvH, S, D]
        qt = q.transpose(1, 2)                                                 # [B, H, T, D]
        if span == t:   # the whole prompt in one chunk: plain causal attention (flash)
            out = F.scaled_dot_product_attention(qt, keys, values, is_causal=True,
                                                 enable_gqa=heads != keys.shape[1])
        else:   # a later chunk: query i sees keys 0..span-t+i, the causal mask aligned bottom-right
            group = heads // keys.shape[1]
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            out = F.scaled_dot_product_attention(qt, keys, values, attn_mask=causal_lower_right(t, span))
        return out.transpose(1, 2).reshape(b, t, heads * d).to(self.dtype)

    def attention_norm_quant(self, q, positions, slots, k_cache, v_cache, sub_norm, eps, span=None):
        """Attention, then the sub-norm+quant kernel. The decode-attention kernel also has a variant
        that fuses the two (its combine step's last block normalizes the row), but on an H100 it
        costs 19.8 us against 9.7 + 2.5 us for the two kernels (bench/kernels.py), so it is not used."""
        return self.rmsnorm_quant(self.attention(q, positions, slots, k_cache, v_cache, span), sub_norm, eps)

    def gate_up_act_norm_quant(self, x_q, x_scale, w: TernaryWeight, activation, sub_norm, eps):
        """The gate|up BitLinear, then one kernel: act(gate) * up, FFN sub-norm, quantization."""
        f = w.segments[0]
        if w.segments != (f, f):
            return super().gate_up_act_norm_quant(x_q, x_scale, w, activation, sub_norm, eps)
        lead = x_q.shape[:-1]
        gate_up = self.bitlinear(x_q, x_scale, w)
        y_q, scale = kernels.act_norm_quant(gate_up.reshape(-1, 2 * f), sub_norm.to(gate_up.dtype), eps, activation)
        return y_q.view(*lead, f), scale.view(*lead, 1)

    def decode_layers(self, model, x, positions, slots, cache):
        """Decode steps of up to 8 rows, when fused_decode is on: every layer in one persistent kernel
        (csrc/decode_layers.cu), the same bits as the layers op by op, without their 11 launches per
        layer. None (op by op) when it is off or the kernel does not take this model."""
        b = x.shape[0]
        if not self.fused_decode or b > 8 or self.dtype != torch.bfloat16 or cache.k.dtype != torch.bfloat16:
            return None
        state = model.backend_state
        if "decode_table" not in state:
            unsupported = kernels.decode_layers_unsupported(model.cfg, 1)
            state["decode_table"] = None if unsupported else kernels.decode_layer_table(model.layers)
            state["decode_barrier"] = torch.zeros(1, dtype=torch.int64, device=self.device)
        if state["decode_table"] is None:
            return None
        out = kernels.decode_layers(state["decode_table"], model.cfg, x.reshape(b, -1), positions.reshape(-1),
                                    slots.reshape(-1), model.cos, model.sin, cache.k, cache.v,
                                    state["decode_barrier"])
        return out.view_as(x)

    def int8_head(self, table) -> Int8Head:
        if table.shape[1] > kernels.LM_HEAD_MAX_K:
            raise ValueError(f"the int8 head kernel takes rows of at most {kernels.LM_HEAD_MAX_K} features; "
                             f"this model's hidden size is {table.shape[1]} (use the bf16 head)")
        return super().int8_head(table)

    def lm_head(self, x, table):
        if isinstance(table, Int8Head):
            return kernels.lm_head_int8(x, table.w_q, table.scale)
        if table.dtype == torch.float32:
            return x.float() @ table.t()
        # one row: the streaming kernel reads the table faster than cuBLAS (BITNET_CUBLAS_HEAD=1, read at
        # each call, so at graph capture, turns it off for comparisons)
        if table.dtype == torch.bfloat16 and x.shape[0] <= kernels.LM_HEAD_BF16_MAX_ROWS \
                and table.shape[1] <= kernels.LM_HEAD_MAX_K and os.environ.get("BITNET_CUBLAS_HEAD") != "1":
            return kernels.lm_head_bf16(x, table)
        return torch.mm(x.to(table.dtype), table.t(), out_dtype=torch.float32)  # fp32 accumulation and result
