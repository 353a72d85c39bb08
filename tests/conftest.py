"""Shared fixtures: random Qwen3 checkpoints written by the tests themselves (no downloads); each test marked
with its tier (the folder it is in: unit, integration, system; tests/README.md says what each covers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the CUDA backend's Triton kernels run in Triton's interpreter (tests/integration/test_cuda_kernels.py).
# Triton reads the switch when it is first imported, and other modules (transformers) import it before the
# kernels are: so it is set here, before any test module is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from loaders.assets import qwen3_tokenizer_dir
from loaders.writer import RandomModelSpec, write_random_qwen3

TOKENIZER_DIR = qwen3_tokenizer_dir()
# A small model at real Qwen3 ratios (GQA 2:1, head_dim != hidden/heads) with the real vocabulary.
SERVE_SPEC = RandomModelSpec(
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=128, seed=1234
)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Write (once per session) a random checkpoint for a spec; returns its directory."""
    made: dict[tuple, Path] = {}

    def make(spec: RandomModelSpec = SERVE_SPEC, quantized: bool = False, tokenizer: bool = True) -> Path:
        key = (spec, quantized, tokenizer)
        if key not in made:
            d = tmp_path_factory.mktemp("model")
            write_random_qwen3(d, spec, quantized=quantized, tokenizer_dir=TOKENIZER_DIR if tokenizer else None)
            made[key] = d
        return made[key]

    return make


@pytest.fixture(scope="session")
def serve_model(model_factory) -> Path:
    """The compressed-tensors W8A8 model the engine and server tests run."""
    return model_factory(SERVE_SPEC, quantized=True)


TIERS = ("unit", "integration", "system")
TESTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test with its tier, from its folder: ``pytest -m "not system"`` and the like select by it."""
    for item in items:
        tier = item.path.relative_to(TESTS_DIR).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: every test module lives in one of tests/{{{','.join(TIERS)}}}/")
        item.add_marker(getattr(pytest.mark, tier))
