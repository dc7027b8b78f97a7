"""Comparing the engine's logits with a reference that quantizes activations the same way but
computes its floating-point sums differently (transformers' fake quantization, a float64 model)."""

import torch


def record_engine_quants(llm) -> list[torch.Tensor]:
    """Capture every int8 activation tensor the engine computes (4 per layer, in order)."""
    seen, inner = [], llm.ops.rmsnorm_quant

    def recording(*args, **kwargs):
        x_q, x_scale = inner(*args, **kwargs)
        seen.append(x_q.reshape(-1, x_q.shape[-1]).clone())
        return x_q, x_scale

    llm.ops.rmsnorm_quant = recording
    return seen


def int8_with_raw(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bitnet-format.md activation quantization (fp32 math): int8 values and pre-rounding values."""
    x = x.reshape(-1, x.shape[-1]).float()
    raw = x * (127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5))
    return torch.round(raw).clamp(-128, 127).to(torch.int8), raw


def assert_logits_match(got, expected, ours_q, ref_q, ref_raw, atol: float, min_positions: int = 8):
    """Logits agree within `atol` at every position up to the first int8 activation that the two
    computations round differently; that first difference must be a genuine rounding tie in the
    reference's own values (pre-rounding value within 1e-3 of .5) and one step wide. What follows
    from it (later layers, later positions through attention) differs only as a consequence, so
    there the logits need only stay close."""
    assert len(ours_q) == len(ref_q) == len(ref_raw)
    n = got.shape[0]
    rows_differ = [(a != b).any(dim=-1) for a, b in zip(ours_q, ref_q)]
    first_flip = min((int(r.nonzero()[0]) for r in rows_differ if r.any()), default=n)
    if first_flip < n:
        point = next(i for i, r in enumerate(rows_differ) if r[first_flip])
        a, b, raw = ours_q[point][first_flip], ref_q[point][first_flip], ref_raw[point][first_flip]
        differ = a != b
        assert (a.int() - b.int()).abs().max() == 1
        distance_to_tie = (raw - raw.floor() - 0.5).abs()[differ]
        assert distance_to_tie.max() < 1e-3, f"an int8 activation differs that is not a rounding tie ({distance_to_tie})"
    assert first_flip >= min_positions, f"activations differ from position {first_flip}: too early to compare logits"
    err = (got - expected).abs().amax(dim=-1)
    assert err[:first_flip].max() < atol, f"max |logit difference| {err[:first_flip].max():.3g}"
    assert err.max() < 0.05 * expected.abs().max(), f"max |logit difference| {err.max():.3g}"
