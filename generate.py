#!/usr/bin/env python3
"""Generate text with a converted BitNet b1.58 checkpoint: one answer, an interactive chat, or an
OpenAI-compatible HTTP server."""

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.checkpoint import CheckpointError, find_checkpoints
from engine.convert import ConvertError, convert, default_output, read_source_info
from engine.tokenizer import TokenizerError

DEFAULT_CHECKPOINT = "checkpoints"
HELP_COMMANDS = ("commands:\n"
                 "  /reset         forget the conversation (the --system message stays)\n"
                 "  /exit, /quit   leave (so do Ctrl-D and Ctrl-C at the prompt)\n"
                 "  /help          this list\n"
                 "Ctrl-C while an answer is printing stops that answer.")

EPILOG = f"""\
examples:
  python generate.py ./checkpoints --interactive            chat with the model in ./checkpoints
  python generate.py --prompt "The capital of France is"    one answer (CHECKPOINT defaults to checkpoints/)
  python generate.py checkpoints/bitnet-b1.58-2B-4T --prompt "Write a haiku" --temperature 0.9 --seed 1
  echo "Summarize: ..." | python generate.py                the prompt read from a pipe
  python generate.py --prompt - < question.txt              the prompt read from a file
  python generate.py --no-chat --prompt "def fib(n):" --greedy --stop $'\\n\\n'
  python generate.py models/bitnet-b1.58-2B-4T              a Hugging Face download: converted once
                                                            into checkpoints/<name>, then used
  python generate.py ./checkpoints --serve --device cuda    an OpenAI-compatible HTTP server on
                                                            http://127.0.0.1:8000/v1 (see README)

CHECKPOINT may be a converted checkpoint, a folder holding converted checkpoints (you are asked
which one when it holds several), or a Hugging Face BitNet model directory. Get a model with:
  python convert_checkpoint.py microsoft/bitnet-b1.58-2B-4T

modes: --prompt TEXT answers once and exits; --interactive chats; --serve answers HTTP requests
until SIGINT/SIGTERM (the sampling options then come from each request). Without any of them, a
piped stdin is read as the prompt, and a terminal gets the interactive chat. Answers go to
stdout; notes and the speed line ("[N prompt tokens, M generated; prefill ... tok/s, decode ...
tok/s]") go to stderr.

chat vs plain: with --chat (the default when the tokenizer has a chat template) the input is
wrapped in the model's chat format, and --interactive keeps the conversation, dropping the oldest
exchanges when it outgrows the context. With --no-chat the text is continued as it is, and each
interactive line is a separate prompt.

interactive {HELP_COMMANDS}

exit status: 0 done, 1 an error (damaged checkpoint, failed conversion, prompt too long, ...),
2 a usage problem (bad option value, no model found, several models and no terminal to ask),
130 interrupted. --serve exits 0 when SIGINT or SIGTERM stops it.
"""

NO_MODEL_HELP = """\
Download and convert one first:
  pip install -U huggingface_hub        (only if needed)
  python convert_checkpoint.py microsoft/bitnet-b1.58-2B-4T
or, from a local download:
  hf download microsoft/bitnet-b1.58-2B-4T --local-dir models/bitnet-b1.58-2B-4T
  python convert_checkpoint.py models/bitnet-b1.58-2B-4T"""


class CliExit(Exception):
    """Stop with a message on stderr and an exit status."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class MessageTooLong(Exception):
    """Even the system message plus the new user message leave no room for the answer."""

    def __init__(self, tokens: int):
        super().__init__(f"{tokens} tokens")
        self.tokens = tokens


# ---- arguments --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_CHECKPOINT, metavar="CHECKPOINT",
                   help="a converted checkpoint, a folder of them, or a Hugging Face BitNet model directory "
                        "(converted on the fly into checkpoints/<name>); default: %(default)s")

    mode = p.add_argument_group("mode").add_mutually_exclusive_group()
    mode.add_argument("--prompt", "-p", metavar="TEXT",
                      help='answer TEXT once and exit; "-" reads the prompt from stdin (trailing newlines removed)')
    mode.add_argument("--interactive", "-i", action="store_true",
                      help="chat: type a message, read the answer, repeat; /help lists the commands")
    mode.add_argument("--serve", action="store_true",
                      help="serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models, /health) "
                           "over HTTP until SIGINT/SIGTERM; requests run in one continuous batch")

    srv = p.add_argument_group("server (with --serve)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on; 0.0.0.0 opens the server to the network (default: %(default)s)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    srv.add_argument("--api-key", metavar="KEY", default=os.environ.get("BITNET_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on /v1/ requests (401 otherwise); default: the "
                          "BITNET_API_KEY environment variable, else no key")
    srv.add_argument("--max-batch", type=int, metavar="N",
                     help="requests decoded together, each with a KV cache over the whole context "
                          "(default: 16 on cuda, 4 on cpu)")
    srv.add_argument("--max-queue", type=int, metavar="N",
                     help="requests admitted at once, running or waiting for a batch slot; beyond that, "
                          "429 with Retry-After (default: 4 x --max-batch)")

    fmt = p.add_argument_group("prompt format")
    fmt.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap prompts in the chat format (default: on when the tokenizer has a chat template); "
                          "--no-chat continues the raw text instead (with BOS)")
    fmt.add_argument("--system", metavar="TEXT", help="a system message that starts every chat conversation")

    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", "-t", type=float, default=0.7, metavar="T",
                   help="randomness; 0 always picks the likeliest token (default: %(default)s)")
    s.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest tokens only; 0: off (default: %(default)s)")
    s.add_argument("--top-p", type=float, default=0.95, metavar="P",
                   help="nucleus sampling: the smallest set of tokens holding this much probability; 1: off "
                        "(default: %(default)s)")
    s.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="> 1 discourages tokens already seen in the prompt or answer; 1: off (default: %(default)s)")
    s.add_argument("--seed", type=int, metavar="N", help="random seed: the same seed and prompt give the same answer")
    s.add_argument("--max-new-tokens", "-n", type=int, default=512, metavar="N",
                   help="stop an answer after this many tokens (default: %(default)s)")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop the answer where TEXT appears (not printed); repeatable. For a newline in bash: "
                        "--stop $'\\n'")
    s.add_argument("--greedy", action="store_true", help="deterministic: same as --temperature 0")

    h = p.add_argument_group("hardware")
    h.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: %(default)s)")
    h.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="activation precision (default: float32 on cpu)")
    h.add_argument("--head", choices=("bf16", "int8"), default="bf16",
                   help="LM head weights: bf16 is the checkpoint's table as it is (exact to the checkpoint); "
                        "int8 quantizes it per vocabulary row (one fp32 scale each), which halves the memory "
                        "the head reads per generated token (the largest single read of a decode step) at a "
                        "small accuracy cost: logits move slightly and a near-tie for the likeliest token can "
                        "flip (default: %(default)s)")
    return p


def build_params(args: argparse.Namespace) -> SamplingParams:
    """The engine's SamplingParams from the command line; raises ValueError for bad values."""
    return SamplingParams(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, stop=list(args.stop))


# ---- finding the model -------------------------------------------------------------------------
def is_hf_model_dir(path: Path) -> bool:
    """A Hugging Face model directory: config.json and safetensors weights (not necessarily BitNet)."""
    return (path.is_dir() and (path / "config.json").is_file()
            and (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()))


def no_model_message(path: Path, given: str) -> str:
    """What to run when CHECKPOINT holds no converted model."""
    hints = []
    if not path.exists():
        where = f"no converted model found: {given} does not exist."
        if Path(given) != Path(DEFAULT_CHECKPOINT):  # likely a prompt typed as the positional argument
            hints.append("(to pass a prompt, use --prompt TEXT)")
    elif path.is_dir():
        where = f"no converted model found in {given.rstrip('/')}/."
        unconverted = sorted(p for p in path.iterdir() if is_hf_model_dir(p))
        if unconverted:
            hints.append("It holds Hugging Face model directories; give one to convert and use it:")
            hints += [f"  python generate.py {p}" for p in unconverted]
    else:
        where = f"no converted model found: {given} is a file, not a checkpoint directory."
    return "\n".join([f"{where} {NO_MODEL_HELP}"] + hints)


def choose(found: list[Path]) -> Path:
    """Ask on the terminal which of several checkpoints to use (re-asks on bad input)."""
    print("several converted checkpoints found:", file=sys.stderr)
    for k, p in enumerate(found, 1):
        print(f"  {k}. {p}", file=sys.stderr)
    while True:
        sys.stderr.write(f"which one? [1-{len(found)}]: ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            raise CliExit(2, "\nno checkpoint chosen")
        answer = line.strip()
        if answer.isdigit() and 1 <= int(answer) <= len(found):
            return found[int(answer) - 1]
        named = [p for p in found if answer and answer in (p.name, str(p))]
        if named:
            return named[0]
        print(f"please type a number from 1 to {len(found)}", file=sys.stderr)


def convert_on_the_fly(src: Path) -> Path:
    """Convert a Hugging Face model directory into checkpoints/<name> once; reuse it afterwards."""
    try:
        read_source_info(src)
    except ConvertError as e:
        raise CliExit(1, f"error: {src} cannot be converted: {e}") from None
    out = default_output(str(src.resolve()))
    if out.resolve() == src.resolve():  # the download itself sits at checkpoints/<name>
        out = out.with_name(out.name + "-converted")
    if find_checkpoints(out) == [out]:
        return out
    if out.exists():
        raise CliExit(1, f"error: {out} exists but is not a converted checkpoint; move it away, or convert "
                         f"elsewhere: python convert_checkpoint.py {src} --output OTHER_FOLDER")
    print(f"converting {src} into {out} once; next time run: python generate.py {out}", file=sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # convert() prints notes; stdout is for the answer
            return convert(str(src), out, progress=sys.stderr.isatty())
    except (ConvertError, CheckpointError, OSError) as e:
        raise CliExit(1, f"error: conversion failed: {e}") from None


def resolve_checkpoint(given: str, can_ask: bool) -> Path:
    """CHECKPOINT argument -> the directory of one converted checkpoint, or CliExit."""
    path = Path(given).expanduser()
    found = find_checkpoints(path)
    if len(found) == 1:
        return found[0]
    if found:
        if can_ask:
            return choose(found)
        listing = "\n".join(f"  {p}" for p in found)
        raise CliExit(2, f"{given} holds several converted checkpoints:\n{listing}\n"
                         f"pass one of these paths, e.g.: python generate.py {found[0]}")
    if is_hf_model_dir(path):
        return convert_on_the_fly(path)
    raise CliExit(2, no_model_message(path, given))


def load_model(path: Path, device: str, dtype: str | None, head: str = "bf16") -> LLM:
    print(f"loading {path} ...", file=sys.stderr)
    try:
        return LLM(path, device=device, dtype=getattr(torch, dtype) if dtype else None, head=head)
    # RuntimeError: device not available; ValueError: e.g. a head the kernels cannot take
    except (CheckpointError, TokenizerError, OSError, RuntimeError, ValueError) as e:
        raise CliExit(1, f"error: {e}") from None


# ---- generation --------------------------------------------------------------------------------
def stream_completion(llm: LLM, prompt_ids: list[int], params: SamplingParams, out=None):
    """Print the answer piece by piece as it is decoded; return the engine's Completion."""
    out = out or sys.stdout
    gen = llm.stream(prompt_ids, params)
    try:
        while True:
            try:
                piece = next(gen)
            except StopIteration as stop:
                return stop.value
            out.write(piece)
            out.flush()
    finally:
        gen.close()


def encode_prompt(llm: LLM, text: str, chat: bool, system: str | None) -> list[int]:
    if not chat:
        return llm.encode(text)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return llm.tokenizer.encode_chat(messages)


def run_once(llm: LLM, text: str, params: SamplingParams, chat: bool, system: str | None) -> int:
    """One prompt -> its answer on stdout, the stats line on stderr."""
    try:
        ids = encode_prompt(llm, text, chat, system)
        stream_completion(llm, ids, params)
    except (ValueError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print("[interrupted]", file=sys.stderr)
        return 130
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(llm.last_stats.line(), file=sys.stderr)
    return 0


def answer_room(llm: LLM, params: SamplingParams) -> int:
    """Tokens kept free for the answer when fitting a conversation: --max-new-tokens, at most half the context."""
    return max(1, min(params.max_new_tokens, llm.context_length // 2))


def fit_conversation(llm: LLM, system: list[dict], history: list[dict], user: dict,
                     limit: int) -> tuple[list[int], int]:
    """Prompt ids for system + history + user within `limit` tokens, dropping the oldest user/assistant
    pairs from `history` (in place) as needed. Returns (ids, pairs dropped). Raises MessageTooLong,
    leaving history untouched, when even system + user alone do not fit."""
    alone = llm.tokenizer.encode_chat(system + [user])
    if len(alone) > limit:
        raise MessageTooLong(len(alone))
    dropped = 0
    while True:
        ids = alone if not history else llm.tokenizer.encode_chat(system + history + [user])
        if len(ids) <= limit:
            return ids, dropped
        del history[:2]
        dropped += 1


class ChatSession:
    """An interactive session's state: the conversation (chat mode) and where text goes."""

    def __init__(self, llm: LLM, params: SamplingParams, chat: bool, system: str | None, out, err):
        self.llm, self.params, self.chat, self.out, self.err = llm, params, chat, out, err
        self.system = [{"role": "system", "content": system}] if (chat and system) else []
        self.history: list[dict] = []  # alternating user / assistant messages
        self.room = answer_room(llm, params)
        self.limit = llm.context_length - self.room

    def note(self, text: str) -> None:
        print(text, file=self.err)

    def prompt_ids(self, user: dict) -> list[int] | None:
        """The chat prompt for a new user message, old exchanges dropped as needed; None: not sendable."""
        try:
            ids, dropped = fit_conversation(self.llm, self.system, self.history, user, self.limit)
        except MessageTooLong as e:
            self.note(f"[your message takes {e.tokens} tokens with the chat format; at most {self.limit} fit "
                      f"(context {self.llm.context_length} minus {self.room} kept for the answer); it was not sent]")
            return None
        if dropped:
            self.note(f"[dropped the {dropped} oldest exchange{'s' if dropped > 1 else ''} "
                      f"to fit the {self.llm.context_length}-token context]")
        return ids

    def answer(self, text: str) -> None:
        """Stream the answer to one input line; in chat mode the exchange joins the conversation."""
        if not self.chat:
            ids, user = self.llm.encode(text), None
        else:
            user = {"role": "user", "content": text}
            ids = self.prompt_ids(user)
            if ids is None:
                return
        completion = stream_completion(self.llm, ids, self.params, self.out)
        self.out.write("\n")
        self.out.flush()
        self.note(self.llm.last_stats.line())
        if user is not None:
            self.history += [user, {"role": "assistant", "content": completion.text}]


def chat_loop(llm: LLM, params: SamplingParams, chat: bool, system: str | None = None,
              read=input, out=None, err=None) -> int:
    """The interactive session. `read(prompt)` returns a line and raises EOFError at the end (input())."""
    session = ChatSession(llm, params, chat, system, out or sys.stdout, err or sys.stderr)
    if chat:
        session.note(f"chat mode; context {llm.context_length} tokens. /help for commands, /exit or Ctrl-D to quit.")
    else:
        session.note("plain completion mode: each line is a prompt for the model to continue (no history). "
                     "/help for commands, /exit or Ctrl-D to quit.")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            session.out.write("\n")
            session.out.flush()
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and " " not in text:  # a command (a message may still start with "/ ...")
            command = text.lower()
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                session.history.clear()
                session.note("[conversation cleared]")
            elif command == "/help":
                session.note(HELP_COMMANDS)
            else:
                session.note(f"unknown command {text}; /help lists the commands")
            continue
        try:
            session.answer(text)
        except KeyboardInterrupt:  # neither the user turn nor the partial answer enters the history
            session.out.write("\n")
            session.out.flush()
            session.note("[interrupted]")
        except (ValueError, TokenizerError) as e:
            session.note(f"error: {e}")


def check_server_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in the --serve defaults and refuse impossible values before the model loads."""
    if args.max_batch is None:
        args.max_batch = 16 if args.device == "cuda" else 4
    if args.max_queue is None:
        args.max_queue = 4 * args.max_batch
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1 or args.max_queue < 1:
        parser.error("--max-batch and --max-queue must be at least 1")
    if args.api_key == "":
        parser.error("--api-key must not be empty")


def read_stdin_prompt() -> str:
    return sys.stdin.read().rstrip("\r\n")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        params = build_params(args)
    except ValueError as e:
        parser.error(str(e))
    if args.serve:
        check_server_args(parser, args)
    if args.prompt is not None or args.serve:
        interactive = False
    elif args.interactive:
        interactive = True
    else:
        interactive = sys.stdin.isatty()

    try:
        path = resolve_checkpoint(args.checkpoint, can_ask=sys.stdin.isatty())
        text = None
        if not interactive and not args.serve:
            text = read_stdin_prompt() if args.prompt in (None, "-") else args.prompt
            if not text.strip():
                raise CliExit(2, "error: the prompt is empty")
        llm = load_model(path, args.device, args.dtype, args.head)
    except CliExit as e:
        print(e.message, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130

    if args.serve:
        from engine.server import serve
        return serve(llm, args.host, args.port, model_name=path.name, max_batch=args.max_batch,
                     max_queue=args.max_queue, api_key=args.api_key)
    chat = llm.tokenizer.has_chat_template if args.chat is None else args.chat
    if args.system and not chat:
        print("note: --system is ignored in plain completion mode (--no-chat, or no chat template)", file=sys.stderr)
    try:
        if interactive:
            if sys.stdin.isatty():
                try:
                    import readline  # noqa: F401  (line editing and history for input())
                except ImportError:
                    pass
            return chat_loop(llm, params, chat, args.system)
        return run_once(llm, text, params, chat, args.system)
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
