"""Encoding speed of the pure-Python fallback tokenizer vs. the tokenizers library, and its scaling.

python benchmarks/tokenizer_bench.py
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from engine.tokenizer import HFTokenizer, PythonBPETokenizer
from loaders.assets import qwen3_tokenizer_dir


def sample_text(n_chars: int, seed: int = 0) -> str:
    """Mixed prose/code/CJK text built from this repository's sources, shuffled by line (little repetition)."""
    root = Path(__file__).resolve().parents[1]
    lines = [ln for p in sorted(root.glob("*/*.py")) for ln in p.read_text(encoding="utf-8").splitlines()]
    lines += [
        "日本語のテキストと中文字符が混ざった行です。",
        "Ünïcödé façade naïve café 😀👍🏽",
        "Привет, мир! Γειά σου κόσμε.",
    ]
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        ln = rng.choice(lines)
        out.append(ln)
        size += len(ln) + 1
    return "\n".join(out)[:n_chars]


def rate(tok, text: str) -> float:
    t = time.perf_counter()
    tok.encode(text)
    return len(text) / (time.perf_counter() - t)


def main() -> None:
    d = qwen3_tokenizer_dir()
    t0 = time.perf_counter()
    py = PythonBPETokenizer(d)
    load_s = time.perf_counter() - t0
    hf = HFTokenizer(d)
    text = sample_text(1_000_000)
    assert py.encode(text[:20000]) == hf.encode(text[:20000])
    print(f"python fallback: load {load_s:.2f} s")
    for n in (10_000, 100_000, 1_000_000):
        py._cache.clear()
        print(
            f"{n:>9,} chars: python fallback {rate(py, text[:n]) / 1e3:8.0f} kchars/s (cold cache), "
            f"tokenizers {rate(hf, text[:n]) / 1e3:8.0f} kchars/s"
        )
    for n in (10_000, 100_000):
        py._cache.clear()
        t = time.perf_counter()
        py.encode("a" * n)
        print(f"one {n:,}-character word: {time.perf_counter() - t:.3f} s")


if __name__ == "__main__":
    main()
