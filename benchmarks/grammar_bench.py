"""Grammar engines for constrained decoding, side by side: xgrammar vs llguidance, on the Qwen3 vocabulary.

    pip install -e '.[bench]'   # xgrammar is a bench-only dependency; llguidance is the server's
    python benchmarks/grammar_bench.py [--out bench-results/grammar.json]

What it measures (all on one CPU thread of this machine, wall time):
- tokenizer: building each engine's view of the 151k-token vocabulary (once per server start);
- compile: turning a realistic JSON schema (nested objects, arrays, enums, required fields) into a matcher,
  cold (no cache);
- mask: the per-step cost of the allowed-token bitmask while walking through a valid JSON answer, for one
  sequence and for 16 (batch of 16 constrained sequences, each engine's batched API where it has one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "loaders" / "assets" / "qwen3-tokenizer"
EOS_TOKEN_ID = 151645  # <|im_end|>
BATCH = 16

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city"],
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "scores": {"type": "array", "items": {"type": "number"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}
ANSWER = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "editor",
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
    "tags": ["math", "engines", "poetry"],
    "scores": [9.5, 7.25],
    "active": True,
}


def answer_token_ids() -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    text = json.dumps(ANSWER, separators=(", ", ": "))
    return tok.encode(text, add_special_tokens=False).ids + [EOS_TOKEN_ID]


def bench_llguidance(tokens: list[int]) -> dict:
    import llguidance
    import llguidance.numpy as llnp

    t = time.perf_counter()
    tokenizer = llguidance.LLTokenizer(
        (TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"), eos_token=EOS_TOKEN_ID
    )
    tokenizer_s = time.perf_counter() - t
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    compiles = []
    for _ in range(5):
        t = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        compiles.append(time.perf_counter() - t)
        assert not matcher.is_error(), matcher.get_error()
    vocab = tokenizer.vocab_size

    def walk(batch: int) -> list[float]:
        matchers = [llguidance.LLMatcher(tokenizer, grammar) for _ in range(batch)]
        executor = llguidance.LLExecutor()
        mask = llnp.allocate_token_bitmask(batch, vocab)
        steps = []
        for token in tokens:
            t = time.perf_counter()
            if batch == 1:
                llnp.fill_next_token_bitmask(matchers[0], mask, 0)
            else:
                llnp.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
            steps.append(time.perf_counter() - t)
            assert (mask[0, token // 32] >> (token % 32)) & 1, f"token {token} not allowed"
            for m in matchers:
                assert m.consume_token(token), m.get_error()
        return steps

    return {"tokenizer_s": tokenizer_s, "compile_s": compiles, "mask_b1_s": walk(1), f"mask_b{BATCH}_s": walk(BATCH)}


def bench_xgrammar(tokens: list[int]) -> dict:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"))
    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf), stop_token_ids=[EOS_TOKEN_ID])
    tokenizer_s = time.perf_counter() - t
    schema = json.dumps(SCHEMA)
    compiles = []
    for _ in range(5):
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        t = time.perf_counter()
        compiled = compiler.compile_json_schema(schema, any_whitespace=False)
        compiles.append(time.perf_counter() - t)
    vocab = info.vocab_size

    def walk(batch: int) -> list[float]:
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
        mask = xgr.allocate_token_bitmask(batch, vocab)
        steps = []
        for token in tokens:
            t = time.perf_counter()
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(mask, i)
            steps.append(time.perf_counter() - t)
            assert (int(mask[0, token // 32]) >> (token % 32)) & 1, f"token {token} not allowed"
            for m in matchers:
                assert m.accept_token(token)
        return steps

    return {"tokenizer_s": tokenizer_s, "compile_s": compiles, "mask_b1_s": walk(1), f"mask_b{BATCH}_s": walk(BATCH)}


def summarize(raw: dict) -> dict:
    ms = 1e3
    out = {"tokenizer_ms": raw["tokenizer_s"] * ms, "compile_ms_median": statistics.median(raw["compile_s"]) * ms}
    for key in ("mask_b1_s", f"mask_b{BATCH}_s"):
        steps = np.array(raw[key]) * ms
        name = key.removesuffix("_s")
        out[f"{name}_ms_median"] = float(np.median(steps))
        out[f"{name}_ms_p99"] = float(np.percentile(steps, 99))
        out[f"{name}_ms_max"] = float(steps.max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results/grammar.json")
    args = ap.parse_args()
    tokens = answer_token_ids()
    results = {"answer_tokens": len(tokens), "batch": BATCH}
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        results[name] = summarize(fn(tokens))
        print(name, json.dumps(results[name], indent=1))
    ll, xg = results["llguidance"], results["xgrammar"]
    results["ratio_xgrammar_over_llguidance"] = {k: xg[k] / ll[k] for k in ll if ll[k] > 0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
