"""Tokenizer: the pure-Python fallback gives identical ids to the tokenizers library on the real Qwen3 files."""

from __future__ import annotations

import random
import shutil
import unicodedata

import pytest

from engine.tokenizer import HFTokenizer, PythonBPETokenizer, TokenizerImpl, load_tokenizer
from loaders.assets import qwen3_tokenizer_dir

FRAGMENTS = [
    "Hello", " world", "!", "日本語のテキスト", "中文字符", "한국어", "😀", "👨‍👩‍👧‍👦", "🏳️‍🌈", "👍🏽",
    "e\u0301", "é", "Å", "A\u030a", "ﬁ", "ǅ", "\r\n", "\n", "\n\n\n", "   ", "\t", "\t\t x", "  \n  ",
    "def f(x):\n    return x**2\n", "if (a && b) { c++; }", "12345", "3.14159", "1,000,000", "٣٤٥", "½",
    "don't", "DON'T", "It's", "IT'S", "we're", "We'Ve", "I'm", "you'll", "He'd", "'s", "'S", "'ll",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "<|fim_prefix|>",
    "\ud800", "\udfff", "a\ud83dz", "ſ", "K", "\u00a0", "\u2003", "\u3000", "\u200b", "\x0b", "\x0c", "\x1c", "\x85",
    "naïve café", "Straße", "İstanbul", "ΑΒΓ αβγ", "Привет мир", "مرحبا", "שלום", "नमस्ते", "ภาษาไทย",
    "https://example.com/a?b=c&d=e", "user@example.com", "#!/bin/bash", "$HOME/.cache", "C:\\Windows",
    "...", "---", "***", "___", "?!", "«quotes»", "“smart”", "—", "…", "\\n", "0x1F", "1e-5", "-42",
]


def corpus(n: int = 1200) -> list[str]:
    rng = random.Random(20261126)
    out = list(FRAGMENTS)
    out += [unicodedata.normalize("NFD", f) for f in FRAGMENTS]
    while len(out) < n:
        k = rng.randint(1, 8)
        out.append("".join(rng.choice(FRAGMENTS) + rng.choice(["", " ", "  ", "\n", ""]) for _ in range(k)))
    # random code points from many planes
    for _ in range(100):
        out.append("".join(chr(rng.choice([rng.randint(0x20, 0x7e), rng.randint(0xa0, 0x2fff),
                                           rng.randint(0x3000, 0x9fff), rng.randint(0x1f300, 0x1faff)]))
                           for _ in range(rng.randint(1, 30))))
    return out


@pytest.fixture(scope="module")
def hf():
    return HFTokenizer(qwen3_tokenizer_dir())


@pytest.fixture(scope="module")
def py():
    return PythonBPETokenizer(qwen3_tokenizer_dir())


def test_known_ids(hf, py):
    for tok in (hf, py):
        assert tok.encode("Hello world!") == [9707, 1879, 0]
        assert tok.encode(" ") == [220] and tok.encode("\n") == [198] and tok.encode("\n\n") == [271]
        assert tok.encode("<think>") == [151667] and tok.encode("<|im_end|>") == [151645]
        assert tok.vocab_size == 151669


def test_fallback_ids_identical_on_1000_plus_strings(hf, py):
    texts = corpus()
    assert len(texts) >= 1000
    mismatches = [(t, hf.encode(t), py.encode(t)) for t in texts if hf.encode(t) != py.encode(t)]
    assert not mismatches, mismatches[:3]


def test_decode_identical(hf, py):
    for t in corpus(300):
        ids = hf.encode(t)
        for skip in (False, True):
            assert py.decode(ids, skip) == hf.decode(ids, skip), t


def test_skip_special_keeps_think_and_tool_call(hf, py):
    ids = hf.encode("<|im_start|>a<think>b</think><tool_call>c<|im_end|>")
    for tok in (hf, py):
        assert tok.decode(ids, skip_special_tokens=True) == "a<think>b</think><tool_call>c"


def test_long_input_not_quadratic(py):
    # a single 200k-character "word" goes through BPE in one piece: a quadratic merge loop would take minutes
    ids = py.encode("a" * 200_000)
    assert py.decode(ids) == "a" * 200_000


def test_built_from_vocab_and_merges_matches_tokenizer_json(tmp_path, hf):
    d = tmp_path / "tok"
    d.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer_dir() / name, d / name)
    built = HFTokenizer(d)
    for t in corpus(400):
        assert built.encode(t) == hf.encode(t), t


def test_impl_selection(monkeypatch):
    assert isinstance(load_tokenizer(qwen3_tokenizer_dir(), TokenizerImpl.PYTHON), PythonBPETokenizer)
    assert isinstance(load_tokenizer(qwen3_tokenizer_dir(), "auto"), HFTokenizer)
    import builtins

    real_import = builtins.__import__

    def no_tokenizers(name, *a, **kw):
        if name == "tokenizers":
            raise ImportError("simulated: tokenizers not installed")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    assert isinstance(load_tokenizer(qwen3_tokenizer_dir(), "auto"), PythonBPETokenizer)
