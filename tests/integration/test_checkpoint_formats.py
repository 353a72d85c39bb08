"""Checkpoints as transformers writes them today (``save_pretrained``: transformers 5's ``rope_parameters``),
for Qwen3, Qwen2 and Llama with every implemented RoPE type, against transformers in float32; RoPE tables
against transformers' own rotary embeddings past the original context; the 4.x config format read the same."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from helpers import BLOCK_SIZE, Driver

from loaders.config import ConfigError, ModelConfig, load_model_config
from npu.config import WorkerConfig
from npu.messages import NewSequence, SamplingOptions
from npu.rope import rope_tables
from npu.runner import ModelRunner

transformers = pytest.importorskip("transformers")

LOGIT_ATOL = 2e-4  # fp32 everywhere: only summation order differs
GREEDY_STEPS = 32
PROMPT_LEN = 100  # past ORIGINAL_LEN, so that the scaled RoPE ranges are exercised
ORIGINAL_LEN = 64
MAX_POSITIONS = 256
ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL_LEN,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_LEN},
}
ARCHS = {
    "Qwen3ForCausalLM": (transformers.Qwen3Config, dict(head_dim=24)),
    "Qwen2ForCausalLM": (transformers.Qwen2Config, {}),
    "LlamaForCausalLM": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
}
INIT_STD = 0.08  # larger than transformers' 0.02, so that logits are not near-ties at this tiny width


def _save_random(tmp_path, arch: str, rope: dict, theta: float = 1e6, hidden_size: int = 64):
    cls, extra = ARCHS[arch]
    cfg = cls(
        vocab_size=320,
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=arch != "LlamaForCausalLM",
        rope_parameters={**rope, "rope_theta": theta},
        eos_token_id=None,
        bos_token_id=None,
        **extra,
    )
    torch.manual_seed(zlib.crc32(f"{arch}-{rope['rope_type']}-{hidden_size}".encode()))  # (hash() varies by process)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ("norm" not in name):
                p.normal_(0.0, INIT_STD)  # biases too: transformers starts them at zero
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    d = tmp_path / f"{arch}-{rope['rope_type']}"
    model.save_pretrained(d)
    return model, d


def _runner(model_dir) -> ModelRunner:
    return ModelRunner(
        WorkerConfig(
            model_dir=str(model_dir),
            quantization="none",
            kv_cache_dtype="fp32",
            dtype="float32",
            kv_cache_memory_bytes=8 << 20,
            block_size=BLOCK_SIZE,
            max_model_len=MAX_POSITIONS,
        )
    )


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_saved_by_transformers_matches_transformers(tmp_path, arch, rope):
    hf, model_dir = _save_random(tmp_path, arch, ROPES[rope])
    saved = json.loads((model_dir / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_theta" not in saved  # the transformers 5 format
    cfg = load_model_config(model_dir)
    assert cfg.rope.rope_type == rope and cfg.rope.theta == 1e6
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 320, (PROMPT_LEN,), generator=g).tolist()
    with torch.no_grad():
        ref_logits = hf(torch.tensor([prompt])).logits[0, -1]
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=GREEDY_STEPS, do_sample=False, min_new_tokens=GREEDY_STEPS
        )[0, PROMPT_LEN:].tolist()
    runner = _runner(model_dir)
    captured = []
    forward = runner.model.forward
    runner.model.forward = lambda batch, cache: captured.append(forward(batch, cache)) or captured[-1]
    d = Driver(runner)
    d.run(new=[NewSequence(1, prompt, PROMPT_LEN, 0, SamplingOptions(temperature=0))])
    d.run(chunks=[(1, 40, False)])
    got = [d.run(chunks=[(1, PROMPT_LEN - 40, True)]).tokens[0].token_id]
    assert (captured[-1][-1] - ref_logits).abs().max().item() < LOGIT_ATOL
    for _ in range(GREEDY_STEPS - 1):
        got.append(d.run(chunks=[(1, 1, True)]).tokens[0].token_id)
    assert got == ref


QWEN3_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}  # Qwen3's model card


@pytest.mark.parametrize(
    "rope",
    [
        QWEN3_YARN,
        ROPES["linear"],
        {**ROPES["llama3"], "original_max_position_embeddings": 8192},
        {
            "rope_type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "attention_factor": 1.2,
            "truncate": False,
        },
    ],
    ids=["qwen3-yarn", "linear", "llama3-8192", "yarn-all-params"],
)
def test_rope_tables_equal_transformers_rotary_embedding(rope):
    cfg = transformers.Qwen3Config(
        head_dim=128,
        max_position_embeddings=131072,
        architectures=["Qwen3ForCausalLM"],
        rope_parameters={**rope, "rope_theta": 1e6},
    )
    rotary = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(cfg)
    positions = torch.tensor([[0, 1, 17, 4095, 8191, 8192, 32767, 32768, 70000, 131071]])
    ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    ours = ModelConfig.from_dict(json.loads(cfg.to_json_string()))
    cos, sin = rope_tables(ours.rope, 128, 131072)
    assert torch.equal(cos[positions[0]], ref_cos[0]) and torch.equal(sin[positions[0]], ref_sin[0])


def test_transformers_4_format_reads_the_same(tmp_path):
    """The 4.x format (top-level rope_theta, rope_scaling with "type") gives the same RoPE as the 5.x one."""
    _, model_dir = _save_random(tmp_path, "Qwen3ForCausalLM", ROPES["yarn"])
    v5 = json.loads((model_dir / "config.json").read_text())
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(
        rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_LEN}
    )
    assert ModelConfig.from_dict(v4).rope == ModelConfig.from_dict(v5).rope
    # and a 4.x file without any RoPE fields gets the class default, 10000 (not a silent 1e6 or vice versa)
    bare = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    assert (
        ModelConfig.from_dict(bare).rope.theta
        == transformers.Qwen3Config(
            **{k: v for k, v in bare.items() if k in ("hidden_size", "num_attention_heads")}
        ).rope_parameters["rope_theta"]
    )


def test_class_defaults_where_fields_are_absent():
    """Absent fields take the transformers config class's defaults, per architecture."""
    minimal = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "intermediate_size": 96,
        "vocab_size": 128,
    }
    for arch, (cls, _) in ARCHS.items():
        ours = ModelConfig.from_dict({"architectures": [arch], **minimal})
        ref = cls(**minimal)
        assert ours.num_kv_heads == ref.num_key_value_heads, arch
        assert ours.head_dim == (getattr(ref, "head_dim", None) or 64 // 4), arch
        assert ours.max_position_embeddings == ref.max_position_embeddings, arch
        assert ours.rope.theta == ref.rope_parameters["rope_theta"], arch
        assert ours.rms_norm_eps == ref.rms_norm_eps and ours.tie_word_embeddings == ref.tie_word_embeddings, arch


def test_yarn_factor_derived_and_original_length_defaulted():
    base = {"architectures": ["Qwen3ForCausalLM"], "max_position_embeddings": 131072}
    r = ModelConfig.from_dict(
        {**base, "rope_parameters": {"rope_type": "yarn", "original_max_position_embeddings": 32768}}
    ).rope
    assert r.params["factor"] == 4.0
    r = ModelConfig.from_dict(
        {
            **base,
            "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        }
    ).rope
    assert r.params["original_max_position_embeddings"] == 131072  # as transformers fills it in
    with pytest.raises(ConfigError, match="rope_parameters.low_freq_factor is required"):
        ModelConfig.from_dict({**base, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}})


def test_tensors_the_config_does_not_announce_are_refused(tmp_path):
    """A Qwen3 checkpoint with q_proj biases but attention_bias false: loading it without them would be
    silently wrong."""
    from safetensors.torch import load_file, save_file

    from loaders.checkpoint import CheckpointError
    from loaders.weights import load_model_weights

    _, model_dir = _save_random(tmp_path, "Qwen3ForCausalLM", ROPES["default"])
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(96)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor 'model.layers.1.self_attn.q_proj.bias' is "
        "not part of the model",
    ):
        load_model_weights(model_dir, "none")


def test_dtype_flag_makes_a_bf16_checkpoint_an_fp32_reference(tmp_path):
    from loaders.quantization import FloatLinear
    from loaders.weights import load_model_weights

    hf, model_dir = _save_random(tmp_path, "Qwen2ForCausalLM", ROPES["default"])
    hf.to(torch.bfloat16).save_pretrained(model_dir)
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    auto = load_model_weights(model_dir, "none")
    assert (
        auto.embed_tokens.dtype == torch.bfloat16
        and auto.layers[0].linears["self_attn.q_proj"].weight.dtype == torch.bfloat16
    )
    fp32 = load_model_weights(model_dir, "none", dtype="float32")
    q = fp32.layers[0].linears["self_attn.q_proj"]
    assert isinstance(q, FloatLinear) and q.weight.dtype == q.bias.dtype == torch.float32
    assert fp32.embed_tokens.dtype == fp32.final_norm.dtype == torch.float32
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = list(range(3, 60))
    with torch.no_grad():
        ref = ref_model(torch.tensor([prompt])).logits[0, -1]
    d = Driver(_runner(model_dir))  # _runner asks for dtype float32
    d.run(new=[NewSequence(1, prompt, len(prompt), 0, SamplingOptions(temperature=0, logprobs=0))])
    out = d.run(chunks=[(1, len(prompt), True)]).tokens[0]
    assert out.token_id == int(ref.argmax())
    assert abs(out.logprob - torch.log_softmax(ref, -1).max().item()) < 1e-4


def test_qwen2_in_a8w8_fused_kernels_with_biases(tmp_path):
    """Qwen2 in A8W8 (biases in the VNNI epilogue): decode steps through the one-call C layer stack equal the
    Python layer loop bit for bit, and A8W8 stays close to the float model."""
    _, model_dir = _save_random(tmp_path, "Qwen2ForCausalLM", ROPES["yarn"], hidden_size=128)  # head_dim 32

    def runner(**kw) -> ModelRunner:
        return ModelRunner(
            WorkerConfig(
                model_dir=str(model_dir),
                kv_cache_memory_bytes=8 << 20,
                block_size=BLOCK_SIZE,
                max_model_len=MAX_POSITIONS,
                **kw,
            )
        )

    stacked, looped = runner(kv_cache_dtype="int8"), runner(kv_cache_dtype="int8")
    if stacked.model.decode_stack is None:
        pytest.skip("the C decoder stack is unavailable here")
    assert stacked.model.layers[0].qkv.bias is not None  # the fused q|k|v projection carries Qwen2's biases
    looped.model.decode_stack = None
    prompts = {1: list(range(3, 80)), 2: list(range(100, 117))}
    options = SamplingOptions(temperature=0, logprobs=3)
    results = []
    for r in (stacked, looped, runner(quantization="none", kv_cache_dtype="fp32", dtype="float32")):
        d = Driver(r)
        d.run(new=[NewSequence(s, p, len(p), 0, options) for s, p in prompts.items()])
        out = [d.run(chunks=[(s, len(p), True) for s, p in prompts.items()]).tokens]
        for _ in range(10):
            out.append(d.run(chunks=[(s, 1, True) for s in prompts]).tokens)
        results.append(out)
    assert results[0] == results[1]
    a8w8_first, float_first = results[0][0], results[2][0]  # the prompts' next tokens: A8W8 vs float
    assert [t.token_id for t in a8w8_first] == [t.token_id for t in float_first]
    print(
        "A8W8 vs float logprobs of the prompts' next tokens:",
        [(a.logprob, f.logprob) for a, f in zip(a8w8_first, float_first)],
    )
    assert all(abs(a.logprob - f.logprob) < 0.05 for a, f in zip(a8w8_first, float_first))


def test_smoothing_keeps_the_float_function_with_mlp_biases(tmp_path):
    """SmoothQuant folds 1/s into up_proj's rows before down_proj: with mlp_bias (Llama) its bias too."""
    import shutil

    from loaders.assets import qwen3_tokenizer_dir
    from offline.smooth_quant import smooth_checkpoint

    cfg = transformers.LlamaConfig(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_bias=True,
        attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        max_position_embeddings=1024,
    )
    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, INIT_STD)
    src = tmp_path / "llama"
    model.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # calibration tokenizes a text
        shutil.copy(qwen3_tokenizer_dir() / f, src / f)
    smoothed = smooth_checkpoint(src, tmp_path / "smoothed")
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    new = transformers.AutoModelForCausalLM.from_pretrained(smoothed, dtype=torch.float32).eval()
    ids = torch.tensor([list(range(1000, 1050))])
    with torch.no_grad():
        a, b = ref(ids).logits, new(ids).logits
    assert (a - b).abs().max().item() < 1e-4 * a.abs().max().item() + 1e-5
