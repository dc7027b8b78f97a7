"""Sampling, stopping, streaming and the Python API on a tiny converted model."""

import shutil

import pytest
import torch

import hf_models as H
from conftest import SHARED_TOKENIZER
from engine import LLM, SamplingParams
from engine.convert import convert
from engine.sampling import argmax_rows, make_generator, sample


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint)


# ---- the sampler on known logits -------------------------------------------------------------

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])


def draws(params: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    g = make_generator(seed, "cpu")
    return torch.tensor([sample(LOGITS, params, None, g) for _ in range(n)])


def test_greedy_and_degenerate_filters_pick_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0), None, make_generator(0, "cpu")) == 4
    assert (draws(SamplingParams(top_k=1), 50) == 4).all()
    assert (draws(SamplingParams(top_p=0.01), 50) == 4).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("shape", [(1, 128256), (8, 128256), (2, 3, 4096), (3, 32003), (4, 300), (2, 100), (5, 1)])
def test_argmax_rows_is_torch_argmax_first_index_on_ties(device, shape):
    """The two-step greedy pick (vocabulary chunks, then their maxima: torch on the CPU, the kernel of
    csrc/argmax.cu on a GPU) against torch.argmax, with the largest value tied in two chunks and
    within one chunk (the first index wins), -0 tied with +0, rows of -inf and +inf, extremes, and
    NaNs of either sign (the first wins)."""
    gen = torch.Generator().manual_seed(shape[-1])
    v = shape[-1]
    for case in range(8):
        x = torch.randn(*shape, generator=gen)
        if case == 1 and v > 3:    # tied across the row: first, middle, last position
            x[..., [v - 1, v // 2, 1]] = 50.0
        if case == 2 and v > 3:    # tied at neighbours, inside one chunk
            x[..., [2, 3]] = 50.0
        if case == 3:
            x[..., v // 3] = float("nan")
        if case == 4 and v > 5:    # the largest is zero: -0 first, then +0
            x = -x.abs() - 1
            x[..., 2], x[..., 5] = -0.0, 0.0
        if case == 5:              # nothing but -inf (index 0), then +inf at the end
            x = torch.full(shape, float("-inf"))
            if v > 1 and x.dim() > 1:
                x[0, ..., v - 1] = float("inf")
        if case == 6 and v > 7:    # a NaN with the sign bit set before a plain one
            x[..., v // 3] = float("nan")
            x[..., v // 7] = -torch.tensor(float("nan"))
        if case == 7:              # the largest and smallest floats
            x[..., v // 2] = -3.4e38
            x[..., v - 1] = 3.4e38
        x = x.to(device)
        got, want = argmax_rows(x), x.argmax(dim=-1)
        assert got.shape == want.shape and torch.equal(got, want), (shape, case)
    row = torch.randn(v, generator=gen).to(device)   # one row: a 0-d index, as torch.argmax(row)
    assert argmax_rows(row).shape == () and int(argmax_rows(row)) == int(row.argmax())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_argmax_kernel_refuses_what_it_cannot_take():
    from engine import kernels

    for bad in (torch.zeros(2, 5, device="cuda", dtype=torch.bfloat16), torch.zeros(2, 5),
                torch.zeros(2, 3, 5, device="cuda"), torch.zeros(0, 5, device="cuda"),
                torch.zeros(65536, 2, device="cuda")):
        with pytest.raises(ValueError):
            kernels.argmax_rows(bad)


def test_temperature_sampling_follows_softmax():
    counts = torch.bincount(draws(SamplingParams(temperature=0.7)), minlength=5).double() / 4000
    expected = torch.softmax(LOGITS / 0.7, dim=0).double()
    assert (counts - expected).abs().max() < 0.03


def test_top_k_and_top_p_restrict_the_support():
    assert set(draws(SamplingParams(top_k=2), 500).tolist()) == {0, 4}
    # probs at T=1: 3.0 -> .63, 2.0 -> .23 ... top_p 0.8 keeps exactly those two
    assert set(draws(SamplingParams(top_p=0.8), 500).tolist()) == {0, 4}


def test_repetition_penalty():
    seen = torch.tensor([4, 3])
    g = make_generator(0, "cpu")
    # 3.0 / 2 = 1.5 < 2.0: the penalized favourite loses to token 0
    assert sample(LOGITS, SamplingParams(temperature=0, repetition_penalty=2.0), seen, g) == 0
    logits = LOGITS.clone()
    sample(logits, SamplingParams(temperature=0, repetition_penalty=2.0), seen, g)
    assert torch.equal(logits, LOGITS)  # the caller's logits are untouched


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(max_new_tokens=0), dict(repetition_penalty=0), dict(stop=[""])])
def test_bad_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


# ---- generation through the API --------------------------------------------------------------

def test_same_seed_same_output(llm):
    p = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=1234, ignore_eos=True)
    a = llm.generate("Hello there", p)[0]
    b = llm.generate("Hello there", p)[0]
    c = llm.generate("Hello there", SamplingParams(temperature=1.0, max_new_tokens=20, seed=99, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_max_new_tokens_and_finish_reason(llm):
    out = llm.generate("Hello", SamplingParams(temperature=0, max_new_tokens=7, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_stops_on_any_end_id(llm):
    greedy = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    ref = llm.generate("Hello", greedy)[0].token_ids
    rt = llm.runtime(1)  # the scheduler generate() reuses
    saved = rt.end_ids
    try:
        rt.end_ids = saved | {ref[5]}
        out = llm.generate("Hello", SamplingParams(temperature=0, max_new_tokens=12))[0]
        assert llm.runtime(1) is rt
    finally:
        rt.end_ids = saved
    cut = ref.index(ref[5])
    assert out.token_ids == ref[:cut] and out.finish_reason == "stop"
    extra = llm.generate("Hello", SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[ref[3]]))[0]
    assert extra.token_ids == ref[:ref.index(ref[3])] and extra.finish_reason == "stop"


def test_stop_strings(llm):
    full = llm.generate("Hello", SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))[0].text
    assert len(full) > 10
    stop = full[6:9]
    out = llm.generate("Hello", SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert out.text == full[:full.index(stop)] and out.finish_reason == "stop"


def test_streaming_concatenates_to_the_text(llm):
    p = SamplingParams(temperature=0.8, max_new_tokens=25, seed=5, ignore_eos=True, stop=["zzzz"])
    ids = llm.encode("Grüße aus Köln")
    stream = llm.stream(ids, p)
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as done:
            completion = done.value
            break
    assert "".join(pieces) == completion.text == llm.generate([ids], p)[0].text


def test_chat_and_batch_api(llm):
    conv = [{"role": "user", "content": "Hi"}]
    one = llm.chat(conv, SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))
    assert one.prompt_token_ids == llm.tokenizer.encode_chat(conv)
    assert one.prompt_token_ids.count(llm.tokenizer.bos_id) == 1
    many = llm.chat([conv, conv + [{"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]],
                    SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))
    assert many[0].token_ids == one.token_ids and len(many) == 2


def test_context_limits(llm):
    ctx = llm.context_length
    with pytest.raises(ValueError, match="context"):
        llm.generate([[5] * ctx], SamplingParams(max_new_tokens=1))
    out = llm.generate([[5] * (ctx - 3)], SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"  # clamped to the context
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[0, llm.config.vocab_size]])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])


def test_logits_api_predicts_next_token(llm):
    ids = llm.encode("Hello, how are")
    logits = llm.logits(ids)
    assert logits.shape == (len(ids), llm.config.vocab_size) and logits.dtype == torch.float32
    nxt = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True))[0].token_ids[0]
    assert int(logits[-1].argmax()) == nxt


@pytest.mark.skipif(not SHARED_TOKENIZER.is_dir(), reason="needs ../shared/assets/llama3-tokenizer")
def test_real_tokenizer_end_ids_and_chat_prompt(tmp_path):
    """A model with the real 2B-4T vocabulary stops on both <|end_of_text|> and <|eot_id|>, and the
    one-turn chat prompt has a single BOS."""
    cfg = H.bitnet_config(vocab_size=128256, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, num_hidden_layers=1, bos_token_id=128000,
                          eos_token_id=128001, initializer_range=0.02)
    src = tmp_path / "src"
    H.save_hf(src, cfg, H.random_bitnet_state(cfg, seed=0), "online")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SHARED_TOKENIZER / f, src / f)
    llm = LLM(convert(str(src), tmp_path / "out", progress=False))
    assert {128001, 128009} <= llm.end_ids
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "How are you?"}])
    assert ids == [128000, 1502, 25, 2650, 527, 499, 30, 128009, 72803, 25, 220]
    assert len(llm.chat([{"role": "user", "content": "How are you?"}],
                        SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)).token_ids) == 3
