"""Text <-> token ids for BitNet checkpoints, plus chat-prompt rendering and streaming detokenization.

Three backends, picked by the files in the checkpoint directory:
  tokenizer.json                 -> HF `tokenizers` (e.g. microsoft/bitnet-b1.58-2B-4T, Llama-3 BPE)
  tokenizer.model (tiktoken)     -> `tiktoken` with the Llama-3 pre-tokenizer and 256 specials
  tokenizer.model (SentencePiece)-> `sentencepiece` (Llama-2 style, e.g. 1bitLLM) + added_tokens.json
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Tokenizer", "StreamDecoder", "TokenizerError", "load_tokenizer"]


class TokenizerError(Exception):
    """Missing/unreadable tokenizer files, bad chat messages, or a template that raised."""


# Llama-3 pre-tokenizer split pattern (same regex as in the 2B-4T tokenizer.json).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Tokens that end a turn or a document in the vocabularies we meet; generation stops on any present.
END_TOKEN_NAMES = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "</s>", "<|endoftext|>", "<|eom_id|>")
CHAT_ROLES = ("system", "user", "assistant")
_REPLACEMENT = "\ufffd"


def _llama3_special_names(n: int = 256) -> list[str]:
    """Meta's Llama-3 layout of the specials that follow the BPE ranks."""
    names = ["<|begin_of_text|>", "<|end_of_text|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(4)]
    names += ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, n - 5)]
    return names


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet (char -> byte), so tiktoken can answer token_to_id("Ġthe") like tokenizer.json."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


# ----------------------------------------------------------------------------------------------
# Backends: each maps text <-> ids and knows its vocabulary and which ids are special.


class _Backend(Protocol):
    vocab_size: int
    special_ids: set[int]

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...


class _HFBackend:
    def __init__(self, path: Path) -> None:
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str) -> list[int]:
        # No post-processor specials (BOS is the caller's choice); added/special tokens in text still split out.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # `tokenizers` defaults skip_special_tokens=True, so always pass it explicitly.
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


class _TiktokenBackend:
    def __init__(self, path: Path, added_tokens_decoder: dict[str, Any]) -> None:
        import tiktoken

        ranks: dict[bytes, int] = {}
        for line in path.read_bytes().splitlines():
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        n = len(ranks)
        specials = {name: n + i for i, name in enumerate(_llama3_special_names())}
        # A tokenizer_config.json beside the ranks file is the authority on special names/ids.
        by_id = {v: k for k, v in specials.items()}
        for sid, entry in added_tokens_decoder.items():
            content = entry["content"] if isinstance(entry, dict) else str(entry)
            if int(sid) >= n:
                by_id[int(sid)] = content
        specials = {name: i for i, name in by_id.items()}
        self._enc = tiktoken.Encoding(path.parent.name or "bpe", pat_str=LLAMA3_PATTERN,
                                      mergeable_ranks=ranks, special_tokens=specials)
        self._ranks = ranks
        self._specials = specials
        self._special_names = by_id
        self.vocab_size: int = self._enc.n_vocab
        self.special_ids = set(by_id)
        self._byte_of = _byte_level_decoder()
        self._char_of = {b: c for c, b in self._byte_of.items()}
        self._id_to_bytes = {i: b for b, i in ranks.items()}

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all", disallowed_special=())

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # Unknown ids (e.g. padded embedding rows) are dropped instead of raising, like `tokenizers` does.
        keep = [i for i in ids if (i in self._id_to_bytes) or (i in self.special_ids and not skip_special_tokens)]
        return self._enc.decode_bytes(keep).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        # Accept the byte-level spelling tokenizer.json uses (e.g. "Ġthe" for b" the").
        if all(c in self._byte_of for c in token):
            return self._ranks.get(bytes(self._byte_of[c] for c in token))
        return None

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._special_names:
            return self._special_names[token_id]
        raw = self._id_to_bytes.get(token_id)
        return None if raw is None else "".join(self._char_of[b] for b in raw)


class _SentencePieceBackend:
    def __init__(self, path: Path, added: dict[str, int]) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        n = self._sp.get_piece_size()
        self._n = n
        self._added = {tok: i for tok, i in added.items() if i >= n}  # ids < n are already sp pieces
        self._added_by_id = {i: tok for tok, i in self._added.items()}
        sp_specials = {i for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.pad_id())
                       if 0 <= i < n}
        self.special_ids = sp_specials | set(self._added_by_id)
        self.vocab_size: int = max([n, *(i + 1 for i in self._added_by_id)])
        # sp.encode would spell "<s>" etc. as plain characters: split these strings out first.
        names = {self._sp.id_to_piece(i) for i in sp_specials} | set(self._added)
        alternatives = "|".join(re.escape(s) for s in sorted(names, key=len, reverse=True))
        self._split_re = re.compile(f"({alternatives})" if alternatives else r"(?!)")  # (?!) never matches

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, chunk in enumerate(self._split_re.split(text)):
            if k % 2:  # odd pieces are the captured special strings
                ids.append(self.token_to_id(chunk))  # type: ignore[arg-type]
            elif chunk:
                # Each chunk gets sentencepiece's dummy prefix, as HF's (legacy) Llama tokenizer does;
                # decode strips it again per chunk, so text round-trips.
                ids.extend(self._sp.encode(chunk))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids:
                out.append(self._sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self.id_to_token(i) or "")
            elif 0 <= i < self._n:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None  # unknown pieces map to unk

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._added_by_id:
            return self._added_by_id[token_id]
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self._n else None


# ----------------------------------------------------------------------------------------------


class StreamDecoder:
    """Incremental detokenizer: emits text only once it ends on a whole character.

    Decodes the window ids[prefix:] and compares it with ids[prefix:read] (the text already emitted,
    re-decoded from the same start), so the work per token stays small and decoders that strip a
    leading space at the start of a sequence (SentencePiece) don't lose or add spaces.
    """

    _MAX_PENDING = 8  # a UTF-8 char spans <= 4 byte tokens; beyond this the bytes are truly invalid

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this have been emitted

    def _pending_text(self) -> str:
        done = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        full = self._tok.decode(self._ids[self._prefix:], self._skip)
        return full[len(done):] if len(full) > len(done) else ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        new = self._pending_text()
        if not new or (new.endswith(_REPLACEMENT) and len(self._ids) - self._read < self._MAX_PENDING):
            return ""  # nothing yet, or a character split across tokens: wait for its remaining bytes
        self._prefix, self._read = self._read, len(self._ids)
        return new

    def flush(self) -> str:
        new = self._pending_text()
        self._prefix = self._read = len(self._ids)
        return new


class Tokenizer:
    def __init__(self, backend: _Backend, *, bos_token: str | None, eos_token: str | None,
                 chat_template: str | None) -> None:
        self._b = backend
        self.vocab_size: int = backend.vocab_size
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_id: int | None = backend.token_to_id(bos_token) if bos_token else None
        self.eos_id: int | None = backend.token_to_id(eos_token) if eos_token else None
        self.has_chat_template: bool = chat_template is not None
        self._template = _compile_template(chat_template) if chat_template is not None else None

    # -- ids ------------------------------------------------------------------------------------
    def end_token_ids(self) -> list[int]:
        ids = {self.token_to_id(name) for name in END_TOKEN_NAMES} | {self.eos_id}
        return sorted(i for i in ids if i is not None)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._b.encode(text)
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._b.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._b.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._b.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._b.special_ids

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        _validate_messages(messages)
        if self._template is not None:
            try:
                return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             bos_token=self.bos_token or "", eos_token=self.eos_token or "")
            except TokenizerError:
                raise
            except Exception as e:  # jinja errors, sandbox violations
                raise TokenizerError(f"chat template failed to render: {e}") from e
        # Built-in BitNet format (same shape as the 2B-4T template).
        end = "<|eot_id|>" if self.token_to_id("<|eot_id|>") is not None else (self.eos_token or "")
        parts = [self.bos_token or ""]
        parts += [f"{m['role'].capitalize()}: {m['content']}{end}" for m in messages]
        if add_generation_prompt:
            parts.append("Assistant: ")
        return "".join(parts)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # Templates like 2B-4T's emit bos_token themselves; encode() adds BOS only if it isn't already there.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=True)


def _validate_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("chat messages must be a non-empty list of {'role', 'content'} dicts")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"message {k} must be a dict, got {type(m).__name__}")
        if m.get("role") not in CHAT_ROLES:
            raise TokenizerError(f"message {k} has role {m.get('role')!r}; expected one of {CHAT_ROLES}")
        if not isinstance(m.get("content"), str):
            raise TokenizerError(f"message {k} content must be a str, got {type(m.get('content')).__name__}")


def _compile_template(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except Exception as e:
        raise TokenizerError(f"invalid chat template: {e}") from e


# ----------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e


def _token_str(value: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _is_tiktoken_file(path: Path) -> bool:
    """A tiktoken ranks file is text lines "<base64> <rank>"; a SentencePiece model is binary protobuf."""
    with path.open("rb") as f:
        first = f.readline(4096)
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first) is not None


def _find_chat_template(directory: Path, config: dict) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():  # newer checkpoints store the template here; it wins over the config copy
        return jinja_file.read_text(encoding="utf-8")
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None


def load_tokenizer(directory: str | Path) -> Tokenizer:
    directory = Path(directory)
    config = _read_json(directory / "tokenizer_config.json")
    tok_json, tok_model = directory / "tokenizer.json", directory / "tokenizer.model"

    backend: _Backend
    try:
        if tok_json.is_file():
            backend = _HFBackend(tok_json)
        elif tok_model.is_file():
            if _is_tiktoken_file(tok_model):
                backend = _TiktokenBackend(tok_model, config.get("added_tokens_decoder") or {})
            else:
                added = {e["content"]: int(i) for i, e in (config.get("added_tokens_decoder") or {}).items()
                         if isinstance(e, dict) and "content" in e}
                added.update(_read_json(directory / "added_tokens.json"))
                backend = _SentencePieceBackend(tok_model, added)
        else:
            raise TokenizerError(
                f"no tokenizer found in {directory}: looked for tokenizer.json and tokenizer.model")
    except TokenizerError:
        raise
    except Exception as e:
        raise TokenizerError(f"failed to load tokenizer from {directory}: {e}") from e

    # bos/eos: tokenizer_config.json (a key present, even null, decides), then special_tokens_map.json,
    # then what the backend itself knows.
    special_map = _read_json(directory / "special_tokens_map.json")

    def resolve(key: str, fallbacks: tuple[str, ...]) -> str | None:
        for source in (config, special_map):
            if key in source:
                return _token_str(source[key])
        if isinstance(backend, _SentencePieceBackend):
            sp = backend._sp
            i = sp.bos_id() if key == "bos_token" else sp.eos_id()
            if i >= 0:
                return sp.id_to_piece(i)
        return next((name for name in fallbacks if backend.token_to_id(name) is not None), None)

    bos = resolve("bos_token", ("<|begin_of_text|>", "<s>"))
    eos = resolve("eos_token", ("<|end_of_text|>", "</s>", "<|endoftext|>"))
    return Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=_find_chat_template(directory, config))
