"""The worker: A8W8 math against float64, batch invariance, INT8 vs BF16 KV, the process and its errors."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import BLOCK_SIZE, Driver, fastest_kernel_library

from loaders.quantization import Int8Linear, quantize_activations, quantize_linear
from loaders.weights import load_model_weights
from loaders.writer import RandomModelSpec
from npu.backends.cpu.backend import Int8GemmLinear
from npu.client import WorkerClient, WorkerDied, WorkerError
from npu.config import WorkerConfig
from npu.messages import NewSequence, SamplingOptions, ScheduledChunk, StepError, StepRequest
from npu.model import ForwardBatch, SeqSpan
from npu.runner import ModelRunner

SPEC = RandomModelSpec(
    hidden_size=128,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=48,
    intermediate_size=256,
    vocab_size=2000,
    seed=11,
)
GREEDY = SamplingOptions(temperature=0)
# A8W8 forward vs. a float64 evaluation of the same quantized math, relative to the largest |value|:
# what is left is fp32 rounding (and rare one-step flips of an activation code at a .5 boundary).
A8W8_REL_TOL = 1e-4
BF16_ULP = 2.0**-7  # spacing of bf16 numbers relative to their magnitude (upper bound)


def _runner(model_dir, quantization="a8w8", kv="fp32", **kw) -> ModelRunner:
    return ModelRunner(
        WorkerConfig(
            model_dir=str(model_dir),
            quantization=quantization,
            kv_cache_dtype=kv,
            kv_cache_memory_bytes=16 << 20,
            block_size=BLOCK_SIZE,
            max_model_len=512,
            **kw,
        )
    )


# ------------------------------------------------------------------------------------------------
# A8W8 math
# ------------------------------------------------------------------------------------------------
def test_int8_gemm_int32_exact_and_epilogue():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 160, generator=g)
    x = torch.randn(7, 160, generator=g) * 3
    lin = quantize_linear(w)
    op = Int8GemmLinear(lin)
    qx, sx = quantize_activations(x)
    acc = torch._int_mm(qx, lin.qweight.t())
    assert torch.equal(acc.long(), qx.long() @ lin.qweight.long().t())  # INT32 accumulation is exact
    ref = (qx.double() @ lin.qweight.double().t()) * sx.double()[:, None] * lin.scale.double()[None, :]
    assert torch.allclose(op(x).double(), ref, rtol=1e-6, atol=1e-6)


def _ref_forward(weights, tokens: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Dense float64 Qwen3 with A8W8 linears (per-token activation quantization in float64)."""
    cfg = weights.config

    def lin(x, w):
        if isinstance(w, Int8Linear):
            absmax = x.abs().amax(1)
            s = absmax / 127
            q = torch.round(x / torch.where(s > 0, s, torch.ones_like(s))[:, None]).clamp(-127, 127)
            return (q @ w.qweight.double().t()) * s[:, None] * w.scale.double()[None, :]
        # a float linear rounds its input to its weight's dtype; the output (the logits) stays unrounded
        return x.to(w.weight.dtype).double() @ w.weight.double().t()

    def rms(x, w):
        return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    T, d = len(tokens), cfg.head_dim
    x = weights.embed_tokens[torch.tensor(tokens)].double()
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).double() / d))
    f = torch.arange(T).double()[:, None] * inv[None]
    cos, sin = torch.cat([f, f], -1).cos()[:, None], torch.cat([f, f], -1).sin()[:, None]
    rot = lambda t: torch.cat([-t[..., d // 2 :], t[..., : d // 2]], -1)  # noqa: E731
    outs = []
    for L in weights.layers:
        h = rms(x, L.norms["input_layernorm"])
        q = lin(h, L.linears["self_attn.q_proj"]).view(T, cfg.num_heads, d)
        k = lin(h, L.linears["self_attn.k_proj"]).view(T, cfg.num_kv_heads, d)
        v = lin(h, L.linears["self_attn.v_proj"]).view(T, cfg.num_kv_heads, d)
        q, k = rms(q, L.norms["self_attn.q_norm"]), rms(k, L.norms["self_attn.k_norm"])
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        g = cfg.num_heads // cfg.num_kv_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        sc = torch.einsum("qhd,khd->hqk", q, k) * d**-0.5
        sc = sc.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        a = torch.einsum("hqk,khd->qhd", sc.softmax(-1), v).reshape(T, -1)
        x = x + lin(a, L.linears["self_attn.o_proj"])
        h = rms(x, L.norms["post_attention_layernorm"])
        gt, up = lin(h, L.linears["mlp.gate_proj"]), lin(h, L.linears["mlp.up_proj"])
        x = x + lin(torch.nn.functional.silu(gt) * up, L.linears["mlp.down_proj"])
        outs.append(x)
    return outs, lin(rms(x, weights.final_norm), weights.lm_head)


def test_a8w8_forward_matches_float64_reference(model_factory):
    model_dir = model_factory(SPEC, tokenizer=False)
    weights = load_model_weights(model_dir, "a8w8")
    runner = _runner(model_dir, "a8w8", kv="fp32")
    tokens = torch.randint(0, SPEC.vocab_size, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    layers: list[torch.Tensor] = []
    T = len(tokens)
    batch = ForwardBatch(
        torch.tensor(tokens), torch.arange(T), torch.arange(T), [SeqSpan(0, T, torch.arange(T))], torch.arange(T)
    )
    logits = runner.model.forward(batch, runner.cache, layers)
    ref_layers, ref_logits = _ref_forward(weights, tokens)
    for i, (ours, ref) in enumerate(zip(layers, ref_layers)):
        rel = ((ours.double() - ref).abs().max() / ref.abs().max()).item()
        print(f"layer {i}: max rel err {rel:.2e}")
        assert rel < A8W8_REL_TOL
    # logits come out of the bf16 lm_head, whose bf16-rounded inputs can flip by one step where ours and
    # the reference differ by 1e-7: allow one bf16 step at the scale of the largest logit
    diff = (logits.double() - ref_logits).abs()
    print(f"logits: max abs err {diff.max().item():.2e}, mean abs err {diff.mean().item():.2e}")
    assert diff.max() <= ref_logits.abs().max() * BF16_ULP
    assert diff.mean() <= ref_logits.abs().mean() * A8W8_REL_TOL


# ------------------------------------------------------------------------------------------------
# batching
# ------------------------------------------------------------------------------------------------
def _greedy_alone(model_dir, prompt, steps, kv="int8"):
    d = Driver(_runner(model_dir, kv=kv))
    d.run(new=[NewSequence(1, prompt, len(prompt), 0, GREEDY)])
    toks = [d.run(chunks=[(1, len(prompt), True)]).tokens[0].token_id]
    for _ in range(steps - 1):
        toks.append(d.run(chunks=[(1, 1, True)]).tokens[0].token_id)
    return toks


def test_batch_invariance(model_factory):
    model_dir = model_factory(SPEC, tokenizer=False)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, SPEC.vocab_size, (n,), generator=g).tolist() for n in (9, 3, 17, 30, 1, 12, 25, 6, 14)]
    steps = 12
    alone = _greedy_alone(model_dir, prompts[0], steps)
    d = Driver(_runner(model_dir, kv="int8"))
    d.run(new=[NewSequence(i, p, len(p), 0, GREEDY) for i, p in enumerate(prompts)])
    # prefill all 9 in one ragged step, then decode them together
    res = d.run(chunks=[(i, len(p), True) for i, p in enumerate(prompts)])
    got = [t.token_id for t in res.tokens if t.seq_id == 0]
    for _ in range(steps - 1):
        res = d.run(chunks=[(i, 1, True) for i in range(len(prompts))])
        got += [t.token_id for t in res.tokens if t.seq_id == 0]
    assert got == alone


def test_int8_kv_vs_bf16_kv(model_factory):
    """Report INT8-KV error; bound it by BF16-KV's own error against an fp32 cache."""
    model_dir = model_factory(SPEC, tokenizer=False)
    prompt = torch.randint(0, SPEC.vocab_size, (40,), generator=torch.Generator().manual_seed(9)).tolist()
    logits = {}
    for kv in ("int8", "bf16", "fp32"):
        r = _runner(model_dir, kv=kv)
        T = len(prompt)
        batch = ForwardBatch(
            torch.tensor(prompt), torch.arange(T), torch.arange(T), [SeqSpan(0, T, torch.arange(T))], torch.arange(T)
        )
        logits[kv] = r.model.forward(batch, r.cache)
    scale = logits["fp32"].abs().max()
    err_int8 = ((logits["int8"] - logits["fp32"]).abs().max() / scale).item()
    err_bf16 = ((logits["bf16"] - logits["fp32"]).abs().max() / scale).item()
    steps = 64
    a, b = _greedy_alone(model_dir, prompt, steps, "int8"), _greedy_alone(model_dir, prompt, steps, "bf16")
    agree = sum(x == y for x, y in zip(a, b))
    first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    print(
        f"\nmax |logit error| / max |logit| against an fp32 KV cache: INT8 KV {err_int8:.2e}, BF16 KV {err_bf16:.2e}; "
        f"greedy INT8 vs BF16 KV agree on {agree}/{steps} steps (first divergence at step {first_diff}; "
        "random weights give near-flat logits, so small errors flip ties)"
    )
    assert err_int8 <= 2 * err_bf16 + 1e-3


# ------------------------------------------------------------------------------------------------
# the process
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker(model_factory):
    model_dir = model_factory(SPEC, quantized=True, tokenizer=False)
    client = WorkerClient(
        WorkerConfig(model_dir=str(model_dir), kv_cache_memory_bytes=8 << 20, block_size=16, max_model_len=256)
    )
    client.wait_ready(timeout=120)
    yield client
    client.shutdown()


def test_worker_process_prefill_decode_and_errors(worker, model_factory):
    info = worker.info
    assert info.block_size == 16 and info.max_model_len == 256 and info.vocab_size == SPEC.vocab_size
    assert info.num_blocks > 0 and info.quantization == "a8w8" and info.kv_cache_dtype == "int8"
    prompt = list(range(1, 21))
    r = worker.step(StepRequest(1, [], [NewSequence(7, prompt, 20, 0, GREEDY)], [ScheduledChunk(7, 20, [0, 1], True)]))
    tokens = [r.tokens[0].token_id]
    for i in range(2):
        r = worker.step(StepRequest(2 + i, [], [], [ScheduledChunk(7, 1, [], True)]))
        tokens.append(r.tokens[0].token_id)
    # A sequence whose part of a step the worker cannot run fails alone; sequence 7 decodes on in the same steps.
    r = worker.step(
        StepRequest(
            10,
            [],
            [NewSequence(8, prompt * 2, 40, 0, GREEDY)],
            [ScheduledChunk(99, 1, [], True), ScheduledChunk(7, 1, [], True), ScheduledChunk(8, 40, [5], True)],
        )
    )
    assert {f.seq_id: f.message for f in r.failed} == {
        99: "chunk for unknown sequence 99",
        8: "sequence 8: block table too short for 40 tokens",
    }
    tokens.append(r.tokens[0].token_id)
    bad_token = NewSequence(9, [1, SPEC.vocab_size], 2, 0, GREEDY)
    bad_bias = NewSequence(10, [1, 2], 2, 0, SamplingOptions(temperature=0, logit_bias={10**6: 1.0}))
    r = worker.step(
        StepRequest(
            11,
            [],
            [bad_token, bad_bias],
            [ScheduledChunk(9, 2, [6], True), ScheduledChunk(10, 2, [7], True), ScheduledChunk(7, 1, [], True)],
        )
    )
    assert sorted(f.seq_id for f in r.failed) == [9, 10]
    assert "outside the vocabulary" in r.failed[0].message and "outside the vocabulary" in r.failed[1].message
    tokens.append(r.tokens[0].token_id)
    # same tokens as the in-process runner on the same checkpoint: the failures did not disturb sequence 7
    assert [t.seq_id for t in r.tokens] == [7]
    assert tokens == _greedy_alone(model_factory(SPEC, quantized=True, tokenizer=False), prompt, 5, kv="int8")
    # a failed sequence is forgotten by the worker
    r = worker.step(StepRequest(12, [], [], [ScheduledChunk(7, 1, [100000], True)]))
    assert r.failed[0].message == f"sequence 7: block index 100000 out of range [0, {info.num_blocks})"
    r = worker.step(StepRequest(13, [], [], [ScheduledChunk(7, 1, [], True)]))
    assert r.failed[0].message == "chunk for unknown sequence 7" and r.tokens == []
    # a message that is not a step at all is refused as a whole; the worker keeps serving
    worker._conn.send_bytes(b"\x00not msgpack")
    assert isinstance(worker._recv(timeout=30), StepError)
    r = worker.step(
        StepRequest(14, [], [NewSequence(11, prompt, 20, 0, GREEDY)], [ScheduledChunk(11, 20, [0, 1], True)])
    )
    assert r.failed == [] and r.tokens[0].token_id == tokens[0]


def test_failed_sequence_takes_down_readers_of_its_blocks_and_nothing_else(model_factory):
    """A rejected sequence's new blocks are never written: a sequence that would read them in the same
    step (a prefix-cache hit on them) fails too; an unrelated one runs."""
    r = _runner(model_factory(SPEC, quantized=True, tokenizer=False), kv="int8")
    prompt = list(range(5, 17))
    bad = NewSequence(1, prompt + [SPEC.vocab_size], 13, 0, GREEDY)  # rejected: a token past the vocabulary
    reader = NewSequence(2, prompt + [3], 13, 0, GREEDY)
    other = NewSequence(3, prompt[::-1], 12, 0, GREEDY)
    res = r.execute(
        StepRequest(
            1,
            [],
            [bad, reader, other],
            [
                ScheduledChunk(1, 13, [0, 1, 2, 3], True),
                ScheduledChunk(2, 13, [0, 1, 2, 4], True),  # shares blocks 0-2 with sequence 1
                ScheduledChunk(3, 12, [5, 6, 7], True),
            ],
        )
    )
    assert sorted(f.seq_id for f in res.failed) == [1, 2]
    assert [t.seq_id for t in res.tokens] == [3] and set(r.seqs) == {3}
    alone = _greedy_alone(model_factory(SPEC, quantized=True, tokenizer=False), prompt[::-1], 1, kv="int8")
    assert res.tokens[0].token_id == alone[0]


def test_forward_failure_fails_that_steps_sequences_only(model_factory, monkeypatch):
    r = _runner(model_factory(SPEC, quantized=True, tokenizer=False), kv="int8")
    d = Driver(r)
    d.run(new=[NewSequence(1, [1, 2, 3], 3, 0, GREEDY), NewSequence(2, [4, 5, 6], 3, 0, GREEDY)])
    first = d.run(chunks=[(1, 3, True)])
    real_forward = r.model.forward

    def broken(batch, cache):
        raise RuntimeError("kernel failure")

    monkeypatch.setattr(r.model, "forward", broken)
    res = d.run(chunks=[(2, 3, True)])
    assert [(f.seq_id, f.message) for f in res.failed] == [(2, "forward failed: RuntimeError: kernel failure")]
    assert set(r.seqs) == {1}
    monkeypatch.setattr(r.model, "forward", real_forward)
    res = d.run(chunks=[(1, 1, True)])  # sequence 1 decodes on from where it was
    assert (
        res.failed == []
        and res.tokens[0].token_id
        == _greedy_alone(model_factory(SPEC, quantized=True, tokenizer=False), [1, 2, 3], 2, kv="int8")[1]
    )
    assert first.tokens[0].seq_id == 1


def test_worker_death_is_seen_at_once(model_factory):
    model_dir = model_factory(SPEC, quantized=True, tokenizer=False)
    client = WorkerClient(WorkerConfig(model_dir=str(model_dir), kv_cache_memory_bytes=8 << 20, max_model_len=256))
    client.wait_ready(timeout=120)
    client.process.kill()
    t0 = time.monotonic()
    with pytest.raises(WorkerDied, match="was killed by signal SIGKILL"):
        client.step(StepRequest(1, [], [NewSequence(1, [1, 2], 2, 0, GREEDY)], [ScheduledChunk(1, 2, [0], True)]))
    assert time.monotonic() - t0 < 5
    client.shutdown()


def test_worker_startup_failure_is_reported(tmp_path):
    client = WorkerClient(WorkerConfig(model_dir=str(tmp_path)))
    with pytest.raises(WorkerError, match="config.json: file not found"):
        client.wait_ready(timeout=60)
    client.shutdown()


def test_quantized_lm_head_option(model_factory):
    model_dir = model_factory(SPEC, tokenizer=False)
    plain = load_model_weights(model_dir, "a8w8")
    quant = load_model_weights(model_dir, "a8w8", quantize_lm_head=True)
    assert not isinstance(plain.lm_head, Int8Linear) and isinstance(quant.lm_head, Int8Linear)
    assert quant.linear_bytes() < plain.linear_bytes()
    assert quant.embed_tokens.dtype == torch.bfloat16  # the tied embedding itself stays float
    prompt = list(range(3, 40))
    a = _greedy_alone(model_dir, prompt, 4)
    r = ModelRunner(
        WorkerConfig(
            model_dir=str(model_dir),
            quantize_lm_head=True,
            kv_cache_memory_bytes=16 << 20,
            block_size=BLOCK_SIZE,
            max_model_len=512,
        )
    )
    d = Driver(r)
    d.run(new=[NewSequence(1, prompt, len(prompt), 0, GREEDY)])
    assert d.run(chunks=[(1, len(prompt), True)]).tokens[0].token_id == a[0]


def test_fastest_kernel_family_gemm_is_bit_identical_to_int_mm():
    from npu.backends.cpu.vnni import VnniLinear, Workspace

    lib = fastest_kernel_library()
    g = torch.Generator().manual_seed(3)
    # M = 300 spans row blocks with a partial last pass; M = 1400 x N = 3072 writes its output with
    # non-temporal stores (over a8w8_vnni.c's STREAM_MIN_BYTES)
    large_m = (300, 1400)
    for n, k in ((96, 160), (100, 70), (17, 5), (3072, 1024)):
        lin = quantize_linear(torch.randn(n, k, generator=g))
        fast, ref = VnniLinear(lin, lib, Workspace()), Int8GemmLinear(lin)
        for m in (1, 2, 4, 5, 7, 8, 9, 12, 16, 33) + (large_m if n == 3072 else ()):
            x = torch.randn(m, k, generator=g) * 5
            if m > 2:
                x[1] = 0.0  # an all-zero token
            expected = ref(x)
            assert torch.equal(fast(x), expected), (n, k, m)
            residual = torch.randn(m, n, generator=g)
            assert torch.equal(fast(x, residual=residual), expected + residual), (n, k, m)
    # a bias (Qwen2's q/k/v) is added in the epilogue, after the scales and before the residual
    for n, k in ((100, 70), (3072, 1024)):
        lin = quantize_linear(torch.randn(n, k, generator=g), bias=torch.randn(n, generator=g))
        fast, ref = VnniLinear(lin, lib, Workspace()), Int8GemmLinear(lin)
        for m in (1, 3, 9, 300):
            x, residual = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
            expected = ref(x)
            assert not torch.equal(expected, Int8GemmLinear(quantize_linear(lin.dequantized()))(x))  # bias applied
            assert torch.equal(fast(x), expected) and torch.equal(fast(x, residual=residual), expected + residual)


def test_fastest_kernel_family_fused_prologue_and_epilogue_match_eager_ops():
    """RMSNorm / SiLU-gate prologues and the residual epilogue inside the kernel call vs the same ops eagerly.

    The fused RMSNorm sums squares in another order than torch, so a quantized activation can land one
    step away on a rounding tie; everything else is the same arithmetic.
    """
    from npu.backends.base import RMSNorm, rms_norm, silu_and_mul
    from npu.backends.cpu.vnni import VnniLinear, Workspace

    lib = fastest_kernel_library()
    g = torch.Generator().manual_seed(5)
    for n, k in ((96, 160), (100, 70), (200, 1024)):
        fast = VnniLinear(quantize_linear(torch.randn(n, k, generator=g)), lib, Workspace())
        norm = RMSNorm(torch.rand(k, generator=g) + 0.5, 1e-6)
        for m in (1, 5, 16, 40):
            x = torch.randn(m, k, generator=g) * 3
            res = torch.randn(m, n, generator=g)
            ref = fast(rms_norm(x, norm.weight, norm.eps)) + res
            got = fast(x, norm=norm, residual=res)
            assert (got - ref).abs().max() <= 2e-2 * ref.abs().max(), (n, k, m)
            assert (got - ref).abs().mean() <= 1e-3 * ref.abs().mean(), (n, k, m)
            gu = torch.randn(m, 2 * k, generator=g) * 2
            ref = fast(silu_and_mul(gu))
            got = fast(gu, gated=True)
            assert (got - ref).abs().max() <= 2e-2 * ref.abs().max(), (n, k, m)
            assert (got - ref).abs().mean() <= 1e-3 * ref.abs().mean(), (n, k, m)


def bf16_linear_reference(x_bf16: torch.Tensor, w: torch.Tensor, x_rounding_ulps: float = 0.0):
    """The exact product of BF16 inputs (fp64: every product and sum of BF16 values is exact enough there) and
    the largest error any fp32 accumulation order may add to it: ``K 2^-24 sum|x w|`` (K fp32 additions, any
    order), plus ``x_rounding_ulps`` BF16 steps (``2^-7`` relative each) of every input where its rounding may
    differ.
    Defined on every CPU: unlike ``F.linear``, whose order and kernel (oneDNN's AMX tiles on Sapphire Rapids)
    vary with the machine."""
    xd, wd = x_bf16.double(), w.double()
    exact = xd @ wd.t()
    magnitude = xd.abs() @ wd.abs().t()
    return exact, (x_bf16.shape[1] * 2**-24 + x_rounding_ulps * 2**-7) * magnitude + 1e-30


def test_reference_bf16_linear_keeps_fp32_logits():
    """The reference path's BF16 linear (FloatGemmLinear, which the kernels are held to): the input rounded to BF16,
    the products accumulated in fp32 and the output not rounded to BF16, over more rows than one widened chunk."""
    from loaders.quantization import FloatLinear
    from npu.backends.cpu.backend import WIDEN_ROWS, FloatGemmLinear

    g = torch.Generator().manual_seed(9)
    n, k = WIDEN_ROWS + 37, 96
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    op = FloatGemmLinear(FloatLinear(w), torch.float32)
    for m in (1, 5):
        x = torch.randn(m, k, generator=g)
        got = op(x)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        exact, bound = bf16_linear_reference(x.to(torch.bfloat16), w)
        assert ((got.double() - exact).abs() <= bound).all(), m
        assert (got != got.to(torch.bfloat16).float()).float().mean() > 0.9, m


@pytest.mark.parametrize("family", ["avx512-vnni", "avx2"])
def test_bf16_kernel_matches_the_exact_product_within_fp32_accumulation(family):
    """Each kernel family's BF16 GEMM against the exact product of the same BF16 inputs: within the bound of
    fp32 accumulation, and the output (the logits) left in fp32, not rounded to BF16."""
    from npu.backends.base import RMSNorm, rms_norm
    from npu.backends.cpu.vnni import Bf16Linear, Workspace, load_kernel_library

    lib, why = load_kernel_library(family)
    if lib is None or not lib.has_bf16:
        pytest.skip(f"{family} BF16 kernel unavailable here: {why or lib.family.bf16_cpu_flags}")
    g = torch.Generator().manual_seed(8)
    for n, k in ((96, 160), (100, 70), (1000, 576)):
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        op = Bf16Linear(w, lib, Workspace())
        norm = RMSNorm(torch.rand(k, generator=g) + 0.5, 1e-6)
        for m in (1, 3, 4, 6, 16, 21):
            x, res = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
            got = op(x)
            exact, bound = bf16_linear_reference(x.to(torch.bfloat16), w)
            assert ((got.double() - exact).abs() <= bound).all(), (n, k, m)
            # fp32 logits: nearly every output carries more bits than BF16 has (a BF16-rounded one none)
            assert (got != got.to(torch.bfloat16).float()).float().mean() > 0.9, (n, k, m)
            # the RMSNorm prologue in fp32 (its sum in another order than the reference's fp64) may round an
            # input to the neighbouring BF16 value; the residual is added in fp32
            normed = rms_norm(x.double(), norm.weight.double(), norm.eps).to(torch.bfloat16)
            exact, bound = bf16_linear_reference(normed, w, x_rounding_ulps=1)
            got = op(x, norm=norm, residual=res).double() - res.double()
            assert ((got - exact).abs() <= bound + 2**-23 * res.double().abs()).all(), (n, k, m)


def test_attention_prep_kernels_match_eager_ops():
    from npu.backends.base import RMSNorm, TorchOps
    from npu.backends.cpu import CpuBackend
    from npu.kv_cache import PagedKVCache

    backend = CpuBackend()
    if backend.kernel_family == "reference":
        pytest.skip("no CPU kernel family runs here")
    g = torch.Generator().manual_seed(6)
    for t, hq, hkv, d in ((1, 16, 8, 128), (37, 6, 2, 64), (5, 4, 4, 32)):
        width = (hq + 2 * hkv) * d
        qkv = torch.randn(t, width, generator=g) * 4
        cos, sin = torch.randn(100, d, generator=g), torch.randn(100, d, generator=g)
        positions = torch.randint(0, 100, (t,), generator=g)
        for norm in (None, RMSNorm(torch.rand(hq + hkv, d, generator=g) + 0.5, 1e-6)):
            qk = qkv.clone()[:, : (hq + hkv) * d].view(t, hq + hkv, d)
            ref = TorchOps().qk_norm_rope(qk.clone(), norm, cos, sin, positions)
            got = backend.qk_norm_rope(qk, norm, cos, sin, positions)
            assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (t, hq, d, norm is None)
        k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
        slots = torch.randperm(64, generator=g)[:t]
        fused, eager = (PagedKVCache("int8", 2, hkv, d, num_blocks=4, block_size=16) for _ in range(2))
        backend.write_kv(fused, 1, slots, k, v)
        eager.write(1, slots, k, v)
        for name in fused.tensors:
            assert torch.equal(fused.tensors[name], eager.tensors[name]), name


def test_argmax_kernel_matches_torch():
    from npu.backends.cpu import CpuBackend

    backend = CpuBackend()
    g = torch.Generator().manual_seed(7)
    for s, v in ((1, 151936), (16, 1000), (3, 17)):
        logits = torch.randn(s, v, generator=g)
        logits[0, v // 3] = logits[0, v - 1] = 50.0  # a tie: the first index wins, as in torch
        if s > 1:
            logits[1] = float("-inf")
        if s > 2:
            logits[2, v - 1] = 99.0  # the maximum in the last, partial vector
        assert torch.equal(backend.argmax_rows(logits), logits.argmax(-1)), (s, v)


def test_int8_kernels_agree_on_logits(model_factory):
    """The eager oneDNN path and each kernel family this CPU runs: same model, same greedy tokens, logits within
    the occasional one-step quantization flip that a different summation order in RMSNorm can cause."""
    from npu.backends.cpu.vnni import FAMILIES, load_kernel_library

    model_dir = model_factory(SPEC, tokenizer=False)
    prompt = list(range(5, 30))
    T = len(prompt)
    logits = []
    families = [name for name in FAMILIES if load_kernel_library(name)[0] is not None]
    for kernels in ("reference", "auto", *families):
        r = _runner(model_dir, kv="int8", cpu_kernels=kernels)
        batch = ForwardBatch(
            torch.tensor(prompt), torch.arange(T), torch.arange(T), [SeqSpan(0, T, torch.arange(T))], torch.arange(T)
        )
        logits.append(r.model.forward(batch, r.cache))
    a = logits[0]
    for b in logits[1:]:
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert (a - b).abs().mean() < 1e-4 * a.abs().mean()
        assert (a - b).abs().max() < 1e-2 * a.abs().max()


@pytest.mark.parametrize("family", ["avx512-vnni", "avx2"])
def test_decoder_stack_is_bit_identical_to_the_layer_loop(model_factory, family):
    """Pure decode steps through the one-call C layer stack vs the model's Python layer loop (the same
    kernels): identical tokens, logprobs and KV cache bytes, over sequences of different context lengths; in
    each kernel family with the stack (the same decoder_stack.c over the family's kernels)."""
    from npu.backends.cpu.vnni import load_kernel_library

    lib, why = load_kernel_library(family)
    if lib is None:
        pytest.skip(f"{family} kernels unavailable here: {why}")
    spec = RandomModelSpec(
        hidden_size=128,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=256,
        vocab_size=2000,
        seed=12,
    )
    model_dir = model_factory(spec, tokenizer=False)
    stacked, looped = (_runner(model_dir, kv="int8", cpu_kernels=family) for _ in range(2))
    if stacked.model.decode_stack is None:
        pytest.skip("the C decoder stack is unavailable here")
    looped.model.decode_stack = None
    prompts = {1: list(range(3, 8)), 2: list(range(40, 60)), 3: list(range(100, 137))}
    options = SamplingOptions(temperature=0, logprobs=3)
    results = []
    for runner in (stacked, looped):
        d = Driver(runner)
        d.run(new=[NewSequence(s, p, len(p), 0, options) for s, p in prompts.items()])
        out = [d.run(chunks=[(s, len(p), True) for s, p in prompts.items()]).tokens]
        for _ in range(12):
            out.append(d.run(chunks=[(s, 1, True) for s in prompts]).tokens)
        results.append(out)
    assert results[0] == results[1]
    assert all(len(step) == len(prompts) for step in results[0])
    for name, t in stacked.cache.tensors.items():
        assert torch.equal(t, looped.cache.tensors[name]), name


def _attention_backend(kind: str):
    """The CPU backend with a kernel family's C kernels ("cpu-vnni", "cpu-avx2"), or the eager reference every
    backend falls back to."""
    from npu.backends.base import TorchOps
    from npu.backends.cpu import CpuBackend
    from npu.backends.cpu.backend import BACKEND_NAMES
    from npu.backends.cpu.vnni import load_kernel_library

    if kind == "reference":
        return TorchOps()
    family = next(name for name, backend_name in BACKEND_NAMES.items() if backend_name == kind)
    lib, why = load_kernel_library(family)
    if lib is None:
        pytest.skip(f"{kind} kernels unavailable here: {why}")
    return CpuBackend(cpu_kernels=family)


@pytest.mark.parametrize("kind", ["cpu-vnni", "cpu-avx2", "reference"])
def test_paged_prefill_attention_matches_sdpa(kind):
    """Whole prompts and later chunks (queries at the end of a longer context), causal, with GQA."""
    from torch.nn.attention.bias import causal_lower_right

    from npu.kv_cache import PagedKVCache

    backend = _attention_backend(kind)
    g = torch.Generator().manual_seed(9)
    for hq, hkv, d in ((16, 8, 128), (9, 3, 64), (4, 4, 32), (20, 2, 64)):
        cache = PagedKVCache("int8", 2, hkv, d, num_blocks=40, block_size=16)
        slots_all = torch.randperm(40 * 16, generator=g)
        cache.write(1, slots_all, torch.randn(640, hkv, d, generator=g), torch.randn(640, hkv, d, generator=g))
        for q_len, ctx in ((2, 2), (37, 37), (16, 100), (3, 200), (130, 300)):
            slots = slots_all[:ctx].contiguous()
            wide = torch.randn(q_len, hq * d + 7, generator=g)  # q as a strided view, as the model passes it
            q = wide[:, : hq * d].view(q_len, hq, d)
            fused = backend.prefill_attention(q, cache, 1, slots, d**-0.5)
            kv = cache.read(1, slots, torch.float32)
            mask = causal_lower_right(q_len, ctx) if q_len != ctx else None
            ref = (
                torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(0, 1)[None],
                    kv.k.transpose(0, 1)[None],
                    kv.v.transpose(0, 1)[None],
                    attn_mask=mask,
                    is_causal=q_len == ctx,
                    scale=d**-0.5,
                    enable_gqa=hq != hkv,
                )[0]
                .transpose(0, 1)
                .reshape(q_len, -1)
            )
            assert torch.allclose(fused, ref, atol=1e-4, rtol=1e-4), (hq, hkv, d, q_len, ctx)


@pytest.mark.parametrize("kind", ["cpu-vnni", "cpu-avx2", "reference"])
def test_paged_decode_attention_matches_sdpa_per_sequence(kind):
    """One padded call over contexts of different lengths against each sequence attended alone."""
    from npu.kv_cache import PagedKVCache
    from npu.model import DecodeGroup

    backend = _attention_backend(kind)
    g = torch.Generator().manual_seed(4)
    for hq, hkv, d in ((16, 8, 128), (6, 1, 64), (4, 4, 32), (9, 3, 64), (20, 2, 64)):
        cache = PagedKVCache("int8", 2, hkv, d, num_blocks=80, block_size=16)
        slots_all = torch.randperm(80 * 16, generator=g)
        cache.write(1, slots_all, torch.randn(1280, hkv, d, generator=g), torch.randn(1280, hkv, d, generator=g))
        # 401 and 600: contexts split in 2 and 3 parts (SPLIT_KEYS 256), odd lengths
        lengths = [1, 17, 130, 64, 401, 600]
        spans, start = [], 0
        for i, n in enumerate(lengths):
            spans.append(SeqSpan(i, 1, slots_all[start : start + n]))
            start += n
        group = DecodeGroup.build(spans, len(spans))
        q = torch.randn(len(lengths), hq, d, generator=g)
        fused = backend.decode_attention(q, cache, 1, group.slots, group.lengths, d**-0.5).view(len(lengths), hq, d)
        for i, sp in enumerate(spans):
            kv = cache.read(1, sp.context_slots, torch.float32)
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[i][None, :, None, :],
                kv.k.transpose(0, 1)[None],
                kv.v.transpose(0, 1)[None],
                scale=d**-0.5,
                enable_gqa=hq != hkv,
            )[0, :, 0, :]
            # the kernel rounds q and the softmax weights (times the V scales) to INT16 for its integer q . k
            # and p . v: half a step (largest weight / 32767) per key times |v_int8| <= 127; measured max
            # error 8.3e-5 on these inputs (the fp32 p . v it replaced: 4.3e-5)
            assert torch.allclose(fused[i], ref, atol=2e-4, rtol=1e-4), (hq, hkv, d, i)
