"""The OpenAI-compatible server on the tiny checkpoint (CPU): the official openai client, continuous
batching through HTTP, bad input, the bounded queue, disconnects, the API key and the CLI.

Servers run in-process on a free port; where a test needs the engine to hold still (a full
queue, a disconnect), a StepGate lets the engine thread take only the steps the test allows."""

import concurrent.futures
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from engine.server import create_app, serve_in_background

ROOT = Path(__file__).resolve().parents[1]
WAIT = 120  # seconds: generous, for waiting on a slow machine (never a speed assertion)


@pytest.fixture(scope="module")
def ref(tiny_checkpoint) -> LLM:
    """The reference answers: the Python API, on its own LLM (a server owns its LLM's runtime)."""
    return LLM(tiny_checkpoint)


@contextlib.contextmanager
def running_server(checkpoint, **kw):
    app = create_app(LLM(checkpoint), **kw)
    with serve_in_background(app) as url:
        yield url, app.state.service


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=16) as s:
        yield s


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "unused"), timeout=WAIT, **kw)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, **kw)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class StepGate:
    """Replaces rt.step: the engine thread runs a step only when the test has allowed one."""

    def __init__(self, rt):
        self.rt, self.real_step = rt, rt.step
        self.budget = 0
        self.cond = threading.Condition()
        self.max_running = 0
        rt.step = self.step

    def step(self):
        with self.cond:
            self.cond.wait_for(lambda: self.budget > 0)  # no timeout: remove() always opens it
            self.budget -= 1
        events = self.real_step()
        self.max_running = max(self.max_running, len(self.rt.running))
        return events

    def allow(self, steps: float) -> None:
        with self.cond:
            self.budget += steps
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.budget = 0

    def remove(self) -> None:
        self.allow(float("inf"))
        del self.rt.step  # back to the class's method


@contextlib.contextmanager
def gate(service):
    g = StepGate(service.engine.rt)
    try:
        yield g
    finally:
        g.remove()


def spy_on_add(service) -> list:
    """Record the runtime requests the server creates."""
    rt, seen = service.engine.rt, []
    real_add = rt.add

    def add(prompt, params):
        seen.append(real_add(prompt, params))
        return seen[-1]

    rt.add = add
    return seen


# ---- the official client --------------------------------------------------------------------
def test_chat_with_the_openai_client(server, ref):
    url, _ = server
    c = client(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "How are you?"}]
    expected = ref.chat(messages, greedy(12))
    assert expected.text

    r = c.chat.completions.create(model="tiny-bitnet", messages=messages, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny-bitnet"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(ref.tokenizer.encode_chat(messages))
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(c.chat.completions.create(model="tiny-bitnet", messages=messages, max_completion_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_completions_with_the_openai_client(server, ref):
    url, _ = server
    c = client(url)
    expected = ref.generate("The quick brown", greedy(10))[0]
    r = c.completions.create(model="tiny-bitnet", prompt="The quick brown", max_tokens=10, temperature=0)
    assert r.object == "text_completion"
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected.text, expected.finish_reason)
    assert r.usage.prompt_tokens == len(ref.encode("The quick brown"))

    stream = c.completions.create(model="tiny-bitnet", prompt="The quick brown", max_tokens=10, temperature=0,
                                  stream=True)
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason

    ids = [5, 17, 42, 99, 7]  # a prompt of token ids is used as is (no BOS added)
    by_ids = c.completions.create(model="tiny-bitnet", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == ref.generate(ids, greedy(10))[0].text
    assert by_ids.usage.prompt_tokens == len(ids)

    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny-bitnet"]


def test_sampling_fields_reach_the_sampler(server, ref):
    url, _ = server
    c = client(url)
    def sampled(**kw) -> str:
        return ref.generate("Hello", SamplingParams(**{"temperature": 1.5, "top_p": 0.5, "seed": 7,
                                                       "max_new_tokens": 12, **kw}))[0].text

    expected = sampled()
    # each field changes this answer, so matching it shows that each one reached the sampler
    assert expected not in (sampled(temperature=0.9), sampled(top_p=1.0), sampled(seed=8))
    r = c.completions.create(model="m", prompt="Hello", temperature=1.5, top_p=0.5, seed=7, max_tokens=12)
    assert r.choices[0].text == expected

    # a stop string cut out of the greedy answer ends it there
    full = ref.generate("Hello", greedy(24, ignore_eos=True))[0].text
    # two characters first seen at position i >= 3
    stop = next(full[i:i + 2] for i in range(3, len(full) - 1)
                if full[i:i + 2].strip() and full[i:i + 2] not in full[:i + 1])
    r = c.completions.create(model="m", prompt="Hello", temperature=0, max_tokens=24, stop=[stop],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"

    # ignore_eos (not OpenAI's) keeps going past the end token that stops a greedy answer
    candidates = ([(37 * k + 11 * i) % 280 + 3 for i in range(3 + k % 7)] for k in range(100))
    ends = next((p for p in candidates if ref.generate(p, greedy(30))[0].finish_reason == "stop"), None)
    assert ends is not None, "no prompt of the tiny model ends with an end token"
    r = c.completions.create(model="m", prompt=ends, max_tokens=30, temperature=0)
    stopped = ref.generate(ends, greedy(30))[0]
    assert (r.choices[0].text, r.choices[0].finish_reason) == (stopped.text, "stop")
    assert r.usage.completion_tokens == len(stopped.token_ids) < 30
    r = c.completions.create(model="m", prompt=ends, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.generate(ends, greedy(30, ignore_eos=True))[0].text
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 30)

    # prompt + max_tokens beyond the context: max_tokens is clamped to the room left
    long_prompt = [(7 * i) % 280 + 3 for i in range(120)]
    r = c.completions.create(model="m", prompt=long_prompt, max_tokens=100, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 128 - 120 and r.choices[0].finish_reason == "length"


# ---- continuous batching ----------------------------------------------------------------------
def test_sixteen_concurrent_streams_each_get_their_own_answer(server, ref):
    url, service = server
    prompts = [[(13 * k + 5 * i) % 280 + 3 for i in range(4 + k)] for k in range(16)]
    params = greedy(16, ignore_eos=True)
    expected = [ref.generate(p, params)[0].text for p in prompts]
    assert len(set(expected)) == 16, "the prompts must have different answers for this test to mean anything"

    def stream(prompt) -> tuple[str, int]:
        chunks = list(client(url).completions.create(
            model="m", prompt=prompt, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        return "".join(ch.choices[0].text for ch in chunks if ch.choices), chunks[-1].usage.completion_tokens

    assert stream(prompts[3]) == (expected[3], 16)  # alone
    with gate(service) as g, concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(stream, p) for p in prompts]
        wait_for(lambda: service.admitted == 16, "16 requests admitted")
        g.allow(float("inf"))  # all 16 join the batch at the same step
        answers = [f.result(timeout=WAIT) for f in futures]
    assert g.max_running == 16
    assert answers == [(e, 16) for e in expected]


def test_a_full_queue_answers_429_and_recovers(tiny_checkpoint, ref):
    with running_server(tiny_checkpoint, max_batch=1, max_queue=2) as (url, service), gate(service) as g, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0}
        admitted = [pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=WAIT) for _ in range(2)]
        wait_for(lambda: service.admitted == 2, "2 requests admitted")

        r = httpx.post(f"{url}/v1/completions", json=body, timeout=WAIT)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client(url, max_retries=0).completions.create(model="m", prompt="Hello", max_tokens=6)

        g.allow(float("inf"))
        expected = ref.generate("Hello", greedy(6))[0].text
        assert [f.result(timeout=WAIT).json()["choices"][0]["text"] for f in admitted] == [expected, expected]
        wait_for(lambda: service.admitted == 0, "the queue to drain")
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=WAIT).json()["choices"][0]["text"] == expected


def test_a_client_that_goes_away_frees_its_slot(tiny_checkpoint, ref):
    with running_server(tiny_checkpoint, max_batch=1) as (url, service), gate(service) as g:
        reqs = spy_on_add(service)
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 100, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=WAIT) as r:
            g.allow(2)  # the request joins and decodes a few tokens, then the engine holds still
            wait_for(lambda: reqs and len(reqs[0].output) >= 2, "the first tokens")
            assert next(r.iter_lines()).startswith("data: ")
        wait_for(lambda: reqs[0].cancelled, "the server to cancel the request")
        g.allow(float("inf"))
        wait_for(lambda: reqs[0].finished, "the cancelled request to leave")
        assert reqs[0].finish_reason == "cancelled" and len(reqs[0].output) < 100
        health = httpx.get(f"{url}/health").json()
        assert (health["running"], health["admitted"]) == (0, 0)

        # the same for a client that gives up on a non-streaming answer
        g.close()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=1)
        wait_for(lambda: len(reqs) == 2 and reqs[1].cancelled, "the server to cancel the second request")
        g.allow(float("inf"))
        wait_for(lambda: reqs[1].finished, "the second request to leave")
        assert reqs[1].finish_reason == "cancelled"

        # the one slot is free again: a new request runs to the end
        messages = [{"role": "user", "content": "Hi"}]
        r = client(url).chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == ref.chat(messages, greedy(8)).text


# ---- bad input --------------------------------------------------------------------------------
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]
LONG = "context_length_exceeded"
BAD = [  # (path, body: raw bytes or JSON, status, param[, code])
    (CHAT, b'{"messages": [', 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, b"", 400, None),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": "Hello"}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "Hello"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    (CHAT, {"messages": HELLO, "max_tokens": -1}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": "8"}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": 2.5}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": 10 ** 12}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_completion_tokens": 129}, 400, "max_completion_tokens"),
    (CHAT, {"messages": HELLO, "temperature": -0.5}, 400, "temperature"),
    (CHAT, {"messages": HELLO, "temperature": 1e9}, 400, "temperature"),
    (CHAT, {"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": HELLO, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"messages": HELLO, "seed": "x"}, 400, "seed"),
    (CHAT, {"messages": HELLO, "n": 2}, 400, "n"),
    (CHAT, {"messages": HELLO, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": HELLO, "stop": ""}, 400, "stop"),
    (CHAT, {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (CHAT, {"messages": HELLO, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    (CHAT, {"messages": [{"role": "user", "content": "Hello " * 200}]}, 400, "messages", LONG),
    (TEXT, {}, 400, "prompt"),
    (TEXT, {"prompt": 5}, 400, "prompt"),
    (TEXT, {"prompt": []}, 400, "prompt"),
    (TEXT, {"prompt": [1, 2, 100000]}, 400, "prompt"),
    (TEXT, {"prompt": [1, -2]}, 400, "prompt"),
    (TEXT, {"prompt": ["a", "b"]}, 400, "prompt"),
    (TEXT, {"prompt": list(range(3, 131))}, 400, "prompt", LONG),
    (TEXT, {"prompt": "Hello", "echo": True}, 400, "echo"),
    (TEXT, {"prompt": "x" * (2 << 20)}, 413, None),
]


@pytest.mark.parametrize("case", BAD, ids=[f"{i}-{b[0].split('/')[-1]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, case):
    url, service = server
    path, body, status, param, code = (*case, None)[:5]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=WAIT)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["code"] == code
    assert service.admitted == 0
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=WAIT)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_unknown_routes_and_methods_answer_in_the_same_shape(server):
    url, _ = server
    for r, status in ((httpx.get(f"{url}/v1/nothing"), 404), (httpx.get(f"{url}{CHAT}"), 405)):
        assert r.status_code == status and r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


# ---- the API key ------------------------------------------------------------------------------
def test_api_key(tiny_checkpoint, server):
    open_url, _ = server
    assert client(open_url, api_key="anything").models.list().data  # no key set: any or none is fine
    assert httpx.get(f"{open_url}/v1/models").status_code == 200

    with running_server(tiny_checkpoint, max_batch=2, api_key="s3cret") as (url, _):
        r = client(url, api_key="s3cret").chat.completions.create(model="m", messages=HELLO, max_tokens=3)
        assert r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").chat.completions.create(model="m", messages=HELLO, max_tokens=3)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(f"{url}{CHAT}", json={"messages": HELLO}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/health").status_code == 200  # open, for load balancers


# ---- the command line -------------------------------------------------------------------------
def test_generate_py_serve_then_sigterm_exits_cleanly(tiny_checkpoint, ref):
    env = {**os.environ, "BITNET_API_KEY": "k3y", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), str(tiny_checkpoint), "--serve",
                             "--port", "0", "--max-batch", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
        first = lines.get(timeout=WAIT)
        url = re.search(r"http://127\.0\.0\.1:\d+/v1", first).group(0)
        assert "tiny-bitnet" in first

        messages = [{"role": "user", "content": "Hello"}]
        r = openai.OpenAI(base_url=url, api_key="k3y", timeout=WAIT).chat.completions.create(
            model="tiny-bitnet", messages=messages, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == ref.chat(messages, greedy(8)).text
        assert httpx.get(f"{url}/models").status_code == 401

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("flags", [["--serve", "--port", "70000"], ["--serve", "--max-batch", "0"],
                                   ["--serve", "--prompt", "hi"]])
def test_generate_py_refuses_bad_server_flags(tiny_checkpoint, flags, capsys):
    import generate

    with pytest.raises(SystemExit) as exit:
        generate.main([str(tiny_checkpoint), *flags])
    assert exit.value.code == 2 and "error" in capsys.readouterr().err


# ---- the serving benchmark, end to end on the CPU ---------------------------------------------
def test_bench_serve_runs_on_the_cpu(tiny_checkpoint, server, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # the random model's tokenizer streams every token as its own piece of text
    decoder = bench.word_tokenizer(tmp_path, 1000).stream_decoder()
    assert [decoder.push(i) for i in (5, 999, 0)] == ["<5>", " <999>", " <0>"]

    url, _ = server
    for where in (["--checkpoint", str(tiny_checkpoint), "--device", "cpu"],   # a server started by the bench
                  ["--url", f"{url}/v1", "--vocab", "280"]):                     # a running one
        out = tmp_path / "bench.json"
        assert bench.main([*where, "--clients", "1", "3", "--rounds", "2", "--prompt-tokens", "8",
                           "--max-tokens", "6", "--json", str(out)]) == 0
        rows = json.loads(out.read_text())["rows"]
        assert [(r["clients"], r["requests"], r["output_tokens"], r["errors"]) for r in rows] == [
            (1, 2, 2 * 6, []), (3, 6, 6 * 6, [])]
        assert all(r["output_tok_s"] > 0 and 0 < r["ttft_ms_p50"] <= r["ttft_ms_p99"] for r in rows)
