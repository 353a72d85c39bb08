"""Tokenizer: the pure-Python fallback gives identical ids to the tokenizers library on the real Qwen3 files."""

from __future__ import annotations

import shutil

import pytest
from helpers import corpus

from engine.tokenizer import HFTokenizer, PythonBPETokenizer, TokenizerImpl, load_tokenizer, max_text_bytes_per_token
from loaders.assets import qwen3_tokenizer_dir


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


def test_byte_bound_holds_for_adversarial_texts(hf, py):
    """max_text_bytes_per_token: no text has fewer tokens than its UTF-8 bytes over the bound, so a text
    longer than max_model_len x bound bytes can be refused without tokenizing it."""
    bound = max_text_bytes_per_token(hf)
    assert bound == max_text_bytes_per_token(py) == 387  # (128-byte whitespace token + 1) x NFC's 3
    longest = max(range(hf.vocab_size), key=lambda i: len(hf.decode([i]).encode()))
    jamo = "\u1100\u1161\u11a8"  # L + V + T: 9 bytes that NFC composes into one 3-byte syllable, one token
    texts = corpus(400) + [
        hf.decode([longest]) * 50,
        " " * 10_000,
        jamo * 500,
        "\ud55c" * 500,
        "x" * 5000,
        "<|im_start|>" * 100,
        "😀" * 300,
        "\n" * 3000,
        ("\t" * 127 + "a") * 20,
    ]
    for tok in (hf, py):
        for t in texts:
            assert len(tok.encode(t)) * bound >= len(t.encode("utf-8", "surrogatepass")), t[:40]
