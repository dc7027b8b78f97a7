"""generate.py driven as a user would: subprocesses on the tiny checkpoint (CPU), plus in-process
tests of the interactive loop for what a pipe cannot do (Ctrl-C, context overflow, the TTY menu)."""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
from engine import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "generate.py"
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}
GREEDY = ["--greedy", "--max-new-tokens", "8"]


def run(*args, cwd=ROOT, stdin: str = "") -> tuple[int, str, str]:
    """generate.py with `args`; stdin is a pipe (never a TTY). Bytes are decoded exactly (no newline translation)."""
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, input=stdin.encode(),
                       capture_output=True, timeout=120, env=ENV)
    return p.returncode, p.stdout.decode("utf-8"), p.stderr.decode("utf-8")


def n_stats(stderr: str) -> int:
    return stderr.count("prompt tokens")


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(tiny_checkpoint)


def greedy_params(**kw) -> SamplingParams:
    # generate.py's defaults with --greedy --max-new-tokens 8
    return SamplingParams(**{"temperature": 0.0, "top_p": 0.95, "max_new_tokens": 8, **kw})


def chat_answer(llm, *turns: str, params=None) -> list[str]:
    """The answers of a conversation, computed with the Python API."""
    messages, answers = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        answers.append(llm.chat(messages, params or greedy_params()).text)
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


# ---- one-shot ----------------------------------------------------------------------------------
def test_one_shot_greedy_matches_the_api(tiny_checkpoint, llm):
    rc, out, err = run(tiny_checkpoint, "--prompt", "Hello", *GREEDY)
    assert rc == 0, err
    (expected,) = chat_answer(llm, "Hello")  # the tiny tokenizer has a chat template: chat mode by default
    assert expected.strip()
    assert out == expected + "\n"
    assert n_stats(err) == 1 and "Traceback" not in err


def test_seeded_sampling_and_prompt_from_stdin(tiny_checkpoint, llm):
    flags = ["--temperature", "1", "--seed", "7", "--max-new-tokens", "12"]
    rc1, out1, err1 = run(tiny_checkpoint, "--prompt", "-", *flags, stdin="Hello\n")
    rc2, out2, err2 = run(tiny_checkpoint, *flags, stdin="Hello\n")  # no --prompt, piped stdin
    assert rc1 == rc2 == 0, err1 + err2
    assert out1 == out2
    (expected,) = chat_answer(llm, "Hello", params=SamplingParams(temperature=1.0, top_p=0.95, seed=7,
                                                                      max_new_tokens=12))
    assert out1 == expected + "\n"
    assert n_stats(err1) == n_stats(err2) == 1


def test_plain_completion_with_no_chat(tiny_checkpoint, llm):
    rc, out, err = run(tiny_checkpoint, "--no-chat", "--prompt", "The quick brown", *GREEDY)
    assert rc == 0, err
    assert out == llm.generate("The quick brown", greedy_params())[0].text + "\n"


# ---- interactive -------------------------------------------------------------------------------
def test_flagship_interactive_keeps_the_conversation(tmp_path, tiny_checkpoint, llm):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "tiny-bitnet").symlink_to(tiny_checkpoint, target_is_directory=True)
    rc, out, err = run("./checkpoints", "--interactive", *GREEDY, cwd=tmp_path,
                       stdin="Hi\nHow are you?\n/reset\nHi\n")  # then EOF (Ctrl-D)
    assert rc == 0, err
    a1, a2 = chat_answer(llm, "Hi", "How are you?")
    # "/reset" gets a prompt and no answer; the last "Hi" starts a fresh conversation; EOF prints a newline
    assert out == f"> {a1}\n> {a2}\n> > {a1}\n> \n"
    assert n_stats(err) == 3 and "Traceback" not in err


def test_interactive_plain_mode_commands_and_exit(tiny_checkpoint, llm):
    rc, out, err = run(tiny_checkpoint, "-i", "--no-chat", *GREEDY, stdin="Hi\n\n/help\nHi\n/exit\nHello\n")
    assert rc == 0, err
    answer = llm.generate("Hi", greedy_params())[0].text  # no history in plain mode: the same answer twice
    assert out == f"> {answer}\n> > > {answer}\n> "  # empty line ignored, /help answered on stderr
    assert "/reset" in err and n_stats(err) == 2  # nothing after /exit


# ---- finding the checkpoint --------------------------------------------------------------------
def test_no_model_and_several_models(tmp_path, tiny_checkpoint):
    (tmp_path / "checkpoints").mkdir()
    rc, out, err = run(cwd=tmp_path)  # default CHECKPOINT: the empty checkpoints/ folder
    assert rc == 2 and "convert_checkpoint.py" in err and "checkpoints/" in err and "Traceback" not in err

    rc, out, err = run(tmp_path / "nowhere", "--prompt", "Hi")
    assert rc == 2 and "convert_checkpoint.py microsoft/bitnet-b1.58-2B-4T" in err and "Traceback" not in err

    for name in ("model-a", "model-b"):
        (tmp_path / "checkpoints" / name).symlink_to(tiny_checkpoint, target_is_directory=True)
    rc, out, err = run("checkpoints", "--prompt", "Hi", cwd=tmp_path)  # stdin is a pipe: cannot ask
    assert rc == 2 and "model-a" in err and "model-b" in err and out == ""


def test_hugging_face_dir_is_converted_once(tmp_path, tiny_hf_dir, llm):
    rc, out, err = run(tiny_hf_dir, "--prompt", "Hello", *GREEDY, cwd=tmp_path)
    assert rc == 0, err
    converted = tmp_path / "checkpoints" / tiny_hf_dir.name
    assert "converting" in err and f"python generate.py checkpoints/{tiny_hf_dir.name}" in err
    assert generate.find_checkpoints(converted) == [converted]
    (expected,) = chat_answer(llm, "Hello")
    assert out == expected + "\n"

    rc, out2, err = run(tiny_hf_dir, "--prompt", "Hello", *GREEDY, cwd=tmp_path)
    assert rc == 0 and "converting" not in err and out2 == out


def test_damaged_checkpoint(tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = sorted(broken.glob("*.safetensors"))[0]
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    rc, out, err = run(broken, "--prompt", "Hi")
    assert rc == 1 and weights.name in err and "Traceback" not in err


def test_the_resolution_menu_on_a_terminal(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    for name in ("a", "b"):
        (tmp_path / name).symlink_to(tiny_checkpoint, target_is_directory=True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("x\n3\n2\n"))
    assert generate.resolve_checkpoint(str(tmp_path), can_ask=True) == tmp_path / "b"
    assert capsys.readouterr().err.count("which one?") == 3


# ---- errors ------------------------------------------------------------------------------------
def test_errors_exit_cleanly(tiny_checkpoint):
    rc, out, err = run(tiny_checkpoint, "--prompt", "Hi", "--device", "cuda", "--max-new-tokens", "4")
    if torch.cuda.is_available():  # on a GPU machine the kernels answer
        assert rc == 0 and "prompt tokens" in err, err
    else:
        assert rc == 1 and "cuda" in err and "Traceback" not in err

    rc, out, err = run(tiny_checkpoint, "--prompt", "Hi", "--temperature", "-1")
    assert rc == 2 and "temperature" in err and "Traceback" not in err

    long_text = "The quick brown fox jumps over the lazy dog. " * 30  # far beyond the 128-token context
    rc, out, err = run(tiny_checkpoint, "--prompt", long_text)
    assert rc == 1 and "context" in err and "Traceback" not in err and out == ""

    rc, out, err = run("--help")
    assert rc == 0 and "--interactive" in out and "examples" in out


# ---- the interactive loop in-process -----------------------------------------------------------
def scripted(lines):
    """A read() for chat_loop that returns `lines`, then raises EOFError (or an exception in the list)."""
    it = iter(lines)

    def read(prompt):
        item = next(it, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item
    return read


def test_ctrl_c_stops_the_answer_and_keeps_the_session(llm, monkeypatch):
    (fresh,) = chat_answer(llm, "How are you?")
    real_stream = llm.stream
    calls = []

    def interrupted_once(ids, params):
        calls.append(ids)
        answer = real_stream(ids, params)
        if len(calls) == 1:  # Ctrl-C after the first piece of the first answer
            yield next(answer)
            raise KeyboardInterrupt
        return (yield from answer)

    monkeypatch.setattr(llm, "stream", interrupted_once)
    out, err = io.StringIO(), io.StringIO()
    rc = generate.chat_loop(llm, greedy_params(), chat=True, read=scripted(["Hi", "How are you?"]), out=out, err=err)
    assert rc == 0 and "[interrupted]" in err.getvalue()
    # the interrupted turn left no trace: the second prompt is a fresh conversation
    assert calls[1] == llm.tokenizer.encode_chat([{"role": "user", "content": "How are you?"}])
    assert out.getvalue().endswith(f"\n{fresh}\n\n")  # (the scripted read prints no "> ")

    # Ctrl-C at the prompt leaves cleanly
    rc = generate.chat_loop(llm, greedy_params(), chat=True, read=scripted([KeyboardInterrupt()]),
                            out=io.StringIO(), err=io.StringIO())
    assert rc == 0


def test_old_turns_are_dropped_when_the_context_fills(llm, monkeypatch):
    monkeypatch.setattr(llm, "context_length", 100)  # about two exchanges of the tiny model
    limit = 100 - 8  # room is kept for --max-new-tokens 8
    sent = []
    real_stream = llm.stream

    def recording(ids, params):
        sent.append(ids)
        return (yield from real_stream(ids, params))

    monkeypatch.setattr(llm, "stream", recording)
    long_message = "The quick brown fox " * 10
    turns = ["Hi", "How are you?", "What is two plus two?", "Hi", long_message, "Thanks"]
    err = io.StringIO()
    rc = generate.chat_loop(llm, greedy_params(), chat=True, system="Be brief.", read=scripted(turns),
                            out=io.StringIO(), err=err)
    assert rc == 0
    notes = err.getvalue()
    assert "dropped the 1 oldest exchange" in notes
    assert "not sent" in notes  # the long message alone does not fit: that turn is dropped
    assert len(sent) == len(turns) - 1
    prompts = [llm.tokenizer.decode(ids) for ids in sent]
    assert all(len(ids) <= limit for ids in sent)
    assert all(p.startswith("<|begin_of_text|>System: Be brief.<|eot_id|>User: ") for p in prompts)  # system kept
    assert "User: Hi" in prompts[1] and "User: How are you?" in prompts[1]  # history while it fits
    assert "User: Hi" not in prompts[2] and "User: How are you?" in prompts[2]  # then the oldest goes
    assert all(long_message not in p for p in prompts)
    # the exchange before the rejected message survives it
    assert prompts[-1].endswith("User: Thanks<|eot_id|>Assistant: ") and "User: Hi<|eot_id|>" in prompts[-1]
