"""The one BitNet b1.58 model definition. Backends plug in through the `ops` object (engine.ops).

    h   = x + o( attn_sub_norm( attention( rope(q(n1)), rope(k(n1)), v(n1) ) ) )      n1 = input_norm(x)
    out = h + down( ffn_sub_norm( act(gate(n2)) * up(n2) ) )                          n2 = post_attn_norm(h)
    logits = head( norm(out) )

q|k|v and gate|up are fused into one BitLinear each; every projection keeps its own scale.
"""

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .ops import TernaryWeight, TorchOps, rope_tables


@dataclass
class Layer:
    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    attn_sub_norm: torch.Tensor
    ffn_sub_norm: torch.Tensor
    qkv: TernaryWeight
    o: TernaryWeight
    gate_up: TernaryWeight
    down: TernaryWeight


class KVCache:
    """Preallocated keys and values: [layers, slots, kv_heads, max_len, head_dim] each."""

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype, device):
        shape = (cfg.num_layers, slots, cfg.num_kv_heads, max_len, cfg.head_dim)
        # zeros, not empty: masked-out entries are multiplied by zero probabilities
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class BitNetModel:
    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor], ops: TorchOps):
        self.cfg, self.ops = cfg, ops
        dev, dt = ops.device, ops.dtype

        def dense(name):
            return tensors[name].to(device=dev, dtype=dt)

        def ternary(i, *projs):
            in_features = self.cfg.linear_shapes()[projs[0]][1]
            return ops.prepare_linear([(tensors[f"layers.{i}.{p}.codes"], tensors[f"layers.{i}.{p}.scale"])
                                       for p in projs], in_features)

        self.embed_tokens = dense("embed_tokens")
        self.head = self.embed_tokens if cfg.tie_word_embeddings else dense("lm_head")
        self.norm = dense("norm")
        self.layers = [
            Layer(dense(f"layers.{i}.input_norm"), dense(f"layers.{i}.post_attn_norm"),
                  dense(f"layers.{i}.attn_sub_norm"), dense(f"layers.{i}.ffn_sub_norm"),
                  ternary(i, "q", "k", "v"), ternary(i, "o"), ternary(i, "gate", "up"), ternary(i, "down"))
            for i in range(cfg.num_layers)
        ]
        self.cos, self.sin = rope_tables(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, dev)
        self.backend_state: dict = {}   # what an ops backend builds once per model (engine.cuda_ops)

    def _layer(self, layer: Layer, x, positions, slots, k_cache, v_cache, span):
        ops, eps = self.ops, self.cfg.rms_norm_eps
        xq, xs = ops.rmsnorm_quant(x, layer.input_norm, eps)
        q = ops.qkv_rope_cache(xq, xs, layer.qkv, self.cos, self.sin, positions, slots, k_cache, v_cache)
        aq, as_ = ops.attention_norm_quant(q, positions, slots, k_cache, v_cache, layer.attn_sub_norm, eps, span)
        x = ops.bitlinear(aq, as_, layer.o, residual=x)
        hq, hs = ops.rmsnorm_quant(x, layer.post_attn_norm, eps)
        fq, fs = ops.gate_up_act_norm_quant(hq, hs, layer.gate_up, self.cfg.activation, layer.ffn_sub_norm, eps)
        return ops.bitlinear(fq, fs, layer.down, residual=x)

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, slots, min(max_len, self.cfg.max_position_embeddings), self.ops.dtype, self.ops.device)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                all_logits: bool = False, span: int | None = None, last: torch.Tensor | None = None) -> torch.Tensor:
        """Run tokens ids [B, T] at positions [B, T] for the sequences in cache slots [B].

        Writes their keys/values into the cache and returns fp32 logits: [B, T, V] when all_logits,
        else [B, V] for each row's last token, or with `last` (int64 [B], on the model's device)
        for each row's token at index last[b] of T (right-padded prompts of different lengths:
        only those rows go through the final norm and the LM head). span: max(positions) + 1, if
        the caller knows it (prompts: saves the attention a read-back of positions; decode steps
        never need it).

        Rows are independent: row b's keys see only row b's cache slot, and a query at position p
        attends to that sequence's entries 0..p. So padding after a prompt's end changes nothing
        for the prompt's own positions; it only writes cache entries past them.
        """
        ops, cfg, eps = self.ops, self.cfg, self.cfg.rms_norm_eps
        x = ops.embed(ids, self.embed_tokens)
        fused = ops.decode_layers(self, x, positions, slots, cache) if ids.shape[1] == 1 else None
        if fused is not None:   # a backend ran the layers below as one kernel, with the same numbers
            x = fused
        else:
            for i, layer in enumerate(self.layers):
                x = self._layer(layer, x, positions, slots, cache.k[i], cache.v[i], span)
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last]
        elif not all_logits:
            x = x[:, -1]
        x = ops.rmsnorm(x, self.norm, eps)
        logits = ops.lm_head(x.reshape(-1, cfg.hidden_size), self.head)
        return logits.reshape(*x.shape[:-1], -1)
