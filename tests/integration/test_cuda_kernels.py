"""The CUDA backend's Triton kernels against the eager reference, on small shapes with K and N tails.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here before they are
imported) on CPU tensors; on a machine with a GPU the same tests run them on it. INT8 arithmetic is compared
bit for bit; float math within tolerances that say which rounding differs.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

ON_GPU = torch.cuda.is_available()
# conftest.py sets TRITON_INTERPRET=1 where there is no GPU (before anything imports Triton)
assert ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import BLOCK_SIZE, TINY_SPEC, Driver  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

from loaders.quantization import FloatLinear, quantize_activations, quantize_linear  # noqa: E402
from npu.backends import get_backend, resolve_device  # noqa: E402
from npu.backends.base import RMSNorm, TorchOps, rms_norm, silu_and_mul  # noqa: E402
from npu.backends.cpu.backend import Int8GemmLinear  # noqa: E402
from npu.backends.cuda import CudaBackend  # noqa: E402
from npu.backends.cuda.attention import (  # noqa: E402
    DECODE_SPLIT_TOKENS,
    PREFILL_BLOCK_M,
    decode_attention,
    prefill_attention,
    qk_norm_rope,
    write_kv_int8,
)
from npu.backends.cuda.decode_graphs import PaddedDecodeStack  # noqa: E402
from npu.backends.cuda.linear import (  # noqa: E402
    DECODE_CONFIGS,
    FLOAT_CONFIG,
    INTERPRETER_CONFIG,
    PREFILL_CONFIGS,
    PROLOGUE_BLOCK,
    SMALL_BATCH_CONFIGS,
    TritonLinear,
    choose_config,
    gemm,
    rows_prologue,
)
from npu.config import WorkerConfig  # noqa: E402
from npu.kv_cache import PagedKVCache  # noqa: E402
from npu.messages import NewSequence, SamplingOptions  # noqa: E402
from npu.model import DecodeGroup, ForwardBatch, SeqSpan  # noqa: E402
from npu.runner import ModelRunner  # noqa: E402

DEV = torch.device("cuda") if ON_GPU else torch.device("cpu")
# The configurations choose_config can pick here: the interpreter's one wide tile is chosen only under the
# interpreter (on a GPU its 16x4096 INT8 tile needs more shared memory than an SM has: it failed on an H200).
GPU_CONFIGS = DECODE_CONFIGS + SMALL_BATCH_CONFIGS + PREFILL_CONFIGS
ALL_CONFIGS = GPU_CONFIGS if ON_GPU else GPU_CONFIGS + (INTERPRETER_CONFIG,)
FLOAT_CONFIGS = {"float": FLOAT_CONFIG} if ON_GPU else {"float": FLOAT_CONFIG, "interpreter": INTERPRETER_CONFIG}
# fp32 results of reordered sums (RMSNorm's mean, the attention dots): a few ulp of values of order 1-10
FP32_ATOL = 1e-4
# fp16 operands (prefill attention's dots): fp16's 11-bit mantissa on values of order 1
FP16_ATOL = 5e-3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def int8_reference(q, scale_x, lw, residual=None):
    """The eager A8W8 epilogue on given INT8 activations: exact INT32 product, then Int8GemmLinear's order."""
    acc = q.cpu().int() @ lw.qweight.int().t()
    y = torch.mul(acc, scale_x.cpu()[:, None]).mul_(lw.scale)
    if lw.bias is not None:
        y = y.add_(lw.bias)
    return y if residual is None else residual + y


# ---- linears -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [200, PROLOGUE_BLOCK + 37])  # one pass, and several passes with a tail
def test_plain_quantization_is_bit_exact(k):
    x = torch.randn(7, k, generator=gen(0)) * 3
    x[2] = 0.0  # an all-zero row: scale 0, codes 0
    q, s = rows_prologue(x.to(DEV), k, None, False, True)
    qr, sr = quantize_activations(x)
    assert torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)


@pytest.mark.parametrize("k", [200, PROLOGUE_BLOCK + 37])
def test_norm_and_gate_prologues_match_the_reference(k):
    x = torch.randn(6, 2 * k, generator=gen(1))
    w = torch.rand(k, generator=gen(2)) + 0.5
    cases = [
        (x[:, :k].contiguous(), RMSNorm(w.to(DEV), 1e-6), False, rms_norm(x[:, :k], w, 1e-6)),
        (x, None, True, silu_and_mul(x)),
    ]
    for inp, norm, gated, expect in cases:
        q, s = rows_prologue(inp.to(DEV), k, norm, gated, True)
        qr, sr = quantize_activations(expect)
        torch.testing.assert_close(s.cpu(), sr, rtol=1e-5, atol=0)
        diff = (q.cpu().int() - qr.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # a reordered sum moves few roundings
        f, none = rows_prologue(inp.to(DEV), k, norm, gated, False)  # the float prologue (float linears)
        assert none is None
        torch.testing.assert_close(f.cpu(), expect, rtol=1e-5, atol=FP32_ATOL)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: f"{c.block_m}x{c.block_n}x{c.block_k}")
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_int8_gemm_every_config_is_bit_exact(config, split_k):
    """Every configuration choose_config can pick, split or not, with M, N and K tails (no size a multiple
    of a block) and with and without bias and residual: equal to the INT32 reference bit for bit."""
    n, k = 150, 2 * config.block_k * split_k + 37
    lw = quantize_linear(torch.randn(n, k, generator=gen(3)), torch.randn(n, generator=gen(4)))
    no_bias = replace(lw, bias=None)
    cfg = replace(config, split_k=split_k)
    for m in (1, 5, config.block_m + 3):
        q, s = quantize_activations(torch.randn(m, k, generator=gen(m)))
        res = torch.randn(m, n, generator=gen(5))
        for weights, residual in ((lw, res), (no_bias, None)):
            y = gemm(
                q.to(DEV),
                weights.qweight.to(DEV),
                a_scale=s.to(DEV),
                w_scale=weights.scale.to(DEV),
                bias=None if weights.bias is None else weights.bias.to(DEV),
                residual=None if residual is None else residual.to(DEV),
                config=cfg,
            )
            assert torch.equal(y.cpu(), int8_reference(q, s, weights, residual)), (m, weights.bias is None)


@pytest.mark.parametrize("config", FLOAT_CONFIGS.values(), ids=FLOAT_CONFIGS.keys())
def test_float_gemm_accumulates_in_fp32_and_refuses_a_split(config):
    w = torch.randn(90, 130, generator=gen(6)).bfloat16()
    x = torch.randn(9, 130, generator=gen(7))
    res = torch.randn(9, 90, generator=gen(8))
    y = gemm(x.to(DEV), w.to(DEV), residual=res.to(DEV), config=config)
    torch.testing.assert_close(y.cpu(), res + x @ w.float().t(), rtol=1e-5, atol=FP32_ATOL)
    with pytest.raises(ValueError, match="do not split"):
        gemm(x.to(DEV), w.to(DEV), config=replace(config, split_k=2))


# Qwen3 shapes (0.6B: hidden 1024, 14B: hidden 5120) at decode, small-batch and prefill row counts
@pytest.mark.parametrize("m", [1, 8, 16, 17, 64, 65, 512, 2048])
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 2048), (7168, 5120), (5120, 17408), (151936, 5120)])
def test_choose_config_picks_a_tested_config(m, n, k):
    cfg = choose_config(m, n, k, True, num_sms=132)
    tile = replace(cfg, split_k=1)
    assert tile in GPU_CONFIGS  # only configurations the tests above ran
    assert cfg.split_k == 1 or k // cfg.split_k >= 2 * cfg.block_k  # each split keeps whole K steps to do
    assert choose_config(m, n, k, False, 132) == FLOAT_CONFIG  # float: one config for every M
    assert choose_config(m, n, k, True, 4, interpreted=True) == INTERPRETER_CONFIG


def test_linear_op_matches_the_cpu_reference():
    k, n = 96, 70
    lw = quantize_linear(torch.randn(n, k, generator=gen(9)), torch.randn(n, generator=gen(10)))
    ours, ref = TritonLinear(lw, DEV, 4), Int8GemmLinear(lw)
    x = torch.randn(5, k, generator=gen(11))
    res = torch.randn(5, n, generator=gen(12))
    assert torch.equal(ours(x.to(DEV), residual=res.to(DEV)).cpu(), ref(x, residual=res))
    out = torch.empty(5, n, device=DEV)
    assert ours(x.to(DEV), out=out) is out
    with pytest.raises(ValueError, match="not both"):
        ours(torch.randn(5, 2 * k, device=DEV), norm=RMSNorm(torch.ones(k, device=DEV), 1e-6), gated=True)
    fl = FloatLinear(torch.randn(n, k, generator=gen(13)))
    torch.testing.assert_close(TritonLinear(fl, DEV, 4)(x.to(DEV)).cpu(), x @ fl.weight.t(), rtol=1e-5, atol=FP32_ATOL)


# ---- attention side ----------------------------------------------------------------------------------------
def _cache(hkv: int, d: int, num_blocks: int = 96) -> PagedKVCache:
    return PagedKVCache("int8", 1, hkv, d, num_blocks, 16, DEV)


def _layer(cache: PagedKVCache) -> dict[str, torch.Tensor]:
    return {name: t[0] for name, t in cache.tensors.items()}


@pytest.mark.parametrize("with_norm", [True, False])
def test_qk_norm_rope_matches_the_reference(with_norm):
    t, h, d = 5, 6, 32
    qk = torch.randn(t, h + 2, d, generator=gen(14))[:, :h]  # a strided view, as the model's qkv slice is
    pos = torch.tensor([0, 3, 7, 100, 2])
    cos, sin = torch.randn(128, d, generator=gen(15)), torch.randn(128, d, generator=gen(16))
    w = torch.rand(h, d, generator=gen(17)) + 0.5
    norm = RMSNorm(w, 1e-6) if with_norm else None
    expect = TorchOps().qk_norm_rope(qk.clone(), norm, cos, sin, pos)
    got = qk.to(DEV)
    qk_norm_rope(got, w.to(DEV) if with_norm else None, 1e-6, cos.to(DEV), sin.to(DEV), pos.to(DEV))
    torch.testing.assert_close(got.cpu(), expect, rtol=1e-5, atol=FP32_ATOL)


def test_int8_kv_write_is_bit_exact_and_skips_padding_slots():
    hkv, d, t = 2, 48, 40  # head_dim not a power of two: masked lanes
    k, v = torch.randn(t, hkv, d, generator=gen(18)), torch.randn(t, hkv, d, generator=gen(19))
    k[3] = 0.0
    slots = torch.randperm(96 * 16, generator=gen(20))[:t]
    ours, ref = _cache(hkv, d), PagedKVCache("int8", 1, hkv, d, 96, 16)
    padded = slots.clone()
    padded[-1] = -1  # a padding row (a CUDA graph's unused batch row): nothing written
    write_kv_int8(_layer(ours), padded.to(DEV), k.to(DEV), v.to(DEV))
    ref.write(0, slots[:-1], k[:-1], v[:-1])
    for name in ref.tensors:
        assert torch.equal(ours.tensors[name].cpu(), ref.tensors[name]), name


def _filled_cache(hkv: int, d: int, n: int, seed: int) -> tuple[PagedKVCache, torch.Tensor]:
    cache = _cache(hkv, d)
    slots = torch.randperm(96 * 16, generator=gen(seed))[:n]
    k, v = torch.randn(n, hkv, d, generator=gen(seed + 1)), torch.randn(n, hkv, d, generator=gen(seed + 2))
    write_kv_int8(_layer(cache), slots.to(DEV), k.to(DEV), v.to(DEV))
    return cache, slots


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 32), (10, 2, 64), (3, 3, 16)])  # GQA 2:1, 5:1, MHA
def test_decode_attention_matches_sdpa_and_is_batch_invariant(hq, hkv, d):
    longest = DECODE_SPLIT_TOKENS + 60  # two splits, the second partial
    cache, slots = _filled_cache(hkv, d, longest, 21)
    lengths = [longest, 17, 1, DECODE_SPLIT_TOKENS]
    spans = [SeqSpan(i, 1, slots[:n].to(DEV)) for i, n in enumerate(lengths)]
    group = DecodeGroup.build(spans, len(spans)).to(DEV)
    q = torch.randn(len(lengths), hq, d, generator=gen(22)).to(DEV)
    scale = d**-0.5
    got = decode_attention(q, _layer(cache), group.slots, group.lengths, scale)
    expect = TorchOps().decode_attention(q, cache, 0, group.slots, group.lengths, scale)
    torch.testing.assert_close(got.reshape(len(lengths), -1), expect, rtol=1e-5, atol=FP32_ATOL)
    # the 17-token sequence alone, padded to a different width: the same numbers bit for bit
    alone = DecodeGroup.build([SeqSpan(0, 1, slots[:17].to(DEV))], 1).to(DEV)
    assert torch.equal(decode_attention(q[1:2], _layer(cache), alone.slots, alone.lengths, scale), got[1:2])
    # a length-0 row (padding) gives zeros, not NaN
    empty = decode_attention(
        q[:1], _layer(cache), group.slots[:1], torch.zeros(1, dtype=torch.int32, device=DEV), scale
    )
    assert torch.equal(empty.cpu(), torch.zeros_like(empty.cpu()))


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 32), (10, 2, 64)])
def test_prefill_attention_matches_sdpa_whatever_the_chunking(hq, hkv, d):
    ctx = 150
    cache, slots = _filled_cache(hkv, d, ctx, 23)
    q = torch.randn(ctx, hq, d, generator=gen(24))
    scale = d**-0.5
    kv = cache.read(0, slots.to(DEV), torch.float32)
    for n in (ctx, 70, 1):  # the whole prompt, a last chunk, a single query
        got = prefill_attention(q[-n:].to(DEV), _layer(cache), slots.to(DEV), scale)
        expect = (
            F.scaled_dot_product_attention(
                q[-n:].transpose(0, 1)[None],
                kv.k.cpu().transpose(0, 1)[None],
                kv.v.cpu().transpose(0, 1)[None],
                attn_mask=causal_lower_right(n, ctx),
                scale=scale,
                enable_gqa=hq != hkv,
            )[0]
            .transpose(0, 1)
            .reshape(n, -1)
        )
        torch.testing.assert_close(got.cpu(), expect, rtol=0, atol=FP16_ATOL)
    # A chunk's rows against the same rows of the whole prompt: the key blocks start at 0 either way, so a
    # chunk whose queries fall on the same rows of their tile is bit-identical; shifted rows differ only in
    # the dot products' fp32 rounding.
    whole = prefill_attention(q.to(DEV), _layer(cache), slots.to(DEV), scale)
    aligned = ctx - 2 * PREFILL_BLOCK_M
    assert torch.equal(whole[-aligned:], prefill_attention(q[-aligned:].to(DEV), _layer(cache), slots.to(DEV), scale))
    shifted = prefill_attention(q[-70:].to(DEV), _layer(cache), slots.to(DEV), scale)
    torch.testing.assert_close(shifted, whole[-70:], rtol=0, atol=FP32_ATOL)


# ---- the whole model on the backend ----------------------------------------------------------------------------
SPEC = replace(TINY_SPEC, seed=5)


def _runner(model_dir, device: str, quantization="auto", kv="int8", dtype="auto") -> ModelRunner:
    return ModelRunner(
        WorkerConfig(
            model_dir=str(model_dir),
            device=device,
            quantization=quantization,
            kv_cache_dtype=kv,
            dtype=dtype,
            kv_cache_memory_bytes=4 << 20,
            block_size=BLOCK_SIZE,
            max_model_len=256,
        )
    )


def test_device_selection():
    backend = get_backend("cuda")
    assert isinstance(backend, CudaBackend) and backend.device.type == DEV.type
    assert resolve_device("auto") == ("cuda" if ON_GPU else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_float_model_on_the_cuda_backend_matches_transformers(model_factory):
    """fp32 weights and KV: the float GEMM, RoPE kernel and the model's generic attention on the device
    against transformers, logits and 16 greedy tokens."""
    transformers = pytest.importorskip("transformers")
    spec = replace(SPEC, dtype="float32")
    model_dir = model_factory(spec, tokenizer=False)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    prompt = torch.randint(0, spec.vocab_size, (19,), generator=gen(25)).tolist()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    runner = _runner(model_dir, "cuda", quantization="none", kv="fp32")
    d = Driver(runner)
    d.run(new=[NewSequence(1, prompt, len(prompt), 0, SamplingOptions(temperature=0))])
    got = [d.run(chunks=[(1, len(prompt), True)]).tokens[0].token_id]
    for _ in range(15):
        got.append(d.run(chunks=[(1, 1, True)]).tokens[0].token_id)
    assert got == ref[0, len(prompt) :].tolist()


def _greedy(runner: ModelRunner, prompts: dict[int, list[int]], steps: int) -> dict[int, list[int]]:
    """Greedy tokens of every prompt decoded together (chunked prefill of 5, then one token per step)."""
    d = Driver(runner)
    d.run(new=[NewSequence(s, p, len(p), 0, SamplingOptions(temperature=0)) for s, p in prompts.items()])
    out: dict[int, list[int]] = {s: [] for s in prompts}
    done = dict.fromkeys(prompts, 0)
    while any(len(t) < steps for t in out.values()):
        chunks = []
        for s, p in prompts.items():
            if done[s] < len(p):
                n = min(5, len(p) - done[s])
                done[s] += n
                chunks.append((s, n, done[s] == len(p)))
            elif len(out[s]) < steps:
                chunks.append((s, 1, True))
        for t in d.run(chunks=chunks).tokens:
            out[t.seq_id].append(t.token_id)
    return out


def test_a8w8_model_matches_the_cpu_backend_and_is_batch_invariant(model_factory):
    model_dir = model_factory(SPEC, quantized=True, tokenizer=False)
    prompts = {s: torch.randint(0, SPEC.vocab_size, (8 + 3 * s,), generator=gen(30 + s)).tolist() for s in range(3)}
    cuda = _runner(model_dir, "cuda")
    # prompt logits close to the CPU backend's (the same INT8 codes up to rare RMSNorm rounding moves)
    logits = {}
    for name, runner in (("cuda", cuda), ("cpu", _runner(model_dir, "cpu"))):
        batch = ForwardBatch(
            token_ids=torch.tensor(prompts[2]),
            positions=torch.arange(len(prompts[2])),
            slot_mapping=torch.arange(len(prompts[2])),
            seqs=[SeqSpan(0, len(prompts[2]), torch.arange(len(prompts[2])))],
            logits_rows=torch.tensor([len(prompts[2]) - 1]),
        )
        logits[name] = runner.model.forward(batch, runner.cache)
    assert logits["cuda"].device.type == "cpu"  # handed to the sampler on the host
    spread = logits["cpu"].abs().max().item()
    assert (logits["cuda"] - logits["cpu"]).abs().max().item() < 0.05 * spread
    # each sequence decoded alone gives the tokens it gets decoded in a batch of three
    together = _greedy(_runner(model_dir, "cuda"), prompts, 5)
    for s in (0, 2):  # the shortest and the longest prompt
        assert _greedy(_runner(model_dir, "cuda"), {s: prompts[s]}, 5)[s] == together[s], s


def test_padded_decode_stack_equals_the_layer_loop(model_factory):
    """The CUDA-graph path's padding (batch and context rounded up, padding rows with no KV slot and no
    context), run eagerly here: the real rows' residual stream equals the plain layer loop's bit for bit,
    and the padding writes no KV."""
    model_dir = model_factory(SPEC, quantized=True, tokenizer=False)
    runner = _runner(model_dir, "cuda")
    model, cache = runner.model, runner.cache
    lengths = [9, 3, 14]
    ctx = [torch.arange(i * 16, i * 16 + n) for i, n in enumerate(lengths)]
    for i, c in enumerate(ctx):  # fill each context's KV with a prefill
        prefill = ForwardBatch(
            token_ids=torch.randint(0, SPEC.vocab_size, (len(c),), generator=gen(40 + i)),
            positions=torch.arange(len(c)),
            slot_mapping=c,
            seqs=[SeqSpan(0, len(c), c)],
            logits_rows=torch.tensor([len(c) - 1]),
        )
        model.forward(prefill, cache)
    new_slots = torch.tensor([c[-1].item() + 1 for c in ctx])
    spans = [SeqSpan(i, 1, torch.cat([c, new_slots[i : i + 1]])) for i, c in enumerate(ctx)]

    def step() -> ForwardBatch:
        b = ForwardBatch(
            token_ids=torch.tensor([5, 7, 11]),
            positions=torch.tensor(lengths),
            slot_mapping=new_slots,
            seqs=list(spans),
            logits_rows=torch.arange(3),
        )
        b.group_decodes()
        return b.to(model.device)

    before = {name: t.clone() for name, t in cache.tensors.items()}
    b = step()
    x = model.embed[b.token_ids].float()
    loop = model._layer_loop(x.clone(), b, cache, None)
    stack = PaddedDecodeStack(
        lambda x, batch, c: model._layer_loop(x, batch, c, None), SPEC.hidden_size, 256, model.device, capture=False
    )
    for name, t in cache.tensors.items():  # back to the cache before the step
        t.copy_(before[name])
    padded = x.clone()
    assert stack.decode(padded, b.positions, b.slot_mapping, b.decode.slots, b.decode.lengths, cache)
    assert torch.equal(padded, loop)
    assert next(iter(stack.steps))[:2] == (4, 256)  # three rows padded to four, 15 slots to 256
    written = torch.zeros(cache.tensors["k"].shape[1], dtype=torch.bool)
    written[new_slots] = True
    for name, t in cache.tensors.items():  # only the three new slots changed
        changed = (t.cpu() != before[name].cpu()).flatten(2).any(-1).any(0)
        assert not changed[~written].any(), name


# ---- the server on the backend --------------------------------------------------------------------------------
INTERPRETER_ENV = {} if ON_GPU else {"TRITON_INTERPRET": "1"}


def test_server_on_the_cuda_backend_answers_and_reports_its_device(serve_model):
    """``serve --device cuda``: a real worker process on the Triton kernels (interpreted where no GPU is)
    answers a chat completion through the openai client, and says where it runs in /version."""
    import httpx
    import openai
    from servers import CliServer

    server = CliServer(serve_model, "--device", "cuda", "--max-model-len", "256", env=INTERPRETER_ENV)
    try:
        version = httpx.get(f"{server.base}/version").json()
        assert version["backend"] == ("cuda-triton" if ON_GPU else "cuda-triton-interpreter")
        assert version["device"].startswith("cuda:0 (" if ON_GPU else "cpu (Triton interpreter")
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none")
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=2,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert reply.usage.completion_tokens == 2 and reply.choices[0].finish_reason == "length"
        server.log.flush()
        log = open(server.log.name).read()
        assert f"device         {version['device']}" in log
    finally:
        server.stop()


@pytest.mark.skipif(ON_GPU, reason="needs a machine without a CUDA device")
def test_device_cuda_without_a_gpu_is_a_clear_startup_error(serve_model, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "a8w8_serve", "serve", "--model", str(serve_model), "--device", "cuda", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "PyTorch sees no CUDA device" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
