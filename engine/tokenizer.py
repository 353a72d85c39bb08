"""Tokenizers: the ``tokenizers`` library (primary) and a pure-Python byte-level BPE fallback.

Both read the same Hugging Face files and must give identical ids (tests/unit/test_tokenizer.py).
The fallback exists for machines where the ``tokenizers`` wheel is unavailable; select it explicitly with
``--tokenizer-impl python``.
"""

from __future__ import annotations

import heapq
import json
import re
import sys
import unicodedata
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Protocol

# The Qwen2/Qwen3 pre-tokenizer pattern, as in tokenizer.json (needs Unicode property classes).
QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Unicode White_Space, which is what \s means in the tokenizers library's regex engine.
UNICODE_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Texts from this many characters on are encoded through ``encode_batch``, which releases the GIL while the
# Rust code runs (plain ``encode`` holds it for the whole call), so the API process's event loop keeps
# answering while a long prompt is tokenized (tests/integration/test_robustness.py holds /health under 1 s meanwhile).
GIL_FREE_ENCODE_MIN_CHARS = 4096
# NFC normalization composes at most three code points into one (Hangul L+V+T jamo: 9 UTF-8 bytes become
# one 3-byte syllable), so a normalizing tokenizer sees at least a third of the input's bytes.
NFC_MAX_SHRINK = 3
# Words longer than this are not memoised (keeps the BPE cache bounded).
BPE_CACHE_MAX_WORD = 256
BPE_CACHE_SIZE = 1 << 16


class TokenizerImpl(str, Enum):
    AUTO = "auto"
    HF = "hf"
    PYTHON = "python"


class Tokenizer(Protocol):
    """What the engine and server ask of a tokenizer."""

    vocab_size: int
    special_ids: frozenset[int]
    # How many times fewer UTF-8 bytes the text can have after the tokenizer's normalizer (1: none).
    normalizer_shrink: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> str:
    """Lone UTF-16 surrogates (e.g. a JSON ``"\\ud800"``) cannot be UTF-8 encoded: both tokenizers
    see them as U+FFFD REPLACEMENT CHARACTER."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)
    return text


def _read_added_tokens(model_dir: Path) -> dict[int, tuple[str, bool]]:
    """Added tokens ``{id: (content, special)}`` from tokenizer_config.json (or tokenizer.json)."""
    added: dict[int, tuple[str, bool]] = {}
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        for tid, info in (cfg.get("added_tokens_decoder") or {}).items():
            added[int(tid)] = (info["content"], bool(info.get("special", False)))
    tok_path = model_dir / "tokenizer.json"
    if not added and tok_path.is_file():
        tok = json.loads(tok_path.read_text(encoding="utf-8"))
        for info in tok.get("added_tokens") or []:
            added[int(info["id"])] = (info["content"], bool(info.get("special", False)))
    return added


# ----------------------------------------------------------------------------------------------
# Primary: the tokenizers library
# ----------------------------------------------------------------------------------------------
class HFTokenizer:
    """``tokenizers.Tokenizer`` on tokenizer.json, or built from vocab.json + merges.txt."""

    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        model_dir = Path(model_dir)
        added = _read_added_tokens(model_dir)
        if (model_dir / "tokenizer.json").is_file():
            self._tok = RustTokenizer.from_file(str(model_dir / "tokenizer.json"))
        else:
            self._tok = self._build_from_vocab_merges(model_dir, added)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, (_, special) in added.items() if special)
        self.normalizer_shrink = 1 if self._tok.normalizer is None else NFC_MAX_SHRINK

    @staticmethod
    def _build_from_vocab_merges(model_dir: Path, added: dict[int, tuple[str, bool]]):
        from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as RustTokenizer

        bpe = models.BPE.from_file(str(model_dir / "vocab.json"), str(model_dir / "merges.txt"))
        tok = RustTokenizer(bpe)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [AddedToken(content, special=special, normalized=False) for _, (content, special) in sorted(added.items())]
        )
        return tok

    def encode(self, text: str) -> list[int]:
        text = replace_lone_surrogates(text)
        if len(text) >= GIL_FREE_ENCODE_MIN_CHARS:
            return self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode_each(self, ids: list[int]) -> list[str]:
        """Each id decoded alone (one call into Rust for all of them)."""
        return self._tok.decode_batch([[i] for i in ids], skip_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_json(self) -> str:
        """The tokenizer in tokenizer.json form (what grammar engines build their vocabulary view from)."""
        return self._tok.to_str()


# ----------------------------------------------------------------------------------------------
# Fallback: pure Python
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _category_ranges(prefix: str) -> str:
    """A regex character-class body covering every code point whose Unicode category starts with ``prefix``."""
    ranges: list[str] = []
    start = None
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and unicodedata.category(chr(cp)).startswith(prefix)
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            end = cp - 1
            ranges.append(re.escape(chr(start)) if start == end else f"{re.escape(chr(start))}-{re.escape(chr(end))}")
            start = None
    return "".join(ranges)


@lru_cache(maxsize=1)
def qwen_pretokenize_regex() -> re.Pattern[str]:
    """The Qwen pre-tokenizer pattern translated to the standard library's ``re``.

    ``re`` has no ``\\p{..}``: letter and number classes are generated from ``unicodedata``; ``\\s`` is
    spelled out as Unicode White_Space; the case-insensitive contractions are spelled per letter so that
    ``re``'s extra case folds (e.g. U+017F LONG S) do not apply.
    """
    L, N, S = _category_ranges("L"), _category_ranges("N"), UNICODE_WHITESPACE
    contractions = "|".join(
        "'" + "".join(f"[{c}{c.upper()}]" for c in suffix) for suffix in ("s", "t", "re", "ve", "m", "ll", "d")
    )
    pattern = (
        f"{contractions}|[^\\r\\n{L}{N}]?[{L}]+|[{N}]| ?[^{S}{L}{N}]+[\\r\\n]*|[{S}]*[\\r\\n]+|[{S}]+(?![^{S}])|[{S}]+"
    )
    return re.compile(pattern)


class PythonBPETokenizer:
    """Dependency-free byte-level BPE reading vocab.json + merges.txt (+ added tokens).

    Steps as the Hugging Face fast tokenizer performs them: split out added tokens, NFC-normalize the
    rest, pre-tokenize with the Qwen regex, map bytes to the GPT-2 alphabet, merge by rank.
    BPE merging uses a heap over adjacent pairs, so a long word costs O(n log n), not O(n^2).
    """

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self._check_pre_tokenizer(model_dir)
        vocab_path, merges_path = model_dir / "vocab.json", model_dir / "merges.txt"
        if not vocab_path.is_file() or not merges_path.is_file():
            raise FileNotFoundError(f"{model_dir}: the python tokenizer needs vocab.json and merges.txt")
        self.vocab: dict[str, int] = json.loads(vocab_path.read_text(encoding="utf-8"))
        self.ranks: dict[tuple[str, str], int] = {}
        for line in merges_path.read_text(encoding="utf-8").split("\n"):
            if not line or line.startswith("#version"):
                continue
            a, b = line.split(" ")
            self.ranks[(a, b)] = len(self.ranks)
        added = _read_added_tokens(model_dir)
        self.added_tokens = {content: tid for tid, (content, _) in added.items()}
        self.special_ids = frozenset(i for i, (_, special) in added.items() if special)
        self.id_to_token: dict[int, str] = {i: t for t, i in self.vocab.items()}
        self._added_ids = {tid: content for tid, (content, _) in added.items()}
        self.vocab_size = max([*self.id_to_token, *self._added_ids]) + 1
        self.normalizer_shrink = NFC_MAX_SHRINK  # encode() NFC-normalizes
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        # Longest first so that a token that is a prefix of another never wins.
        alternatives = sorted(self.added_tokens, key=len, reverse=True)
        self._added_re = re.compile("|".join(re.escape(t) for t in alternatives)) if alternatives else None
        self._pretok = qwen_pretokenize_regex()
        self._cache: dict[str, list[int]] = {}

    @staticmethod
    def _check_pre_tokenizer(model_dir: Path) -> None:
        """Refuse models whose tokenizer.json splits text differently: the fallback implements Qwen's regex only."""
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            return  # vocab.json + merges.txt only: assumed to be a Qwen2/Qwen3 tokenizer (documented)
        pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
        parts = pre.get("pretokenizers", [pre])
        patterns = [(p.get("pattern") or {}).get("Regex") for p in parts if p.get("type") == "Split"]
        if QWEN_PRETOKENIZE_PATTERN not in patterns:
            raise ValueError(
                f"{path}: the python tokenizer implements the Qwen2/Qwen3 pre-tokenizer only; this "
                "model's differs. Use --tokenizer-impl hf (the tokenizers library)."
            )

    def _bpe(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word)
        n = len(symbols)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[int, int, str, str]] = []
        ranks = self.ranks

        def push(i: int) -> None:
            j = nxt[i]
            if j < n:
                r = ranks.get((symbols[i], symbols[j]))
                if r is not None:
                    heapq.heappush(heap, (r, i, symbols[i], symbols[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            # Stale entry: a neighbour changed since it was pushed.
            if j >= n or symbols[i] != left or symbols[j] != right:
                continue
            symbols[i] = left + right
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        ids = [self.vocab[symbols[i]] for i in range(n) if alive[i]]
        if len(word) <= BPE_CACHE_MAX_WORD:
            if len(self._cache) >= BPE_CACHE_SIZE:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        text = unicodedata.normalize("NFC", text)
        enc = self._byte_encoder
        for piece in self._pretok.findall(text):
            out.extend(self._bpe("".join(enc[b] for b in piece.encode("utf-8"))))

    def encode(self, text: str) -> list[int]:
        text = replace_lone_surrogates(text)
        ids: list[int] = []
        pos = 0
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                if m.start() > pos:
                    self._encode_ordinary(text[pos : m.start()], ids)
                ids.append(self.added_tokens[m.group()])
                pos = m.end()
        if pos < len(text):
            self._encode_ordinary(text[pos:], ids)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        parts: list[str] = []
        buf = bytearray()
        for i in ids:
            if i in self._added_ids:
                if skip_special_tokens and i in self.special_ids:
                    continue
                parts.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                parts.append(self._added_ids[i])
            else:
                token = self.id_to_token.get(i)
                if token is None:
                    continue
                buf.extend(self._byte_decoder[c] for c in token)
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        return self.added_tokens.get(token, self.vocab.get(token))


def max_text_bytes_per_token(tok: Tokenizer) -> int:
    """A bound B such that no text of N UTF-8 bytes encodes to fewer than N / B tokens: the most bytes one
    token stands for (each id decoded alone; undecodable bytes come back as 3-byte U+FFFD, which only
    overestimates; +1 for a decoder that drops a leading space), times what the normalizer can shrink.
    It lets a request that cannot fit the context be refused before it is tokenized."""
    ids = list(range(tok.vocab_size))
    decode_each = getattr(tok, "decode_each", None)
    texts = decode_each(ids) if decode_each else [tok.decode([i]) for i in ids]
    longest = max(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return (longest + 1) * tok.normalizer_shrink


def tokenizer_json(tok: Tokenizer, model_dir: str | Path) -> str:
    """``tok`` as tokenizer.json text; the pure-Python fallback has none, so the model's is built for it."""
    return tok.to_json() if isinstance(tok, HFTokenizer) else HFTokenizer(model_dir).to_json()


def load_tokenizer(model_dir: str | Path, impl: TokenizerImpl | str = TokenizerImpl.AUTO) -> Tokenizer:
    """The tokenizer of a model directory; ``auto`` uses ``tokenizers`` when importable, else the fallback."""
    impl = TokenizerImpl(impl)
    if impl is TokenizerImpl.AUTO:
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            impl = TokenizerImpl.PYTHON
        else:
            impl = TokenizerImpl.HF
    if impl is TokenizerImpl.HF:
        return HFTokenizer(model_dir)
    return PythonBPETokenizer(model_dir)
