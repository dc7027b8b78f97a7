"""Tests for engine.tokenizer: the three backends, chat rendering, and streaming detokenization."""
from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import pytest

from engine.tokenizer import Tokenizer, TokenizerError, load_tokenizer

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "llama3-tokenizer"

# transformers' BitNet test prompt, tokenized with exactly one BOS.
HOW_ARE_YOU = [{"role": "user", "content": "How are you?"}]
HOW_ARE_YOU_IDS = [128000, 1502, 25, 2650, 527, 499, 30, 128009, 72803, 25, 220]

MULTILINGUAL = (
    "Hello, world! It's 12345 apples; they're $6.50 each (approx. 3.14159).\n"
    "def f(x):\n    if x > 0:\n\t\treturn x ** 2  # square\n    return -x\n\n\n"
    "Grüße aus Köln, Straße, Übermäßig schön. "
    "Voilà, ça coûte très cher à l'hôtel, n'est-ce pas? "
    "Привет, как дела? Ελληνικά γράμματα. مرحبا بالعالم. नमस्ते दुनिया। "
    "中文分词测试，你好世界。日本語のテキスト、カタカナとひらがな。한국어 텍스트입니다. "
    "Emoji: 😀 👍🏽 👩‍👩‍👧‍👦 🏳️‍🌈 🇯🇵🇫🇷 ❤️ "
    "spaces:   three  two\t\ttabs   \n  trailing   "
    "<|eot_id|>after the end token<|begin_of_text|>x"
)
STREAM_TEXT = "Family 👩‍👩‍👧‍👦 in 🇯🇵! 東京タワー, café crème brûlée, naïve façade 😀🎉 — done."


def need_assets() -> Path:
    if not (ASSETS / "tokenizer.json").is_file():
        pytest.skip(f"shared tokenizer assets not found at {ASSETS}")
    return ASSETS


@pytest.fixture(scope="module")
def hf_tok() -> Tokenizer:
    return load_tokenizer(need_assets())


@pytest.fixture(scope="module")
def tiktoken_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    src = need_assets()
    d = tmp_path_factory.mktemp("tiktoken")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(src / name, d / name)
    return load_tokenizer(d)


def _train_sentencepiece(vocab_size: int = 320) -> bytes:
    import sentencepiece as spm

    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog model token bit net ternary weight "
             "hello world inference engine stream decode user assistant system").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + rng.choice(".!?,")
             for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        # Llama-2 style normalization, so arbitrary whitespace round-trips.
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("spm")
    (d / "tokenizer.model").write_bytes(_train_sentencepiece())
    (d / "added_tokens.json").write_text(json.dumps({"<pad>": 320}))
    return d


@pytest.fixture(scope="module")
def sp_tok(sp_dir: Path) -> Tokenizer:
    return load_tokenizer(sp_dir)


# ---------------------------------------------------------------------------------------------
# tokenizer.json backend


def test_hf_chat_vector(hf_tok: Tokenizer) -> None:
    assert hf_tok.render_chat(HOW_ARE_YOU) == "<|begin_of_text|>User: How are you?<|eot_id|>Assistant: "
    assert hf_tok.encode_chat(HOW_ARE_YOU) == HOW_ARE_YOU_IDS
    assert hf_tok.has_chat_template


def test_hf_ids_and_specials(hf_tok: Tokenizer) -> None:
    assert hf_tok.vocab_size == 128256
    assert (hf_tok.bos_id, hf_tok.eos_id) == (128000, 128001)
    ends = hf_tok.end_token_ids()
    assert 128001 in ends and 128009 in ends and ends == sorted(set(ends))
    assert hf_tok.token_to_id("<|eot_id|>") == 128009
    assert hf_tok.token_to_id("no-such-token-xyz") is None
    assert hf_tok.is_special(128009) and not hf_tok.is_special(1502)
    ids = hf_tok.encode("Hi<|eot_id|>")
    assert ids[-1] == 128009
    assert hf_tok.decode(ids) == "Hi<|eot_id|>"
    assert hf_tok.decode(ids, skip_special_tokens=True) == "Hi"


def test_add_bos(hf_tok: Tokenizer) -> None:
    assert hf_tok.encode("Hello", add_bos=True)[0] == 128000
    assert hf_tok.encode("Hello", add_bos=True)[1:] == hf_tok.encode("Hello")
    assert hf_tok.encode("<|begin_of_text|>Hello", add_bos=True).count(128000) == 1
    assert hf_tok.encode("", add_bos=True) == [128000]


def test_hf_roundtrip_multilingual(hf_tok: Tokenizer) -> None:
    assert hf_tok.decode(hf_tok.encode(MULTILINGUAL)) == MULTILINGUAL


# ---------------------------------------------------------------------------------------------
# tiktoken backend (same vocabulary, no tokenizer.json)


def test_tiktoken_chat_vector(tiktoken_tok: Tokenizer) -> None:
    assert tiktoken_tok.encode_chat(HOW_ARE_YOU) == HOW_ARE_YOU_IDS
    assert tiktoken_tok.vocab_size == 128256
    assert (tiktoken_tok.bos_id, tiktoken_tok.eos_id) == (128000, 128001)
    assert 128001 in tiktoken_tok.end_token_ids() and 128009 in tiktoken_tok.end_token_ids()


def test_tiktoken_matches_tokenizer_json(hf_tok: Tokenizer, tiktoken_tok: Tokenizer) -> None:
    ids = hf_tok.encode(MULTILINGUAL)
    assert tiktoken_tok.encode(MULTILINGUAL) == ids
    assert 128009 in ids and 128000 in ids
    for skip in (False, True):
        assert tiktoken_tok.decode(ids, skip) == hf_tok.decode(ids, skip)
    for token in ("<|eot_id|>", "<|reserved_special_token_250|>", "Hello", "Ġthe", "ĊĊ", "not a token"):
        assert tiktoken_tok.token_to_id(token) == hf_tok.token_to_id(token), token
    for i in (0, 1502, 72803, 128000, 128255):
        assert tiktoken_tok.id_to_token(i) == hf_tok.id_to_token(i)
        assert tiktoken_tok.is_special(i) == hf_tok.is_special(i)


def test_tiktoken_default_special_names(tmp_path: Path) -> None:
    # Without tokenizer_config.json the built-in Llama-3 layout must give the same specials.
    src = need_assets()
    shutil.copy(src / "tokenizer.model", tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    config = json.loads((src / "tokenizer_config.json").read_text())
    for sid, entry in config["added_tokens_decoder"].items():
        assert tok.token_to_id(entry["content"]) == int(sid)
    assert (tok.bos_id, tok.eos_id) == (128000, 128001)
    assert not tok.has_chat_template
    assert tok.encode_chat(HOW_ARE_YOU) == HOW_ARE_YOU_IDS  # built-in format == 2B-4T template


def test_matches_transformers_reference(hf_tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ASSETS / "tokenizer.json"))
    assert hf_tok.encode(MULTILINGUAL) == ref.encode(MULTILINGUAL, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# SentencePiece backend (Llama-2 style)


def test_sentencepiece_roundtrip(sp_tok: Tokenizer) -> None:
    assert (sp_tok.bos_id, sp_tok.eos_id) == (1, 2)
    assert sp_tok.vocab_size == 321
    for text in ("hello world", "The quick brown fox!", "  leading and  double  spaces ",
                 "unseen: 中文 テキスト 😀 👩‍👩‍👧‍👦 café", "line1\nline2\ttab"):
        ids = sp_tok.encode(text)
        assert all(0 <= i < sp_tok.vocab_size for i in ids)
        assert sp_tok.decode(ids) == text, text


def test_sentencepiece_specials_in_text(sp_tok: Tokenizer) -> None:
    ids = sp_tok.encode("hello<pad>world")
    assert 320 in ids and sp_tok.token_to_id("<pad>") == 320
    assert sp_tok.decode(ids) == "hello<pad>world"
    assert sp_tok.decode(ids, skip_special_tokens=True) == "helloworld"
    ids = sp_tok.encode("<s>hello world</s>")
    assert ids[0] == 1 and ids[-1] == 2
    assert sp_tok.decode(ids, skip_special_tokens=True) == "hello world"
    assert 2 in sp_tok.end_token_ids()


def test_sentencepiece_builtin_chat(sp_tok: Tokenizer) -> None:
    assert not sp_tok.has_chat_template
    text = sp_tok.render_chat(HOW_ARE_YOU)
    assert text == "<s>User: How are you?</s>Assistant: "
    ids = sp_tok.encode_chat(HOW_ARE_YOU)
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 1
    assert sp_tok.decode(ids) == text


# ---------------------------------------------------------------------------------------------
# Chat templates


def test_multi_turn_chat(hf_tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    text = hf_tok.render_chat(messages)
    assert text == ("<|begin_of_text|>System: You are helpful.<|eot_id|>User: Hi!<|eot_id|>"
                    "Assistant: Hello. How can I help?<|eot_id|>User: Tell me a joke.<|eot_id|>Assistant: ")
    assert not hf_tok.render_chat(messages, add_generation_prompt=False).endswith("Assistant: ")
    ids = hf_tok.encode_chat(messages)
    assert ids[0] == 128000 and ids.count(128000) == 1 and ids.count(128009) == 4
    assert hf_tok.decode(ids) == text


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": ["list"]}],
    [{"content": "no role"}],
    ["not a dict"],
])
def test_invalid_messages(hf_tok: Tokenizer, messages: list) -> None:
    with pytest.raises(TokenizerError):
        hf_tok.encode_chat(messages)


def test_custom_jinja_template(tmp_path: Path) -> None:
    src = need_assets()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}\n<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ m['content'] }}<|eot_id|>"
        "{% endfor %}\n{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}")
    tok = load_tokenizer(tmp_path)
    assert tok.has_chat_template
    assert tok.render_chat(HOW_ARE_YOU) == (
        "<|start_header_id|>user<|end_header_id|>How are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>")
    ids = tok.encode_chat(HOW_ARE_YOU)
    assert ids[0] == 128000 and ids[1] == 128006 and ids.count(128000) == 1  # BOS added since template has none


def test_template_raise_exception(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": "{{ raise_exception('nope') }}"}]}))
    shutil.copy(need_assets() / "tokenizer.model", tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="nope"):
        tok.render_chat(HOW_ARE_YOU)


# ---------------------------------------------------------------------------------------------
# Streaming


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    dec = tok.stream_decoder(skip_special_tokens=skip)
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("which", ["hf_tok", "tiktoken_tok", "sp_tok"])
def test_stream_no_broken_chars(which: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    ids = tok.encode(STREAM_TEXT)
    pieces = _stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == STREAM_TEXT
    assert sum(1 for p in pieces if p) > 10  # really incremental, not one blob at flush


def test_stream_special_tokens(hf_tok: Tokenizer) -> None:
    ids = hf_tok.encode("<|begin_of_text|>Hi 👋 there<|eot_id|>")
    assert "".join(_stream(hf_tok, ids, skip=True)) == "Hi 👋 there"
    assert "".join(_stream(hf_tok, ids, skip=False)) == "<|begin_of_text|>Hi 👋 there<|eot_id|>"


def test_stream_long_text(hf_tok: Tokenizer) -> None:
    text = (MULTILINGUAL.replace("<|eot_id|>", "").replace("<|begin_of_text|>", "") + "\n") * 5
    ids = hf_tok.encode(text)
    pieces = _stream(hf_tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)
    assert "tokenizer.json" in str(e.value) and "tokenizer.model" in str(e.value)
