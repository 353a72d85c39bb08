"""Hadamard rotations (QuaRot / SpinQuant): offline/rotate.py folds R1, R2 and R4's offline half into a
checkpoint, loaders/transforms.py reads its compressed-tensors ``transform_config``, and every backend applies
R4's online half (a fast Walsh-Hadamard transform of down_proj's input) in the linear's prologue and R3 (the
same transform per head of the queries and keys) in its q/k norm + RoPE kernel.

The rotated float model is the unrotated one (against transformers, for Qwen3, Qwen2 and Llama, tied and
untied); the online transform gives the same bits on every backend; ``quantize --rotate`` round-trips through
the loader; transforms we do not implement are refused by name."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from helpers import BLOCK_SIZE, Driver, fastest_kernel_library

from loaders.assets import qwen3_tokenizer_dir
from loaders.checkpoint import CheckpointError
from loaders.config import ConfigError
from loaders.hadamard import PALEY_ORDERS, block_diagonal, hadamard, paley, sylvester
from loaders.quantization import quantize_activations, quantize_linear
from loaders.transforms import R4_TENSOR, OnlineTransforms
from loaders.weights import load_model_weights
from loaders.writer import RandomModelSpec, write_random_qwen3
from npu.backends.base import RMSNorm, TorchOps, hadamard_rows, silu_and_mul
from npu.backends.cpu.backend import Int8GemmLinear
from npu.config import WorkerConfig
from npu.messages import NewSequence, SamplingOptions
from npu.runner import ModelRunner
from offline.rotate import RotationPlan, rotate_checkpoint

transformers = pytest.importorskip("transformers")

LOGIT_ATOL = 2e-4  # fp32 everywhere; the rotation is folded in float64 and stored in fp32
GREEDY_STEPS = 16
PROMPT_LEN = 40
ARCHS = {
    "Qwen3ForCausalLM": (transformers.Qwen3Config, dict(head_dim=24)),
    "Qwen2ForCausalLM": (transformers.Qwen2Config, {}),
    "LlamaForCausalLM": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
}
# hidden 96 = 8 x 12 (R1 a Kronecker product with Paley's order 12), head_dim 24 = 2 x 12 (R2), intermediate
# 160 = 32 x 5 (R4 in blocks of 32)
HIDDEN, HEADS, INTERMEDIATE, VOCAB = 96, 4, 160, 320
INIT_STD = 0.08


def _save_random(tmp_path, arch: str, tied: bool, **overrides):
    cls, extra = ARCHS[arch]
    extra = {**extra, **overrides}
    cfg = cls(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        eos_token_id=None,
        bos_token_id=None,
        **extra,
    )
    torch.manual_seed(zlib.crc32(f"{arch}-{tied}".encode()))
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" not in name:
                p.normal_(0.0, INIT_STD)
            else:  # norm weights far from one, so that folding them is tested
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
        # a few outlier channels in the residual stream, as real models have
        model.model.embed_tokens.weight[:, :3] *= 8
    d = tmp_path / f"{arch}-{'tied' if tied else 'untied'}{''.join(f'-{k}{v}' for k, v in overrides.items())}"
    model.save_pretrained(d)
    return model, d


def _runner(model_dir, quantization="none", kv="fp32", dtype="float32") -> ModelRunner:
    return ModelRunner(
        WorkerConfig(
            model_dir=str(model_dir),
            quantization=quantization,
            kv_cache_dtype=kv,
            dtype=dtype,
            kv_cache_memory_bytes=8 << 20,
            block_size=BLOCK_SIZE,
            max_model_len=256,
        )
    )


def _logits_and_greedy(runner: ModelRunner, prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
    captured = []
    forward = runner.model.forward
    runner.model.forward = lambda batch, cache: captured.append(forward(batch, cache)) or captured[-1]
    d = Driver(runner)
    d.run(new=[NewSequence(1, prompt, len(prompt), 0, SamplingOptions(temperature=0))])
    got = [d.run(chunks=[(1, len(prompt), True)]).tokens[0].token_id]
    logits = captured[-1][-1]
    for _ in range(GREEDY_STEPS - 1):
        got.append(d.run(chunks=[(1, 1, True)]).tokens[0].token_id)
    return logits, got


# ---- Hadamard matrices -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [12, 20, 68, 96, 576, 1536])
def test_hadamard_matrices_are_orthogonal(n):
    h = hadamard(n)
    assert torch.allclose(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.equal((h * n**0.5).round().abs(), torch.ones(n, n, dtype=torch.float64))  # entries +-1/sqrt(n)


def test_paley_orders_cover_the_supported_widths():
    # SmolLM2 576 = 8 x 72, Qwen3 3072 = 256 x 12, 5120 = 256 x 20, 17408 = 256 x 68
    for n, order in ((576, 72), (3072, 12), (5120, 20), (17408, 68)):
        assert order in PALEY_ORDERS and n % order == 0
        p = paley(order)
        assert torch.equal(p @ p.t(), order * torch.eye(order, dtype=torch.float64))
    with pytest.raises(ValueError, match="no Hadamard matrix of order 36"):
        hadamard(36)  # (one exists, but not by these constructions: refused, never approximated)


def test_hadamard_rows_is_the_block_diagonal_product():
    g = torch.Generator().manual_seed(0)
    for block, k in ((1, 8), (2, 6), (16, 48), (512, 1536)):
        x = torch.randn(5, k, generator=g)
        exact = x.double() @ block_diagonal(k, block)
        assert (hadamard_rows(x, block).double() - exact).abs().max() < 1e-6 * max(block, 1) ** 0.5 * 4
    assert torch.equal(sylvester(4)[1], torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64))  # natural order


# ---- the rotated float model is the model ----------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_rotated_float_model_matches_transformers(tmp_path, arch, tied):
    hf, model_dir = _save_random(tmp_path, arch, tied)
    rotated = rotate_checkpoint(model_dir, tmp_path / "rotated", RotationPlan(r1="kron"))
    cfg = json.loads((rotated / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False  # the lm_head took the final norm's weight
    groups = cfg["quantization_config"]["transform_config"]["config_groups"]
    assert set(groups) == {"R1", "R2", "R4"} and groups["R4"]["head_dim"] == 32
    weights = load_model_weights(rotated, "none")
    assert weights.online == OnlineTransforms(down_proj_input_block=32)
    assert torch.equal(weights.final_norm, torch.ones(HIDDEN))
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist()
    with torch.no_grad():
        ref_logits = hf(torch.tensor([prompt])).logits[0, -1]
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=GREEDY_STEPS, do_sample=False, min_new_tokens=GREEDY_STEPS
        )[0, PROMPT_LEN:].tolist()
    for model in (model_dir, rotated):
        logits, got = _logits_and_greedy(_runner(model), prompt)
        assert (logits - ref_logits).abs().max().item() < LOGIT_ATOL, model
        assert got == ref, model


def test_block_rotation_and_no_r4_are_the_model_too(tmp_path):
    hf, model_dir = _save_random(tmp_path, "Qwen3ForCausalLM", True)
    prompt = list(range(5, 5 + PROMPT_LEN))
    with torch.no_grad():
        ref_logits = hf(torch.tensor([prompt])).logits[0, -1]
    for name, plan in {"blocks": RotationPlan(r1="blocks"), "r1r2": RotationPlan(r4_block_limit=0)}.items():
        rotated = rotate_checkpoint(model_dir, tmp_path / name, plan)
        groups = json.loads((rotated / "config.json").read_text())["quantization_config"]["transform_config"]
        assert ("R4" in groups["config_groups"]) == (name != "r1r2")
        logits, _ = _logits_and_greedy(_runner(rotated), prompt)
        assert (logits - ref_logits).abs().max().item() < LOGIT_ATOL, name


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "LlamaForCausalLM"])
def test_r3_keeps_the_float_model(tmp_path, arch):
    """R3 rotates queries and keys alike after RoPE: every attention score, so the model, stays the same."""
    hf, model_dir = _save_random(tmp_path, arch, False, head_dim=32)  # (R3's online transform: a power of two)
    rotated = rotate_checkpoint(model_dir, tmp_path / "rotated", RotationPlan(r1="kron", r3=True))
    groups = json.loads((rotated / "config.json").read_text())["quantization_config"]["transform_config"]
    r3 = groups["config_groups"]["R3"]
    assert (r3["type"], r3["head_dim"], r3["randomize"]) == ("hadamard", 32, False)
    assert [(a["targets"], a["location"]) for a in r3["apply"]] == [
        (["re:.*self_attn$"], "q_attn"),
        (["re:.*self_attn$"], "k_cache"),
    ]
    assert load_model_weights(rotated, "none").online == OnlineTransforms(32, qk_head_hadamard=True)
    prompt = list(range(9, 9 + PROMPT_LEN))
    with torch.no_grad():
        ref_logits = hf(torch.tensor([prompt])).logits[0, -1]
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=GREEDY_STEPS, do_sample=False, min_new_tokens=GREEDY_STEPS
        )[0, PROMPT_LEN:].tolist()
    runner = _runner(rotated)
    assert all(layer.qk_hadamard for layer in runner.model.layers)
    logits, got = _logits_and_greedy(runner, prompt)
    assert (logits - ref_logits).abs().max().item() < LOGIT_ATOL and got == ref
    # the rotation is on the path: on only one of q and k it changes the scores, and so the model
    runner = _runner(rotated)
    ops = runner.model.backend
    plain = ops.qk_norm_rope

    def keys_only(qk, norm, cos, sin_signed, positions, head_hadamard=False):
        out = plain(qk.clone(), norm, cos, sin_signed, positions, False)
        out[:, HEADS:] = plain(qk.clone(), norm, cos, sin_signed, positions, head_hadamard)[:, HEADS:]
        return out

    ops.qk_norm_rope = keys_only
    runner.model.decode_stack = None
    wrong, _ = _logits_and_greedy(runner, prompt)
    assert (wrong - ref_logits).abs().max().item() > 100 * LOGIT_ATOL


def test_r3_needs_a_power_of_two_head_dim(tmp_path):
    _, model_dir = _save_random(tmp_path, "Qwen3ForCausalLM", True)  # head_dim 24
    with pytest.raises(ConfigError, match="head_dim 24: R3"):
        rotate_checkpoint(model_dir, tmp_path / "rotated", RotationPlan(r3=True))


# ---- the online transform: the same bits on every backend --------------------------------------------------
@pytest.mark.parametrize("block", [2, 8, 16, 64, 512])
def test_online_hadamard_is_bit_exact_in_the_c_kernels(block):
    from npu.backends.cpu.vnni import Bf16Linear, VnniLinear, Workspace

    lib = (
        fastest_kernel_library()
    )  # (each family's prologue is the same arithmetic: tested in test_cpu_kernel_families)
    g = torch.Generator().manual_seed(block)
    k = 1536 if block == 512 else 4 * block + (block if block >= 16 else 0)
    for m in (1, 5, 17):
        x = torch.randn(m, k, generator=g) * 3
        lw = quantize_linear(torch.randn(40, k, generator=g))
        ref = Int8GemmLinear(lw, block)
        assert torch.equal(VnniLinear(lw, lib, Workspace(), input_hadamard=block)(x), ref(x)), (block, m)
        assert not torch.equal(ref(x), Int8GemmLinear(lw)(x))  # (the rotation is applied)
        gu = torch.randn(m, 2 * k, generator=g)
        got = VnniLinear(lw, lib, Workspace(), input_hadamard=block)(gu, gated=True)
        want = ref(gu, gated=True)  # (the SiLU's exp differs by an ulp: a rounding tie may move a code)
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()
        if lib.has_bf16:  # (the BF16 kernel's prologue is the same code: the rotated input, then its GEMM)
            w = torch.randn(40, k, generator=g).bfloat16()
            rotated = Bf16Linear(w, lib, Workspace(), input_hadamard=block)(x)
            assert torch.equal(rotated, Bf16Linear(w, lib, Workspace())(hadamard_rows(x, block)))


@pytest.mark.parametrize("block", [2, 16, 512])
def test_online_hadamard_is_bit_exact_in_the_triton_prologue(block):
    from npu.backends.cuda.linear import TritonLinear, rows_prologue

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")  # (interpreter on CPU)
    g = torch.Generator().manual_seed(block)
    k = 1536 if block == 512 else 96
    x = torch.randn(4, k, generator=g) * 3
    q, s = rows_prologue(x.to(dev), k, None, False, True, block)
    qr, sr = quantize_activations(hadamard_rows(x, block))
    assert torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)
    gu = torch.randn(4, 2 * k, generator=g)
    q, _ = rows_prologue(gu.to(dev), k, None, True, True, block)
    qr, _ = quantize_activations(hadamard_rows(silu_and_mul(gu), block))
    assert (q.cpu().int() - qr.int()).abs().max() <= 1  # (the SiLU's exp: a code may move one step on a tie)
    lw = quantize_linear(torch.randn(24, k, generator=g))
    assert torch.equal(TritonLinear(lw, dev, 4, block)(x.to(dev)).cpu(), Int8GemmLinear(lw, block)(x))
    with pytest.raises(ValueError, match="power of two"):
        TritonLinear(lw, dev, 4, 24)


@pytest.mark.parametrize("d", [32, 64, 128])
def test_r3_is_bit_exact_in_the_c_kernel(d):
    from npu.backends.cpu import CpuBackend

    backend = CpuBackend()
    if backend.kernel_family == "reference":
        pytest.skip("no CPU kernel family runs here")
    g = torch.Generator().manual_seed(d)
    t, h = 7, 6
    qk = torch.randn(t, h + 2, d, generator=g)[:, :h] * 4  # a strided view, as the model's qkv slice is
    cos, sin = torch.randn(64, d, generator=g), torch.randn(64, d, generator=g)
    pos = torch.randint(0, 64, (t,), generator=g)
    want = TorchOps().qk_norm_rope(qk.clone(), None, cos, sin, pos, head_hadamard=True)
    assert torch.equal(backend.qk_norm_rope(qk.clone(), None, cos, sin, pos, head_hadamard=True), want)
    assert not torch.equal(want, TorchOps().qk_norm_rope(qk.clone(), None, cos, sin, pos))  # (it rotates)
    # with the norm (whose sum's order differs) the rotation of the kernel's own RoPE output is still exact
    norm = RMSNorm(torch.rand(h, d, generator=g) + 0.5, 1e-6)
    plain = backend.qk_norm_rope(qk.clone(), norm, cos, sin, pos)
    got = backend.qk_norm_rope(qk.clone(), norm, cos, sin, pos, head_hadamard=True)
    assert torch.equal(got, hadamard_rows(plain.reshape(t * h, d), d).reshape(t, h, d))


@pytest.mark.parametrize("d", [32, 64])
def test_r3_is_bit_exact_in_the_triton_kernel(d):
    from npu.backends.cuda.attention import qk_norm_rope

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")  # (interpreter on CPU)
    g = torch.Generator().manual_seed(d)
    t, h = 3, 6  # 6 heads: a padded block of 8 rows
    qk = torch.randn(t, h, d, generator=g) * 4
    cos, sin = torch.randn(16, d, generator=g), torch.randn(16, d, generator=g)
    pos = torch.tensor([0, 5, 15])
    w = torch.rand(h, d, generator=g) + 0.5
    plain = qk_norm_rope(qk.clone().to(dev), w.to(dev), 1e-6, cos.to(dev), sin.to(dev), pos.to(dev)).cpu()
    got = qk_norm_rope(qk.clone().to(dev), w.to(dev), 1e-6, cos.to(dev), sin.to(dev), pos.to(dev), True).cpu()
    assert torch.equal(got, hadamard_rows(plain.reshape(t * h, d), d).reshape(t, h, d))
    torch.testing.assert_close(got, TorchOps().qk_norm_rope(qk, RMSNorm(w, 1e-6), cos, sin, pos, True))
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        qk_norm_rope(torch.zeros(1, 2, 24, device=dev), None, 0.0, cos[:, :24], sin[:, :24], pos[:1], True)


# ---- quantize --rotate, the loader, and what is refused ----------------------------------------------------
SPEC = RandomModelSpec(
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    intermediate_size=256,
    dtype="float32",  # (Qwen3's vocabulary: GPTQ calibrates on text through the real tokenizer)
    seed=21,
)


@pytest.fixture(scope="module")
def rotated_w8a8(tmp_path_factory):
    from a8w8_serve.main import main

    root = tmp_path_factory.mktemp("rotation")
    write_random_qwen3(root / "float", SPEC, tokenizer_dir=qwen3_tokenizer_dir())
    main(["quantize", str(root / "float"), str(root / "w8a8"), "--rotate"])
    main(["quantize", str(root / "float"), str(root / "gptq"), "--rotate", "--gptq"])
    return root


def test_quantize_rotate_round_trips_through_the_loader(rotated_w8a8):
    cfg = json.loads((rotated_w8a8 / "w8a8" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    r4 = qc["transform_config"]["config_groups"]["R4"]
    assert r4["type"] == "hadamard" and r4["head_dim"] == 256 and not r4["randomize"]
    assert [a["location"] for a in r4["apply"]] == ["input", "weight_input"]
    r3 = qc["transform_config"]["config_groups"]["R3"]  # (--rotate includes R3 unless --no-r3)
    assert r3["type"] == "hadamard" and r3["head_dim"] == 32
    weights = load_model_weights(rotated_w8a8 / "w8a8")
    assert weights.online == OnlineTransforms(down_proj_input_block=256, qk_head_hadamard=True)
    assert weights.layers[0].linears["mlp.down_proj"].qweight.dtype == torch.int8
    # A8W8 of the rotated model stays close to the float model (unrotated): the transform is applied
    prompt = list(range(7, 7 + PROMPT_LEN))
    ref, _ = _logits_and_greedy(_runner(rotated_w8a8 / "float"), prompt)
    got, _ = _logits_and_greedy(_runner(rotated_w8a8 / "w8a8", "auto", "int8"), prompt)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    runner = _runner(rotated_w8a8 / "w8a8", "auto", "int8")
    runner.model.layers[0].down.input_hadamard = 0  # without R4's online half the model is another one
    wrong, _ = _logits_and_greedy(runner, prompt)
    assert (wrong - ref).abs().max() > 4 * (got - ref).abs().max()


def test_quantize_no_r3_leaves_r3_out(rotated_w8a8, tmp_path):
    from a8w8_serve.main import main

    main(["quantize", str(rotated_w8a8 / "float"), str(tmp_path / "no-r3"), "--rotate", "--no-r3"])
    groups = json.loads((tmp_path / "no-r3" / "config.json").read_text())["quantization_config"]["transform_config"]
    assert set(groups["config_groups"]) == {"R1", "R2", "R4"}
    assert load_model_weights(tmp_path / "no-r3").online == OnlineTransforms(down_proj_input_block=256)
    with pytest.raises(SystemExit, match="--no-r3 applies only with --rotate"):
        main(["quantize", str(rotated_w8a8 / "float"), str(tmp_path / "plain"), "--no-r3"])


def test_decoder_stack_applies_the_rotation_like_the_layer_loop(rotated_w8a8):
    stacked, looped = (_runner(rotated_w8a8 / "w8a8", "auto", "int8") for _ in range(2))
    if stacked.model.decode_stack is None:
        pytest.skip("the C decoder stack is unavailable here")
    looped.model.decode_stack = None
    prompts = {1: list(range(3, 9)), 2: list(range(40, 63))}
    results = []
    for runner in (stacked, looped):
        d = Driver(runner)
        d.run(
            new=[NewSequence(s, p, len(p), 0, SamplingOptions(temperature=0, logprobs=3)) for s, p in prompts.items()]
        )
        out = [d.run(chunks=[(s, len(p), True) for s, p in prompts.items()]).tokens]
        out += [d.run(chunks=[(s, 1, True) for s in prompts]).tokens for _ in range(8)]
        results.append(out)
    assert results[0] == results[1]


def _with_transform(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"]["transform_config"]["config_groups"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_transforms_we_do_not_implement_are_refused_by_name(rotated_w8a8, tmp_path):
    src = rotated_w8a8 / "w8a8"

    def output(groups):  # a transform of q_proj's output (not R3's place: before RoPE)
        groups["R5"] = {
            "type": "hadamard",
            "randomize": False,
            "head_dim": 32,
            "apply": [{"targets": ["re:.*self_attn.q_proj$"], "location": "output", "inverse": False}],
        }

    def r3_queries_only(groups):
        groups["R3"]["apply"] = groups["R3"]["apply"][:1]

    def r3_block(groups):
        groups["R3"]["head_dim"] = 16

    def random_online(groups):
        groups["R4"]["type"] = "random-hadamard"

    def odd_block(groups):
        groups["R4"]["head_dim"] = 96

    cases = {
        "output": (output, r"config_groups\.R5\.apply\[0\].*'output'"),
        "r3_queries_only": (r3_queries_only, r"R3 rotates queries and keys together; 'k_cache' is missing"),
        "r3_block": (r3_block, r"config_groups\.R3\.head_dim.*16 on queries and keys of head_dim 32"),
        "random": (random_online, r"config_groups\.R4\.type.*random-hadamard"),
        "block": (odd_block, r"config_groups\.R4\.head_dim.*96"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_model_weights(_with_transform(src, tmp_path / name, edit))


def test_a_stored_r4_matrix_must_be_the_one_the_kernels_compute(rotated_w8a8, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    dst = tmp_path / "tampered"
    shutil.copytree(rotated_w8a8 / "w8a8", dst)
    (shard,) = dst.glob("*.safetensors")
    tensors = load_file(shard)
    name = f"model.layers.1.mlp.down_proj.{R4_TENSOR}"
    tensors[name] = tensors[name][torch.randperm(256, generator=torch.Generator().manual_seed(0))].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"R4_input\.weight.*not Sylvester's Hadamard"):
        load_model_weights(dst)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]["transform_config"]  # R4 matrices the config does not announce
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"R4_input\.weight.*not part of the model"):
        load_model_weights(dst)


def test_rotate_refuses_what_it_cannot_rotate(rotated_w8a8, tmp_path):
    from offline.smooth_quant import smooth_checkpoint

    with pytest.raises(ConfigError, match="rotate a float checkpoint"):
        rotate_checkpoint(rotated_w8a8 / "w8a8", tmp_path / "again")
    rotated = rotate_checkpoint(rotated_w8a8 / "float", tmp_path / "rotated")
    with pytest.raises(ConfigError, match="smooth before rotating"):
        smooth_checkpoint(rotated, tmp_path / "smoothed")
    odd = RandomModelSpec(hidden_size=72 * 2, num_heads=4, num_kv_heads=2, head_dim=36, vocab_size=300)
    write_random_qwen3(tmp_path / "odd", odd, tokenizer_dir=qwen3_tokenizer_dir())
    with pytest.raises(ConfigError, match="head_dim 36"):
        rotate_checkpoint(tmp_path / "odd", tmp_path / "odd-rotated")


# ---- GPTQ rounding -----------------------------------------------------------------------------------------
def test_gptq_rounding_moves_the_layer_output_less_than_rounding_to_nearest():
    from loaders.quantization import quantize_weight
    from offline.gptq import gptq_quantize

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 96, generator=g)
    # correlated input channels (a few directions carry most of the signal, as in a model's activations):
    # what GPTQ's error feedback exploits
    x = torch.randn(400, 24, generator=g) @ torch.randn(24, 96, generator=g) + 0.1 * torch.randn(400, 96, generator=g)
    q_rtn, s_rtn = quantize_weight(w)
    q, s = gptq_quantize(w, x.double().t() @ x.double() / len(x))
    assert torch.equal(s, s_rtn) and q.dtype == torch.int8  # same scales, same format
    err = (x @ (w - q.float() * s[:, None]).t()).norm()
    err_rtn = (x @ (w - q_rtn.float() * s_rtn[:, None]).t()).norm()
    assert err < 0.5 * err_rtn
    assert (q.int() - q_rtn.int()).abs().max() <= 3  # a re-rounding, not another weight


def test_quantize_gptq_writes_the_same_format_with_other_integers(rotated_w8a8):
    from safetensors.torch import load_file

    rtn, gptq = (load_file(next((rotated_w8a8 / d).glob("*.safetensors"))) for d in ("w8a8", "gptq"))
    assert rtn.keys() == gptq.keys()
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(rtn[f"{name}.weight_scale"], gptq[f"{name}.weight_scale"])
    assert not torch.equal(rtn[f"{name}.weight"], gptq[f"{name}.weight"])
    # GPTQ's contract: the layers' outputs move less on inputs like its calibration text's (on the real model
    # that carries over to other text: eval-quality's rows)
    from engine.tokenizer import load_tokenizer
    from loaders.assets import calibration_text_path

    prompt = load_tokenizer(rotated_w8a8 / "float").encode(calibration_text_path().read_text())[:200]
    ref, _ = _logits_and_greedy(_runner(rotated_w8a8 / "float"), prompt)
    errs = {
        d: (_logits_and_greedy(_runner(rotated_w8a8 / d, "auto", "fp32"), prompt)[0] - ref).norm()
        for d in ("w8a8", "gptq")
    }
    assert errs["gptq"] < errs["w8a8"]
