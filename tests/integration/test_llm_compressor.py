"""Checkpoints written by llm-compressor itself: its ``SpinQuantModifier`` (R1 and R2 folded into the weights, R3
and R4 online, described by compressed-tensors' ``transform_config``) with and without its W8A8
``QuantizationModifier``. Each loads here and computes what llm-compressor's own rotated model computes in
transformers, so a model rotated by the field's tool serves here as one rotated by ``a8w8-serve quantize
--rotate`` does (tests/integration/test_rotation.py)."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loaders.checkpoint import CheckpointError
from loaders.transforms import R3_TENSORS, R4_TENSOR
from loaders.weights import load_model_weights
from npu.config import WorkerConfig
from npu.model import ForwardBatch, SeqSpan
from npu.runner import ModelRunner

# powers of two throughout: llm-compressor's deterministic "hadamard" of the whole width (R1, R4) and per head
# (R2, R3)
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 128, 4, 2, 16, 256
ROTATIONS = ["R1", "R2", "R3", "R4"]
PROMPT_LEN = 40
FLOAT_RTOL = 1e-5  # fp32 against fp32: the same function, other summation orders
A8W8_RTOL = 3e-2  # INT8 weights per channel and activations per token, against the float rotated model
PROMPT = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(3)).tolist()


def _float_model(tmp_path):
    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).float()
    with torch.no_grad():  # norm weights far from one, so that folding them into the linears is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "float")
    return tmp_path / "float"


def _rotated_by_llm_compressor(float_dir, dst, quantize: bool) -> torch.Tensor:
    """Writes ``dst`` with llm-compressor's oneshot (W8A8 too when ``quantize``); returns the logits for PROMPT of
    the model it leaves in memory (transformers with compressed-tensors' transforms)."""
    # (imported here: llm-compressor takes seconds to import, which collecting the tier should not pay)
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import SpinQuantModifier

    model = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    recipe = [SpinQuantModifier(rotations=ROTATIONS, transform_type="hadamard")]
    if quantize:
        recipe.append(QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]))
    oneshot(model=model, recipe=recipe)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0]
    model.save_pretrained(dst, save_compressed=quantize)
    return logits


def _our_logits(model_dir, quantization: str) -> torch.Tensor:
    """Our model's logits for PROMPT (fp32 KV cache; ``quantization`` as ``--quantization``)."""
    config = WorkerConfig(
        model_dir=str(model_dir),
        quantization=quantization,
        kv_cache_dtype="fp32",
        kv_cache_memory_bytes=8 << 20,
        max_model_len=256,
    )
    runner = ModelRunner(config)
    t = len(PROMPT)
    pos = torch.arange(t)
    batch = ForwardBatch(torch.tensor(PROMPT), pos, pos, [SeqSpan(0, t, pos)], pos)
    return runner.model.forward(batch, runner.cache, [])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llm-compressor")
    float_dir = _float_model(tmp)
    reference = _rotated_by_llm_compressor(float_dir, tmp / "rotated", quantize=False)
    fake_quantized = _rotated_by_llm_compressor(float_dir, tmp / "rotated-w8a8", quantize=True)
    return reference, fake_quantized, tmp / "rotated", tmp / "rotated-w8a8"


def test_a_spinquant_checkpoint_of_llm_compressor_is_its_rotated_model(checkpoints):
    reference, _, rotated, _ = checkpoints
    ours = _our_logits(rotated, "none")
    assert (ours - reference).abs().max() <= FLOAT_RTOL * reference.abs().max()


def test_its_w8a8_checkpoint_loads_with_the_online_transforms(checkpoints):
    reference, fake_quantized, _, quantized = checkpoints
    with safe_open(str(quantized / "model.safetensors"), "pt") as f:
        r4 = [k for k in f.keys() if k.endswith(R4_TENSOR)]
        assert r4 and f.get_slice(r4[0]).get_dtype() == "F64"  # its `precision`: read, not refused
    ours = _our_logits(quantized, "auto")
    scale = reference.abs().max()
    # as close to the float rotated model as llm-compressor's own fake-quantized one is (the same A8W8 math,
    # other rounding points), and far closer to that than to anything without the online R3 and R4
    ours_error, theirs_error = (
        ((ours - reference).abs().max() / scale),
        ((fake_quantized - reference).abs().max() / scale),
    )
    print(f"A8W8 max error / max |logit|: ours {ours_error:.2e}, llm-compressor's fake-quantized {theirs_error:.2e}")
    assert ours_error <= A8W8_RTOL and ours_error <= 2 * theirs_error


def test_a_stored_r3_matrix_must_be_the_one_the_kernels_compute(checkpoints, tmp_path):
    dst = tmp_path / "tampered"
    shutil.copytree(checkpoints[3], dst)
    shard = dst / "model.safetensors"
    tensors = load_file(shard)
    (name,) = [k for k in tensors if k.endswith(R3_TENSORS)]  # (llm-compressor stores the shared one once)
    tensors[name] = tensors[name][torch.randperm(HEAD_DIM, generator=torch.Generator().manual_seed(0))].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"R3_q_attn\.weight.*not Sylvester's Hadamard"):
        load_model_weights(dst)
