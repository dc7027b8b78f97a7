"""The Python face of the CUDA kernels in csrc/: finding the compiled module and calling it.

`pip install -e .` on a machine with nvcc and a CUDA build of torch compiles them into engine._C.
If that module is missing at run time on a CUDA machine, the same sources are compiled on first use
with torch's JIT extension loader (cached under ~/.cache/torch_extensions); that needs this source
tree (a checkout or editable install) and nvcc.
"""

import os
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("bindings.cpp", "w2a8_gemm.cu", "w2a8_gemm_large.cu", "quantize.cu", "decode.cu", "decode_attention.cu",
           "decode_layers.cu", "lm_head.cu", "argmax.cu")
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]  # the C++ standard is torch's choice
CHUNK_K = 128  # inputs per tile of the GEMM layout: activation rows are padded to a multiple of it


class KernelsUnavailable(RuntimeError):
    """The CUDA kernels cannot be used here; the message says why."""


_module = None


def load():
    """The kernel module, compiled by setup.py or (failing that) just in time."""
    global _module
    if _module is not None:
        return _module
    if not torch.cuda.is_available():
        raise KernelsUnavailable("no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    try:
        from engine import _C as module
    except ImportError:
        module = _jit_compile()
    _module = module
    return module


def _jit_compile():
    from torch.utils.cpp_extension import CUDA_HOME, load as load_extension

    missing = [s for s in SOURCES if not (CSRC / s).is_file()]
    if missing:
        raise KernelsUnavailable(f"engine._C is not built and the CUDA sources are not at {CSRC}; "
                                 "reinstall from a checkout on a machine with nvcc: pip install -e .")
    if CUDA_HOME is None:
        raise KernelsUnavailable("engine._C is not built and nvcc was not found (set CUDA_HOME) to compile it")
    print("compiling the CUDA kernels once (cached for next time) ...", flush=True)
    return load_extension(name="bitnet_engine_kernels", sources=[str(CSRC / s) for s in SOURCES],
                          extra_cflags=["-O3"], extra_cuda_cflags=NVCC_FLAGS,
                          verbose=os.environ.get("BITNET_VERBOSE_BUILD") == "1")


def padded(k: int) -> int:
    return -(-k // CHUNK_K) * CHUNK_K


def repack(codes: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Canonical packed codes uint8 [n, ceil(k/4)] (on the GPU) -> the GEMM's tiled layout."""
    if n <= 0 or k <= 0:
        raise ValueError(f"impossible weight shape {n}x{k}")
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (n, (k + 3) // 4):
        raise ValueError(f"codes of shape {list(codes.shape)} ({codes.dtype}) cannot hold a {n}x{k} weight "
                         f"(expected uint8 [{n}, {(k + 3) // 4}])")
    return load().repack(codes, n, k)


def quantize(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5,
             out_q: torch.Tensor | None = None, out_scale: torch.Tensor | None = None):
    """x [m, k] -> (x_q int8 [m, k] with padded rows, scale fp32 [m]); with `weight`, of rmsnorm(x) * weight."""
    return tuple(load().quantize(x, weight, eps, out_q, out_scale))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """rmsnorm(x [m, k]) * weight [k], rounded once to x's dtype: engine.quant.rmsnorm(x, weight).to(x.dtype)."""
    return load().rmsnorm(x, weight, eps)


def as_gemm_input(x_q: torch.Tensor) -> torch.Tensor:
    """int8 [m, k] in the GEMM's row layout (rows padded with zeros to a multiple of 128 bytes)."""
    m, k = x_q.shape
    if x_q.stride() == (padded(k), 1) and x_q.storage_offset() % 16 == 0:
        return x_q
    buf = torch.zeros(m, padded(k), dtype=torch.int8, device=x_q.device)
    buf[:, :k] = x_q
    return buf[:, :k]


GEMM_KERNELS = {"auto": 0, "small": 1, "large": 2}
LARGE_TILES = {1: (128, 256), 2: (128, 128), 3: (64, 128)}  # large-M block tiles: (tokens, output rows)
LARGE_SPLITS = (1, 2, 3, 4)   # large-M: blocks (one cluster) sharing each block tile's K


def _check_gemm_inputs(x_q, tiled, n: int, k: int, segment_ends, segment_scales):
    if x_q.dim() != 2 or x_q.dtype != torch.int8:
        raise ValueError(f"x_q must be a 2-D int8 tensor, got {x_q.dtype} {list(x_q.shape)}")
    if x_q.shape[1] != k:
        raise ValueError(f"x_q has {x_q.shape[1]} features but the weight expects {k}")
    if tuple(tiled.shape[:2]) != (-(-n // 16), padded(k) // CHUNK_K):
        raise ValueError(f"the tiled weight {list(tiled.shape)} does not match a {n}x{k} projection")
    ends = list(segment_ends)
    if not ends or ends[-1] != n or len(ends) != len(segment_scales) or len(ends) > 4 \
            or any(b <= a for a, b in zip([0] + ends, ends)):
        raise ValueError(f"segments must end at n = {n}, increase, have one scale each, at most 4: {ends}")


def gemm(x_q: torch.Tensor, x_scale: torch.Tensor, tiled: torch.Tensor, n: int, k: int,
         segment_ends: list[int], segment_scales: list[float], residual: torch.Tensor | None = None,
         out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
         row_tiles_per_block: int = 0, warps: int = 0, kernel: str = "auto", large_tile: int = 0,
         large_splits: int = 0, unroll: int = 0) -> torch.Tensor:
    """[m, n] = dequantized x_q [m, k] . W^T (int32 dot products when out_dtype is torch.int32).

    kernel: "auto" (by m), "small" (the decode GEMV / small-M kernel: row_tiles_per_block, warps and
    unroll, the chunks each warp loads at once, 2 or 4; 0 = by shape) or
    "large" (the prefill kernel: large_tile, a key of LARGE_TILES, and large_splits, one of
    LARGE_SPLITS; 0 = by shape). Same numbers from all.
    """
    if kernel not in GEMM_KERNELS:
        raise ValueError(f"kernel must be one of {list(GEMM_KERNELS)}, got {kernel!r}")
    if large_tile != 0 and large_tile not in LARGE_TILES:
        raise ValueError(f"large_tile must be 0 (by shape) or one of {list(LARGE_TILES)}, got {large_tile!r}")
    if large_splits != 0 and large_splits not in LARGE_SPLITS:
        raise ValueError(f"large_splits must be 0 (by shape) or one of {list(LARGE_SPLITS)}, got {large_splits!r}")
    if unroll not in (0, 2, 4):
        raise ValueError(f"unroll must be 0 (by shape), 2 or 4, got {unroll!r}")
    _check_gemm_inputs(x_q, tiled, n, k, segment_ends, segment_scales)
    return load().gemm(as_gemm_input(x_q), x_scale.reshape(-1).float().contiguous(), tiled, n, k,
                       list(segment_ends), [float(s) for s in segment_scales], residual, out_dtype, out,
                       row_tiles_per_block, warps, GEMM_KERNELS[kernel], large_tile, large_splits, unroll)


# ---- the decode step ------------------------------------------------------------------------------
FLOAT_DTYPES = (torch.bfloat16, torch.float32)
ROPE_GEMM_MAX_ROWS = 64   # kRopeGemmMaxRows: gemm_rope_kv's rows (the small-M GEMM kernel's)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, like: torch.Tensor, what: str):
    """The caches are written or read in place: [slots, kv_heads, max_len, head_dim], contiguous, like's dtype."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [slots, kv_heads, max_len, head_dim], got "
                         f"{list(k_cache.shape)} and {list(v_cache.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dtype != like.dtype or c.device != like.device or not c.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {like.dtype} tensor on {like.device} like {what}, "
                             f"got {c.dtype} on {c.device}{'' if c.is_contiguous() else ', not contiguous'}")


def _index_vector(t: torch.Tensor, n: int, like: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] != n or t.device != like.device:
        raise ValueError(f"{name} must be an int64 vector of {n} values on {like.device}, "
                         f"got {t.dtype} {list(t.shape)} on {t.device}")
    return t.contiguous()


def rope_kv_write(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """q|k|v rows qkv [R, (H + 2 kvH) * D] -> roped q [R, H, D]; roped k and raw v written into
    k_cache / v_cache [slots, kvH, L, D] at [slots[r], :, positions[r]]. positions, slots: int64 [R] on
    the GPU; cos, sin: the fp32 tables [P, D/2] of engine.ops.rope_tables. Bit-exact with
    engine.ops.apply_rope rounded to the dtype. A row whose position (or slot) is outside the cache or
    the tables writes nothing and gets a zero q: the kernel checks, as the host cannot without a sync."""
    if qkv.dim() != 2 or qkv.dtype not in FLOAT_DTYPES or not qkv.is_cuda:
        raise ValueError(f"qkv must be a 2-D bf16 or fp32 CUDA tensor, got {qkv.dtype} {list(qkv.shape)} "
                         f"on {qkv.device}")
    _check_cache(k_cache, v_cache, qkv, "qkv")
    rows, (kv_heads, d) = qkv.shape[0], (k_cache.shape[1], k_cache.shape[3])
    if num_heads <= 0 or d % 2 or qkv.shape[1] != (num_heads + 2 * kv_heads) * d:
        raise ValueError(f"qkv has {qkv.shape[1]} features; {num_heads} query heads and the cache's {kv_heads} kv "
                         f"heads of {d} need (heads + 2 * kv_heads) * head_dim = {(num_heads + 2 * kv_heads) * d} "
                         "and an even head_dim")
    positions, slots = _check_rope_inputs(positions, slots, cos, sin, rows, num_heads, d, qkv, out)
    return load().rope_kv_write(qkv.contiguous(), positions, slots, cos.contiguous(), sin.contiguous(), k_cache,
                                v_cache, num_heads, out)


def _check_rope_inputs(positions, slots, cos, sin, rows: int, num_heads: int, d: int, like, out):
    positions = _index_vector(positions, rows, like, "positions")
    slots = _index_vector(slots, rows, like, "slots")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != d // 2 or t.shape != cos.shape \
                or t.device != like.device:
            raise ValueError(f"{name} must be the fp32 [positions, {d // 2}] rope table on {like.device}, "
                             f"got {t.dtype} {list(t.shape)} on {t.device}")
    if out is not None and (out.shape != (rows, num_heads, d) or out.dtype != like.dtype or not out.is_contiguous()
                            or out.device != like.device):
        raise ValueError(f"out must be a contiguous {like.dtype} [{rows}, {num_heads}, {d}] tensor on {like.device}")
    return positions, slots


def gemm_rope_kv_fits(rows: int, num_heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether gemm_rope_kv takes `rows` rows of this attention shape (the decode kernel's row counts,
    head_dim a multiple of 32); otherwise gemm, then rope_kv_write."""
    return load().gemm_rope_kv_fits(rows, num_heads, kv_heads, head_dim)


def gemm_rope_kv(x_q: torch.Tensor, x_scale: torch.Tensor, tiled: torch.Tensor, k: int, segment_ends: list[int],
                 segment_scales: list[float], positions: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                 out: torch.Tensor | None = None, warps: int = 0) -> torch.Tensor:
    """gemm (q|k|v, output in the caches' dtype) then rope_kv_write, in one kernel and with the same
    bits: x_q [R, k] -> roped q [R, H, D]; roped k and raw v written into the caches. Needs
    gemm_rope_kv_fits(R, H, kvH, D)."""
    if k_cache.dtype not in FLOAT_DTYPES or not k_cache.is_cuda:
        raise ValueError(f"k_cache must be a bf16 or fp32 CUDA tensor, got {k_cache.dtype} on {k_cache.device}")
    _check_cache(k_cache, v_cache, k_cache, "k_cache")
    rows, (kv_heads, d) = x_q.shape[0], (k_cache.shape[1], k_cache.shape[3])
    n = (num_heads + 2 * kv_heads) * d
    _check_gemm_inputs(x_q, tiled, n, k, segment_ends, segment_scales)
    if num_heads <= 0 or not gemm_rope_kv_fits(rows, num_heads, kv_heads, d):
        raise ValueError(f"the fused q|k|v + RoPE GEMM takes 1 to {ROPE_GEMM_MAX_ROWS} rows, a positive head "
                         f"count and a head_dim that is a multiple of 32; got {rows} rows, {num_heads} heads, "
                         f"head_dim {d} (use gemm, then rope_kv_write)")
    positions, slots = _check_rope_inputs(positions, slots, cos, sin, rows, num_heads, d, k_cache, out)
    return load().gemm_rope_kv(as_gemm_input(x_q), x_scale.reshape(-1).float().contiguous(), tiled, k,
                               list(segment_ends), [float(s) for s in segment_scales], positions, slots,
                               cos.contiguous(), sin.contiguous(), k_cache, v_cache, num_heads, out, warps)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     positions: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                     splits: int = 0):
    """One query token per row: q [B, H, D] attends to its cache entries 0..positions[b] of slot slots[b]
    (GQA: head h reads kv head h // (H / kvH)); fp32 scores * D^-0.5, softmax and weighted sum, rounded
    once to the dtype -> out [B, H * D]. With norm_weight [H * D]: that output through RMSNorm and int8
    quantization (bit-exact with engine.kernels.quantize on it) -> (x_q [B, H * D] in the GEMM's padded
    rows, scale fp32 [B]). splits: keys per sequence are cut into this many blocks (0: fill the GPU);
    the launch depends on shapes only, so it replays in a CUDA graph for any lengths."""
    if q.dim() != 3 or q.dtype not in FLOAT_DTYPES or not q.is_cuda:
        raise ValueError(f"q must be a [batch, heads, head_dim] bf16 or fp32 CUDA tensor, got {q.dtype} "
                         f"{list(q.shape)} on {q.device}")
    _check_cache(k_cache, v_cache, q, "q")
    b, heads, d = q.shape
    if d != k_cache.shape[3] or d % 2 or d > 256 or heads % k_cache.shape[1]:
        raise ValueError(f"q [{b}, {heads}, {d}] does not fit a cache of {k_cache.shape[1]} kv heads of "
                         f"{k_cache.shape[3]} (head_dim must match, be even and at most 256; heads must be a "
                         "multiple of kv heads)")
    if not 1 <= b <= 65535:
        raise ValueError(f"batch must be 1..65535, got {b}")
    if not 0 <= splits <= 128:
        raise ValueError(f"splits must be 0 (choose) or 1..128, got {splits}")
    slots = _index_vector(slots, b, q, "slots")
    positions = _index_vector(positions, b, q, "positions")
    if norm_weight is not None and (norm_weight.shape != (heads * d,) or norm_weight.dtype != q.dtype
                                    or norm_weight.device != q.device):
        raise ValueError(f"norm_weight must be a {q.dtype} vector of {heads * d} on {q.device}, "
                         f"got {norm_weight.dtype} {list(norm_weight.shape)} on {norm_weight.device}")
    res = load().decode_attention(q.contiguous(), k_cache, v_cache, slots, positions, norm_weight, float(eps),
                                  int(splits))
    return res[0] if norm_weight is None else tuple(res)


def act_norm_quant(gate_up: torch.Tensor, weight: torch.Tensor, eps: float, activation: str):
    """gate|up rows [M, 2F] (gate first) -> act(gate) * up in fp32 (relu2: relu, square, times up;
    silu: gate / (1 + exp(-gate)) times up), RMSNorm with weight [F] and int8 quantization ->
    (x_q [M, F] in the GEMM's padded rows, scale fp32 [M]). relu2 is bit-exact with
    TorchOps.gate_up_act_norm_quant; silu agrees to fp32 rounding of exp (x_q within 1)."""
    if gate_up.dim() != 2 or gate_up.dtype not in FLOAT_DTYPES or not gate_up.is_cuda or gate_up.shape[1] % 2 \
            or gate_up.numel() == 0:
        raise ValueError(f"gate_up must be a non-empty [M, 2F] bf16 or fp32 CUDA tensor, got {gate_up.dtype} "
                         f"{list(gate_up.shape)} on {gate_up.device}")
    f = gate_up.shape[1] // 2
    if weight.shape != (f,) or weight.dtype != gate_up.dtype or weight.device != gate_up.device:
        raise ValueError(f"weight must be a {gate_up.dtype} vector of {f} on {gate_up.device}, "
                         f"got {weight.dtype} {list(weight.shape)} on {weight.device}")
    if activation not in ("relu2", "silu"):
        raise ValueError(f"activation must be 'relu2' or 'silu', got {activation!r}")
    return tuple(load().act_norm_quant(gate_up.contiguous(), weight, float(eps), activation))


# ---- the LM head as a stream of its table ---------------------------------------------------------
LM_HEAD_MAX_K = 24576  # csrc/kernels.h kLmHeadMaxK: one fp32 row of x fits the kernel's shared memory


def _check_head_inputs(x: torch.Tensor, table: torch.Tensor, dtype: torch.dtype, what: str, out):
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES or not x.is_cuda or x.numel() == 0:
        raise ValueError(f"x must be a non-empty 2-D bf16 or fp32 CUDA tensor, got {x.dtype} {list(x.shape)} "
                         f"on {x.device}")
    if table.dim() != 2 or table.dtype != dtype or table.device != x.device or not table.is_contiguous() \
            or table.shape[0] == 0:
        raise ValueError(f"{what} must be a contiguous {dtype} [V, K] tensor on {x.device}, got {table.dtype} "
                         f"{list(table.shape)} on {table.device}{'' if table.is_contiguous() else ', not contiguous'}")
    v, k = table.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features but the head's rows have {k}")
    if k > LM_HEAD_MAX_K:
        raise ValueError(f"the head kernel takes rows of at most {LM_HEAD_MAX_K} features, got {k}")
    if out is not None and (out.shape != (x.shape[0], v) or out.dtype != torch.float32 or out.device != x.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous fp32 [{x.shape[0]}, {v}] tensor on {x.device}")


def lm_head_int8(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None):
    """The int8 LM head (engine.ops.Int8Head): fp32 logits [m, V] = (x [m, K] . w_q [V, K]^T) * scale [V].

    x bf16 or fp32 on the GPU, w_q int8 [V, K] contiguous, scale fp32 [V]; out, if given, a contiguous
    fp32 [m, V] tensor written in place (no allocation: CUDA-graph friendly either way). Products and
    sums in fp32; each logit's summation order is fixed by K alone, so a row of x gets bit-identical
    logits whatever m is. Any m and V, 1 <= K <= LM_HEAD_MAX_K."""
    _check_head_inputs(x, w_q, torch.int8, "w_q", out)
    v = w_q.shape[0]
    if scale.shape != (v,) or scale.dtype != torch.float32 or scale.device != x.device or not scale.is_contiguous():
        raise ValueError(f"scale must be a contiguous fp32 vector of {v} values on {x.device}, got {scale.dtype} "
                         f"{list(scale.shape)} on {scale.device}")
    return load().lm_head(x.contiguous(), w_q, scale, out)


# Up to this many rows the bf16 head streams its table through lm_head_bf16; above, one cuBLAS GEMM.
# H100 decode-step graph replay, in turns, us per step, the kernel / cuBLAS (README, "The bf16 LM head
# streams its table"): batch 1 983-1,010 / 1,004-1,020 over 13 rounds on two machines (level in a third
# run); batch 2 bimodal, 994-1,002 in 9 rounds and 1,022-1,024 in 4, against 1,008-1,013; batch 4
# 1,033-1,060 / 1,045-1,046; batch 8 1,161-1,177 / 1,145-1,146.
LM_HEAD_BF16_MAX_ROWS = 1


def lm_head_bf16(x: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None):
    """The bf16 LM head (the checkpoint's own, usually the tied embedding): fp32 logits [m, V] =
    x [m, K] . table [V, K]^T, fp32 products and sums, as lm_head_int8 computes them (so a row of x
    gets bit-identical logits whatever m is). Meant for m <= LM_HEAD_BF16_MAX_ROWS; any m works."""
    _check_head_inputs(x, table, torch.bfloat16, "table", out)
    return load().lm_head(x.contiguous(), table, None, out)


# ---- the greedy pick -------------------------------------------------------------------------------

def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits fp32 [m, V] on the GPU (1 <= m <= 65535) -> int64 [m]: each row's first largest value's
    index, as torch.argmax(dim=-1) (-0 equals +0; a NaN beats everything), in two launches."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or not logits.is_cuda or logits.numel() == 0:
        raise ValueError(f"logits must be a non-empty 2-D fp32 CUDA tensor, got {logits.dtype} "
                         f"{list(logits.shape)} on {logits.device}")
    if logits.shape[0] > 65535:
        raise ValueError(f"argmax_rows takes at most 65535 rows, got {logits.shape[0]}")
    return load().argmax_rows(logits)


# ---- every layer of a decode step in one persistent kernel (csrc/decode_layers.cu) -------------------
def decode_layers_unsupported(cfg, m: int) -> str:
    """Why decode_layers cannot run model config `cfg` with m rows on this GPU ('' if it can)."""
    return load().decode_layers_unsupported(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                                            cfg.head_dim, cfg.intermediate_size, cfg.activation, int(m))


def decode_layer_table(layers) -> torch.Tensor:
    """The weight table decode_layers reads, from the model's layers (engine.model.Layer, CUDA-prepared:
    tiled weights, bf16 norms). It points into their tensors: keep the layers alive while it is used."""
    weights, ends, scales, norms = [], [], [], []
    for layer in layers:
        for w in (layer.qkv, layer.o, layer.gate_up, layer.down):
            weights.append(w.weight)
            ends.append([sum(w.segments[:i + 1]) for i in range(len(w.segments))])
            scales.append(list(w.scales))
        norms += [layer.input_norm, layer.attn_sub_norm, layer.post_attn_norm, layer.ffn_sub_norm]
    return load().decode_layer_table(weights, ends, scales, norms)


def decode_layers(table: torch.Tensor, cfg, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  barrier: torch.Tensor, timeline: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, hidden] bf16 (one token per row, m <= 8) through every layer in one launch, writing each
    row's key and value at positions[r] of cache slot slots[r] -> [m, hidden]. The same bits as running
    the layers op by op with CudaOps. k_cache, v_cache: the whole KVCache ([layers, slots, ...]);
    barrier: int64 [1], zero at first, on the GPU, reused by every launch (one launch at a time). timeline: for
    profiling, an int64 [layers, 7 phases, 4, decode_layers_blocks()] tensor (csrc/kernels.h says what it
    receives: ns stamps of each block's phase ends and barriers, from the GPU's global timer)."""
    positions = _index_vector(positions, x.shape[0], x, "positions")
    slots = _index_vector(slots, x.shape[0], x, "slots")
    return load().decode_layers(table, x.contiguous(), positions, slots, cos, sin, k_cache, v_cache, cfg.num_heads,
                                cfg.intermediate_size, cfg.activation, float(cfg.rms_norm_eps), barrier, timeline)


DECODE_PHASES = 7   # csrc/kernels.h kDecodePhases


def decode_layers_blocks() -> int:
    return load().decode_layers_blocks()
