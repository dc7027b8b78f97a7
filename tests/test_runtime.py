"""The continuous-batching scheduler (engine.runtime) on the CPU reference path: requests join a
running batch, leave when done, wait for a free slot, get cancelled; none of it changes tokens."""

import pytest

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


def test_a_request_joins_a_running_batch_and_each_gets_its_own_tokens(llm):
    a, b = llm.encode("Hello there"), llm.encode("A different and longer prompt")
    rt = runtime(llm)
    ra = rt.add(a, GREEDY)
    for _ in range(4):
        rt.step()
    assert len(ra.output) == 5 and not ra.finished
    rb = rt.add(b, SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    rt.step()
    # joined at the next step: its first token from prefill, its second decoded together with a
    assert len(rb.output) == 2 and len(ra.output) == 6
    while not rb.finished:
        rt.step()
    assert rb.finish_reason == "length" and not ra.finished   # left without waiting for a
    assert rt.free == [rb.slot]
    while rt.has_work:
        rt.step()
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
    assert reqs[0].finished and rt.free == [0]
    rt.step()   # the first one's slot went to the third
    assert reqs[2].slot == 0 and len(reqs[2].output) == 2 and len(reqs[1].output) == 3
    while rt.has_work:
        rt.step()
    for r, p, n in zip(reqs, prompts, (2, 6, 4)):
        assert r.output == alone(llm, p)[:n] and r.finish_reason == "length"


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
    assert first.finish_reason == "cancelled" and (first, "") in events
    assert queued.slot == 0 and len(queued.output) == 2
    gone = rt.add(llm.encode("never runs"), GREEDY)
    rt.cancel(gone)
    while rt.has_work:
        rt.step()
    assert gone.finish_reason == "cancelled" and not gone.output
    assert queued.output == alone(llm, llm.encode("Hello"))


def test_chunked_prefill_gives_the_same_tokens(llm):
    prompt = llm.encode("a prompt long enough to need several chunks")
    assert len(prompt) > 20
    rt = runtime(llm, max_batch=1, prefill_chunk=7)
    req = rt.add(prompt, GREEDY)
    while rt.has_work:
        rt.step()
    assert req.output == alone(llm, prompt)


def test_bad_prompts_are_refused_before_queueing(llm):
    rt = runtime(llm, max_len=16)
    for bad, match in (([], "empty"), ([5] * 16, "context"), ([llm.config.vocab_size], "out of range")):
        with pytest.raises(ValueError, match=match):
            rt.add(bad, GREEDY)
    assert not rt.has_work
    req = rt.add([5] * 13, SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True))
    while rt.has_work:
        rt.step()
    assert len(req.output) == 3 and req.finish_reason == "length"   # clamped to the cache
