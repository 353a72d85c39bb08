"""Configs, compressed-tensors parsing, quantize-on-load vs. the quantize command, broken checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loaders.checkpoint import CheckpointError
from loaders.config import ConfigError, load_generation_defaults, load_model_config
from loaders.quantization import CompressedTensorsW8A8, Int8Linear, quantize_activations, quantize_weight
from loaders.weights import linear_shapes, load_model_weights
from loaders.writer import RandomModelSpec, quantize_checkpoint

SPEC4 = RandomModelSpec(
    hidden_size=96,
    num_layers=4,
    num_heads=6,
    num_kv_heads=2,
    head_dim=32,
    intermediate_size=160,
    vocab_size=1000,
    tie_word_embeddings=False,
    seed=7,
)


def _ct_block(**overrides):
    block = CompressedTensorsW8A8.config_block(ignore=["lm_head"])
    block.update(overrides)
    return {"quantization_config": block}


def test_config_fields_of_real_qwen3_config():
    from loaders.assets import qwen3_tokenizer_dir

    d = qwen3_tokenizer_dir()
    tmp = d  # config lives next to the tokenizer as qwen3-0.6b-config.json
    cfg_dict = json.loads((tmp / "qwen3-0.6b-config.json").read_text())
    from loaders.config import ModelConfig

    cfg = ModelConfig.from_dict(cfg_dict)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (1024, 28, 16, 8, 128)
    assert cfg.q_size == 2048 and cfg.intermediate_size == 3072 and cfg.tie_word_embeddings
    assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-6 and cfg.vocab_size == 151936
    gen = load_generation_defaults(d)
    assert gen.eos_token_ids == (151645, 151643) and gen.temperature == 0.6 and gen.top_k == 20


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("architectures", ["MistralForCausalLM"], "architectures"),
        ("hidden_act", "gelu", "hidden_act"),
        ("mlp_bias", True, "mlp_bias=true is not part of this architecture"),
        ("use_sliding_window", True, "use_sliding_window"),
        ("layer_types", ["full_attention", "sliding_attention"], r"layer_types has \['sliding_attention'\]"),
        ("partial_rotary_factor", 0.5, "partial_rotary_factor=0.5"),
        (
            "rope_scaling",
            {"rope_type": "dynamic", "factor": 2.0},
            "rope_scaling.rope_type 'dynamic' is not implemented",
        ),
        ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e6}, "rope_parameters.rope_type 'longrope'"),
        (
            "rope_parameters",
            {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "extra": 1},
            "rope_parameters.extra is not implemented for rope_type 'yarn'",
        ),
        ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e6}, "rope_parameters.factor is required"),
        (
            "rope_parameters",
            {"rope_type": "default", "rope_theta": 1e6, "factor": 2.0},
            "rope_parameters.factor is not implemented for rope_type 'default'",
        ),
        ("rope_parameters", {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}, "per layer type"),
    ],
)
def test_unsupported_config_names_field(tmp_path, field, value, needle):
    cfg = RandomModelSpec().config_dict()
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=needle):
        load_model_config(tmp_path)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json: file not found"):
        load_model_config(tmp_path)


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"format": "float-quantized"}, "format"),
        ({"quant_method": "awq"}, "quant_method"),
    ],
)
def test_refuses_other_formats(change, needle):
    with pytest.raises(ConfigError, match=needle):
        CompressedTensorsW8A8.from_config(_ct_block(**change))


@pytest.mark.parametrize(
    "path,value,needle",
    [
        (("weights", "strategy"), "group", "weights.strategy"),
        (("weights", "symmetric"), False, "weights.symmetric"),
        (("weights", "num_bits"), 4, "num_bits"),
        (("weights", "type"), "float", "type"),
        (("input_activations", "dynamic"), False, "dynamic"),
        (("input_activations", "strategy"), "tensor", "strategy"),
    ],
)
def test_refuses_other_schemes(path, value, needle):
    cfg = _ct_block()
    cfg["quantization_config"]["config_groups"]["group_0"][path[0]][path[1]] = value
    with pytest.raises(ConfigError, match=needle):
        CompressedTensorsW8A8.from_config(cfg)


def test_targets_and_ignore_patterns():
    cfg = _ct_block(ignore=["lm_head", "re:.*layers\\.1\\..*down_proj"], unknown_key=1)
    scheme = CompressedTensorsW8A8.from_config(cfg)
    assert scheme.is_quantized("model.layers.0.mlp.down_proj")
    assert not scheme.is_quantized("model.layers.1.mlp.down_proj")
    assert not scheme.is_quantized("lm_head")
    cfg["quantization_config"]["config_groups"]["group_0"]["targets"] = ["re:.*q_proj$"]
    scheme = CompressedTensorsW8A8.from_config(cfg)
    assert scheme.is_quantized("model.layers.0.self_attn.q_proj", class_name="Other")
    assert not scheme.is_quantized("model.layers.0.self_attn.k_proj", class_name="Other")


def test_weight_quantization_convention():
    # absmax 127.5 -> scale exactly 1.0; absmax 255 -> scale exactly 2.0 (llm-compressor: absmax / 127.5)
    w = torch.tensor(
        [[127.5, -127.5, 63.5, 0.5, -0.5, 1.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [255.0, -255.0, 3.0, 5.0, 7.0, -1.0]],
        dtype=torch.float32,
    )
    q, scale = quantize_weight(w)
    assert scale.tolist() == [1.0, torch.finfo(torch.float32).eps, 2.0]
    # round half to even, then clamp to [-128, 127]: +127.5 -> 128 -> 127, -127.5 -> -128
    assert q[0].tolist() == [127, -128, 64, 0, 0, 2]
    assert q[1].tolist() == [0, 0, 0, 0, 0, 0]
    assert q[2].tolist() == [127, -128, 2, 2, 4, 0]
    # the scale is rounded to the checkpoint dtype before it divides
    _, s16 = quantize_weight(w.to(torch.bfloat16))
    assert s16.dtype == torch.bfloat16


def test_activation_quantization_convention():
    x = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]])
    q, s = quantize_activations(x)
    assert q.tolist() == [[64, -127, 32], [0, 0, 0]]  # 63.5 rounds half to even -> 64; 31.75 -> 32
    assert s.tolist() == [pytest.approx(1 / 127), 0.0]


def test_ct_checkpoint_and_bf16_twin_load_identically(model_factory, tmp_path):
    float_dir = model_factory(SPEC4, tokenizer=False)
    ct_dir = model_factory(SPEC4, quantized=True, tokenizer=False)
    cfg = json.loads((ct_dir / "config.json").read_text())
    assert cfg["quantization_config"] == CompressedTensorsW8A8.config_block(ignore=["lm_head"])
    a = load_model_weights(float_dir, "auto")
    b = load_model_weights(ct_dir, "auto")
    for la, lb in zip(a.layers, b.layers):
        for name in linear_shapes(a.config):
            wa, wb = la.linears[name], lb.linears[name]
            assert isinstance(wa, Int8Linear) and isinstance(wb, Int8Linear)
            assert torch.equal(wa.qweight, wb.qweight), name
            assert torch.equal(wa.scale, wb.scale), name
    # lm_head is ignored by the scheme: float in both, equal
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    # the file layout is llm-compressor's
    tensors = load_file(str(ct_dir / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (SPEC4.num_heads * SPEC4.head_dim, 1)
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.bfloat16
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert "model.layers.0.self_attn.q_proj.weight_zero_point" not in tensors
    # the dequantized INT8 weight is within half a quantization step of the float one
    w = load_file(str(float_dir / "model.safetensors"))["model.layers.2.mlp.down_proj.weight"].float()
    ql = a.layers[2].linears["mlp.down_proj"]
    assert ((ql.dequantized() - w).abs() <= ql.scale[:, None] * 0.5 + 1e-6).all()


def test_quantize_command_shards_and_round_trips(model_factory, tmp_path):
    src = model_factory(SPEC4, tokenizer=True)
    dst = tmp_path / "ct"
    r = subprocess.run(
        [sys.executable, "-m", "a8w8_serve", "quantize", str(src), str(dst), "--max-shard-size", "300KB"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (dst / "tokenizer.json").is_file() and (dst / "generation_config.json").is_file()
    a, b = load_model_weights(src), load_model_weights(dst)
    for la, lb in zip(a.layers, b.layers):
        for name in la.linears:
            assert torch.equal(la.linears[name].qweight, lb.linears[name].qweight)


def test_none_quantization_keeps_float(model_factory):
    w = load_model_weights(model_factory(SPEC4, tokenizer=False), "none")
    assert w.layers[0].linears["self_attn.q_proj"].weight.dtype == torch.bfloat16


@pytest.fixture()
def broken(model_factory, tmp_path):
    src = model_factory(SPEC4, quantized=True, tokenizer=False)
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def _rewrite(d, fn):
    path = d / "model.safetensors"
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path))


def test_error_missing_tensor(broken):
    _rewrite(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' \(expected shape \[160, 96\]\)"
    ):
        load_model_weights(broken)


def test_error_wrong_shape(broken):
    def f(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]

    _rewrite(broken, f)
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has shape \[63, 96\], expected \[64, 96\]",
    ):
        load_model_weights(broken)


def test_error_wrong_dtype(broken):
    def f(t):
        t["model.layers.0.mlp.gate_proj.weight"] = t["model.layers.0.mlp.gate_proj.weight"].float()

    _rewrite(broken, f)
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.gate_proj.weight' has dtype float32, expected int8"):
        load_model_weights(broken)


def test_error_wrong_scale_shape(broken):
    def f(t):
        t["model.layers.0.mlp.gate_proj.weight_scale"] = t["model.layers.0.mlp.gate_proj.weight_scale"][:3]

    _rewrite(broken, f)
    with pytest.raises(CheckpointError, match=r"weight_scale' has shape \[3, 1\], expected \[160, 1\] or \[160\]"):
        load_model_weights(broken)


def test_error_truncated_file(broken):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors file .*truncated"):
        load_model_weights(broken)


def test_error_index_points_at_missing_shard(model_factory, tmp_path):
    src = model_factory(SPEC4, tokenizer=False)
    dst = tmp_path / "sharded"
    quantize_checkpoint(src, dst, max_shard_bytes=200_000)
    shard = sorted(dst.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"mapped to shard '{shard.name}', which does not exist"):
        load_model_weights(dst)


def test_static_activation_scales_refused(broken):
    def f(t):
        t["model.layers.0.mlp.gate_proj.input_scale"] = torch.ones(1)

    _rewrite(broken, f)
    with pytest.raises(CheckpointError, match="static activation scales are not supported"):
        load_model_weights(broken)


def test_quantize_ignore_keeps_those_linears_float(model_factory, tmp_path):
    """compressed-tensors `ignore`: the listed linears stay float in the file and when loaded (not quantized on load)."""
    from loaders.quantization import FloatLinear, Int8Linear
    from loaders.weights import load_model_weights

    src = model_factory(RandomModelSpec(seed=21), tokenizer=False)
    dst = tmp_path / "w8a8-float-down"
    quantize_checkpoint(src, dst, ignore=("re:.*mlp.down_proj",))
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", "re:.*mlp.down_proj"]
    w = load_model_weights(dst, "auto")
    for layer in w.layers:
        assert isinstance(layer.linears["mlp.down_proj"], FloatLinear)
        assert all(isinstance(v, Int8Linear) for k, v in layer.linears.items() if k != "mlp.down_proj")
    ref = load_model_weights(src, "none").layers[0].linears["mlp.down_proj"].weight
    assert torch.equal(w.layers[0].linears["mlp.down_proj"].weight, ref)
    with pytest.raises(ConfigError, match="matches no linear module"):
        quantize_checkpoint(src, tmp_path / "x", ignore=("mlp.down_proj",))  # a bare name must be a full name


def test_streaming_writer_equals_the_classic_one(tmp_path):
    """write_random_qwen3_w8a8_streaming (for shapes whose float copy does not fit in memory) writes the same tensors
    as writing the float model and quantizing it, in shards that it fills one at a time."""
    from safetensors.torch import load_file

    from loaders.writer import write_random_qwen3, write_random_qwen3_w8a8_streaming

    spec = RandomModelSpec(hidden_size=64, num_layers=3, vocab_size=512, tie_word_embeddings=False, seed=4)
    classic = write_random_qwen3(tmp_path / "classic", spec, quantized=True)
    streamed = write_random_qwen3_w8a8_streaming(tmp_path / "streamed", spec, max_shard_bytes=60_000)
    shards = sorted(streamed.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    a = load_file(classic / "model.safetensors")
    b = {k: v for s in shards for k, v in load_file(s).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((streamed / "config.json").read_text())["quantization_config"]["ignore"] == ["lm_head"]


def test_loading_maps_no_file_and_the_model_consumes_the_loaded_layers(model_factory):
    """Tensors are read into memory of their own (a mapped checkpoint's pages would stay resident as long as the
    mapping), and building the model drops each loaded layer once it is packed (never two copies)."""
    from npu.backends import get_backend
    from npu.model import DecoderModel

    model_dir = model_factory(SPEC4, tokenizer=False)
    weights = load_model_weights(model_dir, "a8w8")
    maps = Path("/proc/self/maps").read_text()
    assert str(model_dir) not in maps
    DecoderModel(weights, get_backend("cpu"), 64)
    assert all(layer is None for layer in weights.layers) and weights.lm_head is None
