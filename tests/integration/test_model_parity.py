"""Float path against transformers' Qwen3ForCausalLM on the same random checkpoint."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import BLOCK_SIZE, TINY_SPEC, Driver

from loaders.writer import RandomModelSpec
from npu.config import WorkerConfig
from npu.messages import NewSequence, SamplingOptions
from npu.runner import ModelRunner

transformers = pytest.importorskip("transformers")

# fp32 weights, fp32 reference KV: differences are summation order only.
LOGIT_ATOL = 2e-4
GREEDY_STEPS = 32

CONFIGS = [
    replace(TINY_SPEC, dtype="float32", seed=1),
    RandomModelSpec(
        hidden_size=96,
        num_layers=3,
        num_heads=6,
        num_kv_heads=1,
        head_dim=24,
        intermediate_size=160,
        vocab_size=384,
        dtype="float32",
        tie_word_embeddings=False,
        seed=2,
    ),
    RandomModelSpec(
        hidden_size=128,
        num_layers=2,
        num_heads=8,
        num_kv_heads=8,
        head_dim=16,
        intermediate_size=256,
        vocab_size=300,
        dtype="float32",
        rope_theta=10000.0,
        seed=3,
    ),
]


def _runner(model_dir, quantization="none", kv="fp32") -> ModelRunner:
    return ModelRunner(
        WorkerConfig(
            model_dir=str(model_dir),
            quantization=quantization,
            kv_cache_dtype=kv,
            kv_cache_memory_bytes=8 << 20,
            block_size=BLOCK_SIZE,
            max_model_len=256,
        )
    )


def _logits_of(runner: ModelRunner, prompt: list[int], chunk_sizes: list[int]) -> torch.Tensor:
    """Logits at every prompt position, computing the prompt in the given chunks."""
    captured = []
    orig = runner.model.forward

    def spy(batch, cache):
        logits = orig(batch, cache)
        captured.append(logits)
        return logits

    runner.model.forward = spy
    d = Driver(runner)
    d.run(new=[NewSequence(1, prompt, len(prompt), 0, SamplingOptions(temperature=0))])
    for n in chunk_sizes:
        d.run(chunks=[(1, n, d.computed.get(1, 0) + n == len(prompt))])
    runner.model.forward = orig
    return captured[-1]


@pytest.mark.parametrize("spec", CONFIGS, ids=lambda s: f"h{s.hidden_size}-kv{s.num_kv_heads}-d{s.head_dim}")
def test_float_path_matches_transformers(model_factory, spec):
    model_dir = model_factory(spec, tokenizer=False)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(spec.seed)
    prompt = torch.randint(0, spec.vocab_size, (23,), generator=g).tolist()
    with torch.no_grad():
        ref_logits = hf(torch.tensor([prompt])).logits[0]
    for chunks in ([23], [5, 7, 11], [1] * 23):
        runner = _runner(model_dir)
        ours = _logits_of(runner, prompt, chunks)
        err = (ours[-1] - ref_logits[-1]).abs().max().item()
        print(f"chunks={chunks[:3]}... max |logit diff| = {err:.2e}")
        assert err < LOGIT_ATOL

    # Greedy continuation: 32 steps identical to transformers' generate.
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=GREEDY_STEPS, do_sample=False, min_new_tokens=GREEDY_STEPS
        )[0, len(prompt) :].tolist()
    runner = _runner(model_dir)
    d = Driver(runner)
    d.run(new=[NewSequence(1, prompt, len(prompt), 0, SamplingOptions(temperature=0))])
    d.run(chunks=[(1, 10, False)])  # the prompt in two chunks, the second one samples
    got = [d.run(chunks=[(1, 13, True)]).tokens[0].token_id]
    for _ in range(GREEDY_STEPS - 1):
        got.append(d.run(chunks=[(1, 1, True)]).tokens[0].token_id)
    assert got == ref
