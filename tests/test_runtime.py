"""The continuous-batching scheduler (engine.runtime) on the CPU reference path: requests join a
running batch, leave when done, wait for a free slot, get cancelled, are prefilled together in
groups; none of it changes tokens.

The step's rhythm (engine/runtime.py): a step collects the tokens of the decode step launched by
the previous one, prefills at most one forward of newcomers, then launches the next decode step
(or, with nothing to prefill, launches it first, fed from the device). So a request admitted in
step k has its first token (from prefill) after step k, and one more after each later step."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.runtime import Runtime

GREEDY = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint)


def runtime(llm, **kw):
    kw.setdefault("max_batch", 2)
    kw.setdefault("max_len", 64)
    return Runtime(llm.model, llm.tokenizer, llm.end_ids, **kw)


def alone(llm, prompt, params=GREEDY):
    return llm.generate([prompt], params)[0].token_ids


def plain_greedy(llm, prompt, n):
    """n greedy tokens from model.forward one position at a time, without the runtime."""
    m = llm.model
    cache, slot = m.new_cache(1, 64), torch.zeros(1, dtype=torch.long)
    tokens = [int(m.forward(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, slot).argmax())]
    while len(tokens) < n:
        pos = len(prompt) + len(tokens) - 1
        logits = m.forward(torch.tensor([[tokens[-1]]]), torch.tensor([[pos]]), cache, slot)
        tokens.append(int(logits.argmax()))
    return tokens


def trace(rt) -> list[str]:
    """Record, in order, each forward the runtime runs ("F") and each read of tokens by the host ("R")."""
    order, forward, host = [], rt.model.forward, rt._host
    rt.model.forward = lambda *a, **kw: order.append("F") or forward(*a, **kw)
    rt._host = lambda fetch: order.append("R") or host(fetch)
    return order


def drain(rt):
    while rt.has_work:
        rt.step()


class Recorder:
    """Stands in for the model inside a runtime and records the shape [B, T] of every forward."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, ids, *args, **kw):
        self.shapes.append(tuple(ids.shape))
        return self.model.forward(ids, *args, **kw)

    def prefills(self):
        return [s for s in self.shapes if s[1] > 1]


def recorded(rt) -> Recorder:
    rt.model = Recorder(rt.model)
    return rt.model


def prompts_of(lengths, salt=0):
    """Token-id prompts of the given lengths, each different (ids 3..252, clear of the end ids)."""
    return [[(7 * i + 13 * k + salt) % 250 + 3 for i in range(n)] for k, n in enumerate(lengths)]


def test_a_request_joins_a_running_batch_and_each_gets_its_own_tokens(llm):
    a, b = llm.encode("Hello there"), llm.encode("A different and longer prompt")
    rt = runtime(llm)
    model = recorded(rt)
    ra = rt.add(a, GREEDY)
    for _ in range(4):
        rt.step()
    assert len(ra.output) == 4 and not ra.finished   # the first from prefill, then one per step
    rb = rt.add(b, SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    rt.step()
    assert len(rb.output) == 1 and len(ra.output) == 5   # joined: its first token from prefill
    assert model.shapes[-2:] == [(1, len(b)), (2, 1)]     # ... then decodes together with a
    rt.step()
    assert len(rb.output) == 2 and len(ra.output) == 6
    while not rb.finished:
        rt.step()
    assert rb.finish_reason == "length" and not ra.finished   # left without waiting for a
    assert rt.free == [rb.slot]
    drain(rt)
    assert ra.output == alone(llm, a)
    assert rb.output == alone(llm, b)[:3]
    assert sorted(rt.free) == [0, 1] and not rt.running


def test_requests_wait_for_a_free_slot(llm):
    prompts = [llm.encode(t) for t in ("one", "two two", "three three three")]
    rt = runtime(llm, max_batch=2)
    reqs = [rt.add(p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
            for p, n in zip(prompts, (2, 6, 4))]
    rt.step()
    assert [r.slot for r in reqs] == [0, 1, None] and len(rt.waiting) == 1
    assert [len(r.output) for r in reqs] == [1, 1, 0]
    rt.step()   # the first one's last token frees its slot, which goes to the third in the same step
    assert reqs[0].finished and reqs[2].slot == 0
    assert [len(r.output) for r in reqs] == [2, 2, 1]
    drain(rt)
    for r, p, n in zip(reqs, prompts, (2, 6, 4)):
        assert r.output == alone(llm, p)[:n] and r.finish_reason == "length"


def test_decode_steps_run_ahead_of_the_hosts_reads(llm):
    """With nothing to prefill, a step launches the next decode step before reading the tokens of
    the one in flight, fed with them from the device; no step is wasted when a request ends by
    its length, and the tokens are those of a plain greedy loop over model.forward."""
    prompt = prompts_of((7,), salt=9)[0]
    rt = runtime(llm, max_batch=2)
    model, order = recorded(rt), trace(rt)
    req = rt.add(prompt, GREEDY)
    drain(rt)
    # step 1: prefill, read its token, launch decode 1; steps 2-9: launch decode k, read decode
    # k - 1; step 10: read decode 9, the tenth token
    assert order == ["F", "R", "F"] + ["F", "R"] * 8 + ["R"]
    assert model.shapes == [(1, 7)] + [(1, 1)] * 9
    assert req.output == plain_greedy(llm, prompt, 10) and req.finish_reason == "length"


def test_an_end_token_read_while_the_next_step_runs_drops_that_steps_token(llm):
    a, b = prompts_of((5, 8), salt=10)
    solo = plain_greedy(llm, a, 10)
    j = next(i for i in range(2, 10) if solo[i] not in solo[:i])   # a token that first appears at j
    rt = runtime(llm, max_batch=2)
    model = recorded(rt)
    ra = rt.add(a, SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[solo[j]], ignore_eos=True))
    rb = rt.add(b, GREEDY)
    waiting = rt.add(prompts_of((6,), salt=11)[0], GREEDY)   # gets a's slot once it is free
    drain(rt)
    assert ra.output == solo[:j] and ra.finish_reason == "stop"
    assert rb.output == plain_greedy(llm, b, 10) and waiting.output == plain_greedy(llm, waiting.prompt, 10)
    assert waiting.slot == ra.slot
    # a's end token came from decode step j; step j + 1 was already running with a in it
    assert model.shapes[:j + 2] == [(2, 8)] + [(2, 1)] * (j + 1)


def test_a_repetition_penalty_keeps_the_batch_from_running_ahead(llm):
    """Picking under a repetition penalty needs the tokens on the host: read, then launch."""
    prompt = prompts_of((6,), salt=12)[0]
    params = SamplingParams(temperature=0, repetition_penalty=1.3, max_new_tokens=6, ignore_eos=True)
    rt = runtime(llm, max_batch=2)
    order = trace(rt)
    req = rt.add(prompt, params)
    drain(rt)
    assert order == ["F", "R", "F"] + ["R", "F"] * 4 + ["R"]
    assert req.output == alone(llm, prompt, params)


def test_text_events_concatenate_to_the_text_and_finish_once(llm):
    rt = runtime(llm)
    reqs = [rt.add(llm.encode(t), SamplingParams(temperature=0.9, seed=i, max_new_tokens=8, ignore_eos=True))
            for i, t in enumerate(("Grüße", "Hello"))]
    text = {id(r): "" for r in reqs}
    finished_events = {id(r): 0 for r in reqs}
    while rt.has_work:
        for req, piece in rt.step():
            assert not finished_events[id(req)], "an event after the request finished"
            text[id(req)] += piece
            finished_events[id(req)] += req.finished
    for r in reqs:
        assert text[id(r)] == r.text and finished_events[id(r)] == 1 and len(r.output) == 8


def test_cancel_frees_the_slot_at_the_next_step(llm):
    rt = runtime(llm, max_batch=1)
    first = rt.add(llm.encode("Hello"), SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True))
    queued = rt.add(llm.encode("Hello"), GREEDY)
    rt.step()
    rt.step()
    assert first.slot == 0 and queued.slot is None
    rt.cancel(first)
    events = rt.step()
    assert first.finish_reason == "cancelled" and (first, "") in events and len(first.output) == 2
    assert queued.slot == 0 and len(queued.output) == 1
    gone = rt.add(llm.encode("never runs"), GREEDY)
    rt.cancel(gone)
    drain(rt)
    assert gone.finish_reason == "cancelled" and not gone.output
    assert queued.output == alone(llm, llm.encode("Hello"))


def test_a_waiting_request_cancelled_while_no_slot_is_free_leaves_at_once(llm):
    rt = runtime(llm, max_batch=1)
    busy = rt.add(llm.encode("Hello"), SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))
    rt.step()
    waiting = rt.add(llm.encode("Hi"), GREEDY)
    rt.cancel(waiting)
    assert (waiting, "") in rt.step()
    assert waiting.finish_reason == "cancelled" and not rt.waiting and not busy.finished


def test_chunked_prefill_gives_the_same_tokens(llm):
    prompt = llm.encode("a prompt long enough to need several chunks")
    assert len(prompt) > 20
    rt = runtime(llm, max_batch=1, prefill_chunk=7)
    req = rt.add(prompt, GREEDY)
    drain(rt)
    assert req.output == alone(llm, prompt)


def test_bad_prompts_are_refused_before_queueing(llm):
    rt = runtime(llm, max_len=16)
    for bad, match in (([], "empty"), ([5] * 16, "context"), ([llm.config.vocab_size], "out of range")):
        with pytest.raises(ValueError, match=match):
            rt.add(bad, GREEDY)
    assert not rt.has_work
    req = rt.add([5] * 13, SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True))
    drain(rt)
    assert len(req.output) == 3 and req.finish_reason == "length"   # clamped to the cache


# ---- batched prefill ------------------------------------------------------------------------
LENGTHS = (1, 3, 8, 9, 15, 16, 17, 30)   # around a prefill chunk of 8: within, at, just past, several


def test_prompts_arriving_together_are_prefilled_together_and_get_their_own_tokens(llm):
    prompts = prompts_of(LENGTHS)
    expected = [alone(llm, p) for p in prompts]
    assert len({tuple(e) for e in expected}) == len(prompts), "the prompts need different answers"
    rt = runtime(llm, max_batch=len(prompts), prefill_chunk=8)
    model = recorded(rt)
    reqs = [rt.add(p, GREEDY) for p in reversed(prompts)]   # not sorted: the runtime sorts its group
    rt.step()
    assert not rt.waiting and all(r.slot is not None for r in reqs)   # one group, every slot
    drain(rt)
    assert [r.output for r in reversed(reqs)] == expected
    # one forward per chunk of 8 positions, right-padded to the longest prompt still going, rows
    # whose prompt ended dropping out; one chunk per step, decode steps in between
    assert model.prefills() == [(8, 8), (5, 8), (2, 8), (1, 6)]
    # the rows whose prompt is done decode between the chunks (1, 3, 8; then 9, 15, 16; ...)
    assert model.shapes[:8] == [(8, 8), (3, 1), (5, 8), (6, 1), (2, 8), (7, 1), (1, 6), (8, 1)]


def test_the_prefill_token_budget_splits_a_group(llm):
    prompts = prompts_of((5, 6, 7, 12), salt=1)
    rt = runtime(llm, max_batch=4, prefill_tokens=16)
    model = recorded(rt)
    reqs = [rt.add(p, GREEDY) for p in prompts]
    rt.step()
    assert len(model.prefills()) == 1 and [len(r.output) for r in reqs] == [1, 1, 0, 0]
    rt.step()   # the two decode; the 7-token prompt is the next group alone (with the 12 it would pad to 24)
    assert [len(r.output) for r in reqs] == [2, 2, 1, 0]
    drain(rt)
    assert model.prefills() == [(2, 6), (1, 7), (1, 12)]   # at most 16 padded tokens per forward
    assert [r.output for r in reqs] == [alone(llm, p) for p in prompts]


def test_requests_arriving_while_others_decode(llm):
    prompts = prompts_of((4, 11, 2, 23, 9, 1), salt=2)
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    rt = runtime(llm, max_batch=4, prefill_chunk=8)
    reqs = []
    for k, p in enumerate(prompts):   # one or two new requests every other step
        reqs.append(rt.add(p, params))
        if k % 2:
            rt.step()
            rt.step()
    drain(rt)
    assert [r.output for r in reqs] == [alone(llm, p, params) for p in prompts]
    assert sorted(rt.free) == [0, 1, 2, 3]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llm):
    prompts = prompts_of((3, 10, 17), salt=3)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_new_tokens=12, ignore_eos=True)
              for s in (1, 2, 3)]
    solo = [llm.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    assert solo == [llm.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]   # seeded
    rt = runtime(llm, max_batch=4, prefill_chunk=8)
    reqs = [rt.add(p, q) for p, q in zip(prompts, params)]
    reqs.append(rt.add(prompts[0], GREEDY))   # greedy and sampled rows in one group
    drain(rt)
    assert [r.output for r in reqs[:3]] == solo
    assert reqs[3].output == alone(llm, prompts[0])


def test_cancellation_during_a_batched_admit(llm):
    prompts = prompts_of((6, 20, 3, 18), salt=4)
    rt = runtime(llm, max_batch=4, prefill_chunk=8)
    model = recorded(rt)
    reqs = [rt.add(p, GREEDY) for p in prompts]
    rt.cancel(reqs[2])   # gone before the group forms: it never gets a slot
    events = rt.step()
    assert (reqs[2], "") in events and reqs[2].slot is None and not reqs[2].output
    assert model.prefills() == [(3, 8)]          # the other three, together
    rt.cancel(reqs[1])   # gone in the middle of its prompt: its slot is free at the next step
    events = rt.step()
    assert (reqs[1], "") in events and reqs[1].finish_reason == "cancelled" and reqs[1].slot in rt.free
    assert model.prefills() == [(3, 8), (1, 8)]  # the next chunk holds only the one left
    late = rt.add(prompts_of((5,), salt=5)[0], GREEDY)   # takes a freed slot
    drain(rt)
    assert reqs[0].output == alone(llm, prompts[0]) and reqs[3].output == alone(llm, prompts[3])
    assert late.output == alone(llm, late.prompt)
    assert all(r.finish_reason == "cancelled" for r in reqs[1:3]) and not reqs[1].output
    assert sorted(rt.free) == [0, 1, 2, 3]


def test_a_stop_string_ends_a_request_and_its_slot_serves_the_next_at_once(llm):
    prompt = llm.encode("Hello")
    full = llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 1)
                if full[i:i + 2].strip() and full[i:i + 2] not in full[:i + 1])
    rt = runtime(llm, max_batch=1)
    first = rt.add(prompt, SamplingParams(temperature=0, max_new_tokens=24, stop=[stop], ignore_eos=True))
    nxt = rt.add(prompts_of((9,), salt=6)[0], GREEDY)
    pieces = ""
    while not first.finished:
        pieces += "".join(piece for req, piece in rt.step() if req is first)
    assert first.finish_reason == "stop" and first.text == pieces == full[:full.index(stop)]
    # the stop string was found after the next decode step had started with `first` in it: that
    # step's token for it is dropped, and the slot goes to the waiting request
    drain(rt)
    assert nxt.slot == first.slot and nxt.output == alone(llm, nxt.prompt)
    assert rt.prefill_seconds > 0 and rt.decode_seconds > 0


def test_an_end_token_from_prefill_finishes_without_a_decode_step(llm):
    ends = next((p for p in (prompts_of((n,), salt=s)[0] for n in (2, 3, 5) for s in range(60))
                 if alone(llm, p, SamplingParams(temperature=0, max_new_tokens=1)) == []
                 and llm.generate([p], SamplingParams(temperature=0, max_new_tokens=1))[0].finish_reason == "stop"),
                None)
    if ends is None:
        pytest.skip("no short prompt of the tiny model starts its answer with an end token")
    rt = runtime(llm, max_batch=2)
    model = recorded(rt)
    other = rt.add(prompts_of((4,), salt=7)[0], GREEDY)
    req = rt.add(ends, SamplingParams(temperature=0, max_new_tokens=10))
    rt.step()
    assert req.finish_reason == "stop" and not req.output and req.slot in rt.free
    # the group's one prefill forward, then a decode step for `other` alone, and so on
    assert model.shapes == [(2, max(4, len(ends))), (1, 1)]
    drain(rt)
    assert all(s == (1, 1) for s in model.shapes[1:])
    assert other.output == alone(llm, other.prompt)


def test_forward_with_last_returns_each_rows_own_position(llm):
    """model.forward(last=...) picks each row's hidden state before the head: the same logits as
    the full [B, T, V] computation at those positions."""
    m = llm.model
    prompts = prompts_of((3, 9, 6), salt=8)
    t = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (t - len(p)) for p in prompts])
    positions = torch.arange(t).repeat(len(prompts), 1)
    last = torch.tensor([len(p) - 1 for p in prompts])
    cache = m.new_cache(3, 32)
    picked = m.forward(ids, positions, cache, torch.arange(3), span=t, last=last)
    full = m.forward(ids, positions, cache, torch.arange(3), span=t, all_logits=True)
    assert picked.shape == (3, llm.config.vocab_size)
    for i, p in enumerate(prompts):
        assert torch.allclose(picked[i], full[i, len(p) - 1], rtol=0, atol=1e-5)
        assert int(picked[i].argmax()) == alone(llm, p, SamplingParams(temperature=0, max_new_tokens=1,
                                                                        ignore_eos=True))[0]
