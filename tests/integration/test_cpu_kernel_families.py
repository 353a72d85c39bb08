"""CPU kernel families (npu/backends/cpu/vnni.py FAMILIES): each one this CPU can execute gives the A8W8 GEMM's
results bit for bit (INT32 accumulation is exact, and the float prologue and epilogue run the same operations in
the same order); the NEON family, cross-compiled, does too under qemu-aarch64; the AVX2 family's int16 pair sums
cannot saturate; the backend takes the family asked for, the fastest one by default, and says which; a family
the CPU cannot run is refused with the reason."""

from __future__ import annotations

import ctypes

import pytest
import torch
from kernel_emulation import EmulatedKernels, NativeKernels, SharedArena, build_neon_harness

from loaders.quantization import Int8Linear, quantize_linear
from npu.backends.base import DecoderStackInputs, RMSNorm, rms_norm
from npu.backends.cpu import CpuBackend, vnni
from npu.backends.cpu.backend import Int8GemmLinear
from npu.backends.cpu.vnni import FAMILIES, VnniLinear, Workspace, load_kernel_library

# (rows, in_features, out_features): one-row decode, the M <= 4 single pass, several row passes with partial
# panels, widths that are not multiples of a vector or of a column tile
SHAPES = [(1, 64, 40), (3, 576, 192), (5, 1536, 576), (17, 100, 33), (64, 256, 1536)]


def _why_not(name: str) -> str:
    return load_kernel_library(name)[1]


def _families_or_none() -> dict:
    """The libraries of the families this CPU (and compiler) can run, fastest first."""
    return {name: lib for name in FAMILIES if (lib := load_kernel_library(name)[0]) is not None}


def _families() -> dict:
    """As :func:`_families_or_none`, skipping the test where there is none."""
    libs = _families_or_none()
    if not libs:
        pytest.skip(f"no CPU kernel family runs here: {[_why_not(name) for name in FAMILIES]}")
    return libs


def _weights(n: int, k: int, g: torch.Generator) -> Int8Linear:
    w = torch.randn(n, k, generator=g)
    w[0, :5] = -w.abs().max()  # the code -128, which only the weights can take
    lw = quantize_linear(w, torch.randn(n, generator=g))
    assert lw.qweight.min() == -128
    return lw


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_is_bit_exact_against_the_reference(family):
    """No prologue: the same codes, the same INT32 sums, the same epilogue as torch._int_mm's path."""
    lib = _families().get(family)
    if lib is None:
        pytest.skip(f"{family}: {_why_not(family)}")
    g = torch.Generator().manual_seed(3)
    for m, k, n in SHAPES:
        lw = _weights(n, k, g)
        x = torch.randn(m, k, generator=g) * 3
        residual = torch.randn(m, n, generator=g)
        got = VnniLinear(lw, lib, Workspace())
        ref = Int8GemmLinear(lw)
        assert torch.equal(got(x), ref(x)), (family, m, k, n)
        assert torch.equal(got(x, residual=residual), ref(x, residual=residual)), (family, m, k, n)


def test_families_agree_bit_for_bit_with_every_prologue():
    """RMSNorm, SiLU gate and R4's online Hadamard: the families' float prologues give the same bits (the
    reference's eager ops sum in another order, so families are compared with each other)."""
    libs = _families()
    if len(libs) < 2:
        pytest.skip(f"one kernel family runs here ({', '.join(libs)}): nothing to compare it with")
    g = torch.Generator().manual_seed(4)
    for m, k, n in SHAPES:
        lw = _weights(n, k, g)
        x = torch.randn(m, k, generator=g) * 3
        gu = torch.randn(m, 2 * k, generator=g) * 3
        norm = RMSNorm(torch.rand(k, generator=g) + 0.5, 1e-6)
        blocks = [0] + [b for b in (4, 16, 64) if k % b == 0]
        outputs = []
        for lib in libs.values():
            out = [VnniLinear(lw, lib, Workspace())(x, norm=norm)]
            out += [VnniLinear(lw, lib, Workspace(), input_hadamard=b)(gu, gated=True) for b in blocks]
            out += [VnniLinear(lw, lib, Workspace(), input_hadamard=b)(x) for b in blocks]
            outputs.append(out)
        for other in outputs[1:]:
            for i, (a, b) in enumerate(zip(outputs[0], other)):
                assert torch.equal(a, b), (m, k, n, i)


def _avx_vnni_twin():
    """vnni.AVX_VNNI_EVEX_TWIN: the avx-vnni source with its vpdpbusd in the AVX-512 VL encoding, so that it runs on
    AVX-512 VNNI CPUs (the VEX encoding is then the one part these tests do not execute)."""
    from npu.backends.cpu.vnni import AVX_VNNI_EVEX_TWIN, build_family_library

    lib, why = build_family_library(AVX_VNNI_EVEX_TWIN)
    if lib is None:
        pytest.skip(f"avx-vnni's EVEX twin: {why}")
    return lib


def test_avx_vnni_gemm_is_bit_exact_with_every_prologue():
    """The avx-vnni family's GEMM (where this CPU has AVX-VNNI: the family itself, else its EVEX twin) against the
    reference without a prologue and against the AVX2 family with every prologue, including the weight code -128
    against the largest activations (vpdpbusd adds the four u8 x s8 products of a lane exactly)."""
    lib = load_kernel_library("avx-vnni")[0] or _avx_vnni_twin()
    avx2 = _families().get("avx2")
    g = torch.Generator().manual_seed(6)
    for m, k, n in SHAPES:
        lw = _weights(n, k, g)
        x = torch.randn(m, k, generator=g) * 3
        x[:, :5] = 1000.0  # codes 127 against the weights' -128
        residual = torch.randn(m, n, generator=g)
        ref = Int8GemmLinear(lw)
        assert torch.equal(VnniLinear(lw, lib, Workspace())(x), ref(x)), (m, k, n)
        assert torch.equal(VnniLinear(lw, lib, Workspace())(x, residual=residual), ref(x, residual=residual))
        if avx2 is None:
            continue
        gu, norm = torch.randn(m, 2 * k, generator=g) * 3, RMSNorm(torch.rand(k, generator=g) + 0.5, 1e-6)
        for block in [0] + [b for b in (4, 16) if k % b == 0]:
            ops = [VnniLinear(lw, family, Workspace(), input_hadamard=block) for family in (lib, avx2)]
            for kwargs, inp in (({"norm": norm}, x), ({"gated": True}, gu), ({}, x)):
                assert torch.equal(ops[0](inp, **kwargs), ops[1](inp, **kwargs)), (m, k, n, block, kwargs)


def test_avx2_pair_sums_do_not_saturate():
    """The AVX2 family's products: vpmaddwd adds two int16 products of codes into an int32 lane (before 2026-12-06,
    vpmaddubsw added them into a saturating int16): the largest pair, |-128| * 127 twice (32512), must come out
    exact, for every sign combination, over enough k that the INT32 sums pass 2^16."""
    lib = _families().get("avx2")
    if lib is None:
        pytest.skip(f"avx2: {_why_not('avx2')}")
    k, n = 256, 32
    signs = torch.tensor([1.0, -1.0]).repeat(n // 2)
    qweight = torch.full((n, k), -128, dtype=torch.int8)
    qweight[1::2] = 127
    lw = Int8Linear(qweight, torch.ones(n), None)
    for x in (torch.ones(1, k), -torch.ones(1, k), signs.repeat(k // n)[None, :k], torch.ones(4, k) * signs[:4, None]):
        got = VnniLinear(lw, lib, Workspace())(x)
        want = Int8GemmLinear(lw)(x)  # torch._int_mm: exact INT32
        assert torch.equal(got, want)


def test_backend_takes_the_family_asked_for():
    libs = _families()
    auto = CpuBackend()
    assert auto.kernel_family == next(iter(libs))  # the fastest this CPU runs
    lw = quantize_linear(torch.randn(48, 64))
    for name in libs:
        backend = CpuBackend(cpu_kernels=name)
        assert backend.kernel_family == name and backend.name == f"cpu-{name}".replace("avx512-", "")
        op = backend.prepare_linear(lw)
        assert isinstance(op, VnniLinear) and op.lib.family.name == name
        if not op.lib.family.complete:  # a partial family says what it does not cover
            assert f"does not have {', '.join(op.lib.family.missing())} yet" in backend.note
        if vnni.DECODER_STACK not in op.lib.family.ops:
            assert backend.prepare_decoder_stack(DecoderStackInputs([], 1, 1, 64, None, None, 1.0)) is None
    reference = CpuBackend(cpu_kernels="reference")
    assert reference.name == "cpu-onednn" and isinstance(reference.prepare_linear(lw), Int8GemmLinear)
    assert CpuBackend(cpu_kernels="onednn").kernel_family == "reference"  # the earlier --int8-kernel names
    with pytest.raises(ValueError, match="choose one of"):
        CpuBackend(cpu_kernels="sse2")


def test_a_family_the_cpu_cannot_run_is_refused_with_the_reason(monkeypatch):
    """As on a CPU without AVX-512 (or without AVX2 as well): forcing the family fails naming the missing flags,
    auto falls back to the next family, and then to the reference path with a warning."""
    flags = vnni._cpu_flags()
    runnable = list(_families_or_none())
    load_kernel_library.cache_clear()
    try:
        monkeypatch.setattr(vnni, "_cpu_flags", lambda: {f for f in flags if not f.startswith("avx512")})
        with pytest.raises(RuntimeError, match=r"'avx512-vnni' are not available: CPU lacks avx512f"):
            CpuBackend(cpu_kernels="avx512-vnni")
        expected = next((name for name in runnable if name != "avx512-vnni"), "reference")
        assert CpuBackend().kernel_family == expected
        load_kernel_library.cache_clear()
        monkeypatch.setattr(vnni, "_cpu_flags", lambda: set())
        fallback = CpuBackend()
        assert fallback.kernel_family == "reference" and fallback.name == "cpu-onednn"
        assert "no CPU kernel family is usable here" in fallback.note and "CPU lacks avx2" in fallback.note
    finally:
        load_kernel_library.cache_clear()


def test_an_avx512_cpu_without_avx512_bf16_takes_the_avx2_bf16_gemm(monkeypatch):
    """As on Cascade Lake or Ice Lake (AVX-512 VNNI without AVX-512 BF16): the BF16 lm_head runs through the AVX2
    family's kernel, not F.linear, while everything else stays AVX-512."""
    from loaders.quantization import FloatLinear
    from npu.backends.cpu.vnni import Bf16Linear

    if not {"avx512-vnni", "avx2"} <= set(_families()):
        pytest.skip("needs both the avx512-vnni and the avx2 families")
    flags = vnni._cpu_flags()
    load_kernel_library.cache_clear()
    try:
        monkeypatch.setattr(vnni, "_cpu_flags", lambda: flags - {"avx512_bf16"})
        backend = CpuBackend(cpu_kernels="avx512-vnni")
        op = backend.prepare_linear(FloatLinear(torch.randn(40, 64).to(torch.bfloat16)))
        assert backend.kernel_family == "avx512-vnni"
        assert isinstance(op, Bf16Linear) and op.lib.family.name == "avx2"
        assert isinstance(backend.prepare_linear(quantize_linear(torch.randn(48, 64))), VnniLinear)
    finally:
        load_kernel_library.cache_clear()


# ---- the NEON family, built for aarch64 and run under emulation (tests/kernel_emulation.py) ------------------
NEON_PROLOGUES = {"none": 0, "rmsnorm": 1, "silu_mul": 2, "silu_mul_hadamard_4": 2 | 2 << 8, "hadamard_16": 4 << 8}
ARENA_BYTES = 256 << 20


@pytest.fixture(scope="module", params=["neon", "neon-plain"])
def neon(request, tmp_path_factory):
    """An aarch64 family's kernels (with sdot, and plain NEON without it), callable by name, with their arguments in
    a shared arena (``neon.arena``)."""
    command, why = build_neon_harness(tmp_path_factory.mktemp(request.param), request.param)
    if command is None:
        pytest.skip(why)
    arena = SharedArena(ARENA_BYTES)
    kernels = EmulatedKernels(command, arena, FAMILIES[request.param])
    yield kernels
    kernels.close()
    arena.close()


def _native(op: str | None = None, prefer: str | None = None) -> NativeKernels:
    """A family this CPU runs natively (``prefer`` where it runs), other than NEON, with kernel ``op``."""
    libs = {
        name: lib
        for name, lib in _families_or_none().items()
        if not name.startswith("neon") and (op is None or op in lib.family.ops)
    }
    if not libs:
        pytest.skip(f"no family other than NEON{' with ' + op if op else ''} runs natively here to compare with")
    return NativeKernels(libs.get(prefer) or next(iter(libs.values())))


def _packed_linear(kernels, arena: SharedArena, lw: Int8Linear) -> dict:
    """An Int8Linear packed by ``kernels``' own a8w8_pack into the arena (scale and bias padded as VnniLinear
    pads them)."""
    n, k = lw.qweight.shape
    kp, np_ = kernels.a8w8_packed_k(k), kernels.a8w8_packed_n(n)
    packed = {"wp": arena.empty((np_ * kp,), torch.int8), "wsum": arena.empty((np_,), torch.int32), "n": n, "k": k}
    kernels.a8w8_pack(arena.copy(lw.qweight), n, k, packed["wp"], packed["wsum"])
    packed["sw"] = arena.copy(torch.nn.functional.pad(lw.scale.float(), (0, np_ - n)))
    packed["bias"] = None if lw.bias is None else arena.copy(torch.nn.functional.pad(lw.bias.float(), (0, np_ - n)))
    return packed


def _gemm(kernels, arena: SharedArena, packed: dict, x, prologue: int, norm=None, residual=None, eps: float = 1e-6):
    m, k, n = x.shape[0], packed["k"], packed["n"]
    out = arena.empty((m, n), torch.float32)
    xq = arena.empty((kernels.a8w8_panel_bytes(m, k),), torch.uint8)
    sx = arena.empty((max(m, 1),), torch.float32)
    kernels.a8w8_gemm(
        arena.copy(x),
        m,
        k,
        prologue,
        None if norm is None else arena.copy(norm),
        eps,
        packed["wp"],
        packed["wsum"],
        packed["sw"],
        packed["bias"],
        n,
        None if residual is None else arena.copy(residual),
        out,
        xq,
        sx,
    )
    return out.clone()


def test_neon_gemm_is_bit_exact_under_emulation(neon):
    """Small shapes (emulation is slow): against torch._int_mm's path without a prologue; with every prologue
    against a family this machine runs natively (the float prologues give the same bits everywhere)."""
    arena, g = neon.arena, torch.Generator().manual_seed(5)
    for m, k, n in ((1, 64, 40), (5, 96, 36), (9, 128, 20)):
        lw = _weights(n, k, g)
        x = torch.randn(m, k, generator=g) * 3
        gu = torch.randn(m, 2 * k, generator=g) * 3
        residual = torch.randn(m, n, generator=g)
        norm = torch.rand(k, generator=g) + 0.5
        ref, packed = Int8GemmLinear(lw), _packed_linear(neon, arena, lw)
        assert torch.equal(_gemm(neon, arena, packed, x, 0), ref(x)), (m, k, n)
        assert torch.equal(_gemm(neon, arena, packed, x, 0, residual=residual), ref(x, residual=residual))
        native = _native(prefer="avx512-vnni").lib
        for name, code in NEON_PROLOGUES.items():
            block = 1 << (code >> 8) if code >> 8 else 0
            op = VnniLinear(lw, native, Workspace(), input_hadamard=block)
            kind = code & 0xFF
            if kind == 1:
                want, got = op(x, norm=RMSNorm(norm, 1e-6)), _gemm(neon, arena, packed, x, code, norm=norm)
            elif kind == 2:
                want, got = op(gu, gated=True), _gemm(neon, arena, packed, gu, code)
            else:
                want, got = op(x), _gemm(neon, arena, packed, x, code)
            assert torch.equal(got, want), (m, k, n, name)
    # rows in more than one chunk of panels (a8w8_signed.h's PANEL_CHUNK_BYTES: 192 rows of K = 1024 bytes), the last
    # one partial
    lw = _weights(12, 1024, g)
    x = torch.randn(201, 1024, generator=g)
    assert torch.equal(_gemm(neon, arena, _packed_linear(neon, arena, lw), x, 0), Int8GemmLinear(lw)(x))


def test_neon_attention_prep_is_bit_exact_under_emulation(neon):
    """q/k norm + RoPE (with and without the norm and R3), the INT8 KV write and argmax: the same bytes as a
    family this CPU runs, from the same C calls on the same arguments."""
    from npu.backends.cpu.vnni import ATTENTION_PREP

    arena, native, g = neon.arena, _native(ATTENTION_PREP), torch.Generator().manual_seed(9)
    for t, h, hkv, d in ((1, 16, 8, 128), (3, 6, 2, 64), (2, 4, 4, 32)):
        qk = torch.randn(t, h + hkv, d, generator=g) * 4
        cos, sin = arena.copy(torch.randn(50, d, generator=g)), arena.copy(torch.randn(50, d, generator=g))
        positions = arena.copy(torch.randint(0, 50, (t,), generator=g))
        norm = arena.copy(torch.rand(h + hkv, d, generator=g) + 0.5)
        for with_norm in (False, True):
            for r3 in (0, d.bit_length() - 1):
                outs = []
                for kernels in (native, neon):
                    x = arena.copy(qk)
                    rc = kernels.qk_norm_rope(
                        x, t, (h + hkv) * d, h + hkv, d, norm if with_norm else None, 1e-6, cos, sin, positions, r3
                    )
                    outs.append((rc, x.clone()))
                assert outs[0][0] == outs[1][0] == 0 and torch.equal(outs[0][1], outs[1][1]), (t, h, d, with_norm, r3)
        kv, slots = torch.randn(t, 2 * hkv, d, generator=g) * 3, arena.copy(torch.randperm(64, generator=g)[:t])
        kv[0, 0] = 0.0  # an all-zero head: scale 0
        written = []
        for kernels in (native, neon):
            caches = [arena.empty((64, hkv, d), torch.int8), arena.empty((64, hkv), torch.float32)] * 2
            x = arena.copy(kv)
            kernels.kv_write_int8(x, x[:, hkv:], t, 2 * hkv * d, 2 * hkv * d, hkv, d, slots, *caches)
            written.append([c.clone() for c in caches])
        assert all(torch.equal(a, b) for a, b in zip(*written)), (t, hkv, d)
    logits = torch.randn(5, 1003, generator=g)
    logits[1, 7] = logits[1, 900] = 50.0  # a tie: the first index
    chosen = []
    for kernels in (native, neon):
        out = arena.empty((5,), torch.int64)
        kernels.argmax_rows(arena.copy(logits), 5, 1003, out)
        chosen.append(out.clone())
    assert torch.equal(chosen[0], chosen[1]) and torch.equal(chosen[1], logits.argmax(-1))


def _arena_cache(arena: SharedArena, hkv: int, d: int, g: torch.Generator, slots_total: int = 640):
    cache = {
        "k": torch.randint(-127, 128, (slots_total, hkv, d), generator=g, dtype=torch.int8),
        "v": torch.randint(-127, 128, (slots_total, hkv, d), generator=g, dtype=torch.int8),
        "ks": torch.rand(slots_total, hkv, generator=g) * 0.05,
        "vs": torch.rand(slots_total, hkv, generator=g) * 0.05,
    }
    return {name: arena.copy(t) for name, t in cache.items()}


def test_neon_paged_attention_is_bit_exact_under_emulation(neon):
    """Decode (contexts of 1 to 600 keys: split in up to 3 parts, odd lengths) and prefill (whole prompts and later
    chunks) give the bits of a family this CPU runs, for each head layout of the cross-family test."""
    from npu.backends.cpu.vnni import ATTENTION

    arena, native, g = neon.arena, _native(ATTENTION), torch.Generator().manual_seed(23)
    for hq, hkv, d in ATTENTION_SHAPES:
        c = _arena_cache(arena, hkv, d, g)
        lengths = [1, 2, 17, 130, 257, 600]
        slots = arena.copy(torch.stack([torch.randperm(640, generator=g)[:600] for _ in lengths]))
        lens = arena.copy(torch.tensor(lengths, dtype=torch.int32))
        q = arena.copy(torch.randn(len(lengths), hq * d, generator=g) * 2)
        outs = []
        for kernels in (native, neon):
            out = arena.empty((len(lengths), hq, d), torch.float32)
            rc = kernels.paged_attention_decode_int8(
                q, hq * d, len(lengths), hq, hkv, d, c["k"], c["ks"], c["v"], c["vs"], slots, lens, 600, d**-0.5, out
            )
            outs.append((rc, out.clone()))
        assert outs[0][0] == outs[1][0] == 0 and torch.equal(outs[0][1], outs[1][1]), ("decode", hq, hkv, d)
        for q_len, ctx in ((1, 1), (37, 37), (16, 100), (20, 300)):
            wide = arena.copy(torch.randn(q_len, hq * d + 7, generator=g))
            outs = []
            for kernels in (native, neon):
                out = arena.empty((q_len, hq * d), torch.float32)
                rc = kernels.paged_attention_prefill_int8(
                    wide,
                    hq * d + 7,
                    q_len,
                    ctx - q_len,
                    hq,
                    hkv,
                    d,
                    c["k"],
                    c["ks"],
                    c["v"],
                    c["vs"],
                    slots[3],
                    d**-0.5,
                    out,
                )
                outs.append((rc, out.clone()))
            assert outs[0][0] == outs[1][0] == 0 and torch.equal(outs[0][1], outs[1][1]), ("prefill", hq, hkv, d, q_len)


def test_neon_bf16_gemm_is_bit_exact_under_emulation(neon):
    """The BF16 lm_head: the AVX2 family's fused multiply-adds in vdpbf16ps's defined order, bit for bit."""
    from npu.backends.cpu.vnni import BF16_GEMM

    arena, native, g = neon.arena, _native(BF16_GEMM, prefer="avx2"), torch.Generator().manual_seed(24)
    if native.family.name != "avx2":
        pytest.skip("the AVX2 family (whose order NEON keeps) does not run here")
    for n, k in ((100, 64), (33, 70), (260, 576)):
        w = arena.copy(torch.randn(n, k, generator=g).to(torch.bfloat16).view(torch.int16))
        norm = arena.copy(torch.rand(k, generator=g) + 0.5)
        for m in (1, 3, 5):
            x, res = arena.copy(torch.randn(m, k, generator=g)), arena.copy(torch.randn(m, n, generator=g))
            for prologue, residual in ((0, None), (1, res)):
                outs = []
                for kernels in (native, neon):
                    kp, np_ = kernels.bf16_packed_k(k), kernels.bf16_packed_n(n)
                    wp = arena.empty((np_ * kp,), torch.int16)
                    kernels.bf16_pack(w, n, k, wp)
                    out = arena.empty((m, n), torch.float32)
                    xb = arena.empty((kernels.bf16_panel_bytes(m, k),), torch.uint8)
                    kernels.bf16_gemm(x, m, k, prologue, norm, 1e-6, wp, n, residual, out, xb)
                    outs.append(out.clone())
                assert torch.equal(outs[0], outs[1]), (n, k, m, prologue)


def test_neon_decoder_stack_is_bit_exact_under_emulation(neon):
    """The one-call decoder stack (decoder_stack.c built with the NEON kernels) on two layers of a small Qwen3-like
    model, each linear packed by its family: the residual stream and the KV cache it writes are the bytes of a
    family this CPU runs."""
    from npu.backends.cpu.decoder_stack import _declare, _DecoderStack, _KvCache, _PackedLinear, _StackLayer
    from npu.backends.cpu.vnni import DECODER_STACK

    arena, native, g = neon.arena, _native(DECODER_STACK), torch.Generator().manual_seed(25)
    _declare(native.lib)  # the stack's argument types (DecoderStack declares them where it is built)
    hidden, hq, hkv, d, inter, layers, s = 96, 4, 2, 32, 160, 2, 3
    weights = [
        {
            name: _weights(n, k, g)
            for name, (n, k) in {
                "qkv": ((hq + 2 * hkv) * d, hidden),
                "o": (hidden, hq * d),
                "gate_up": (2 * inter, hidden),
                "down": (hidden, inter),
            }.items()
        }
        for _ in range(layers)
    ]
    norms = [[arena.copy(torch.rand(hidden, generator=g) + 0.5) for _ in range(2)] for _ in range(layers)]
    qk_norm = arena.copy(torch.rand(hq + hkv, d, generator=g) + 0.5)
    cos, sin = arena.copy(torch.randn(64, d, generator=g)), arena.copy(torch.randn(64, d, generator=g))
    x0 = torch.randn(s, hidden, generator=g)
    positions = torch.tensor([5, 17, 40])
    slot_mapping = arena.copy(torch.tensor([5, 64 + 17, 128 + 40]))
    ctx = torch.full((s, 41), 0, dtype=torch.long)
    for i, p in enumerate(positions.tolist()):
        ctx[i, : p + 1] = torch.arange(64 * i, 64 * i + p + 1)
    lengths = arena.copy((positions + 1).to(torch.int32))
    positions, ctx = arena.copy(positions), arena.copy(ctx)
    cache0 = {
        "k": torch.randint(-127, 128, (layers, 192, hkv, d), generator=g, dtype=torch.int8),
        "ks": torch.rand(layers, 192, hkv, generator=g) * 0.05,
    }
    cache0["v"], cache0["vs"] = cache0["k"].flip(-1).clone(), cache0["ks"].flip(-1).clone()

    results = []
    for kernels in (native, neon):
        rows = []
        for ly, norm in zip(weights, norms):
            packed = {name: _packed_linear(kernels, arena, lw) for name, lw in ly.items()}
            linear = {
                name: _PackedLinear(
                    p["wp"].data_ptr(), p["wsum"].data_ptr(), p["sw"].data_ptr(), None, p["n"], p["k"], 0
                )
                for name, p in packed.items()
            }
            rows.append(
                _StackLayer(
                    linear["qkv"],
                    linear["o"],
                    linear["gate_up"],
                    linear["down"],
                    norm[0].data_ptr(),
                    norm[1].data_ptr(),
                    qk_norm.data_ptr(),
                    1e-6,
                    1e-6,
                    1e-6,
                    0,
                )
            )
        table = arena.struct((_StackLayer * layers)(*rows))
        stack = arena.struct(
            _DecoderStack(
                layers,
                hq,
                hkv,
                d,
                ctypes.cast(table, ctypes.POINTER(_StackLayer)),
                cos.data_ptr(),
                sin.data_ptr(),
                d**-0.5,
            )
        )
        cache = {name: arena.copy(t) for name, t in cache0.items()}
        kv = arena.struct(
            _KvCache(
                cache["k"].data_ptr(),
                cache["v"].data_ptr(),
                cache["ks"].data_ptr(),
                cache["vs"].data_ptr(),
                cache["k"].stride(0),
                cache["ks"].stride(0),
            )
        )
        assert kernels.decoder_stack_check(stack) == 0
        x = arena.copy(x0)
        scratch = [arena.empty((s, n), torch.float32) for n in ((hq + 2 * hkv) * d, hq * d, 2 * inter)]
        xq = arena.empty((kernels.a8w8_panel_bytes(s, inter),), torch.uint8)
        sx = arena.empty((s,), torch.float32)
        kernels.decoder_stack_decode(stack, kv, x, s, positions, slot_mapping, ctx, lengths, 41, *scratch, xq, sx)
        results.append([x.clone()] + [t.clone() for t in cache.values()])
    assert not torch.equal(results[0][0], x0)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_attention_prep_is_the_same_in_every_family_that_has_it():
    """q/k norm + RoPE (and R3), the INT8 KV write and argmax: without the norm bit-exact against the eager ops,
    with it bit-exact between families (the eager norm sums in another order)."""
    from npu.backends.base import TorchOps
    from npu.backends.cpu.vnni import ATTENTION_PREP
    from npu.kv_cache import PagedKVCache

    names = [name for name, lib in _families().items() if ATTENTION_PREP in lib.family.ops]
    if not names:
        pytest.skip("no kernel family with the attention preparation runs here")
    g = torch.Generator().manual_seed(8)
    for t, h, hkv, d in ((1, 16, 8, 128), (37, 6, 2, 64), (5, 4, 4, 32)):
        qk = torch.randn(t, h + hkv, d, generator=g) * 4
        cos, sin = torch.randn(100, d, generator=g), torch.randn(100, d, generator=g)
        positions = torch.randint(0, 100, (t,), generator=g)
        norm = RMSNorm(torch.rand(h + hkv, d, generator=g) + 0.5, 1e-6)
        kv = torch.randn(t, 2 * hkv, d, generator=g)
        slots = torch.randperm(64, generator=g)[:t]
        logits = torch.randn(t, 1000 + d, generator=g)
        normed = []
        for name in names:
            backend = CpuBackend(cpu_kernels=name)
            for r3 in (False, True):
                want = TorchOps().qk_norm_rope(qk.clone(), None, cos, sin, positions, r3)
                assert torch.equal(backend.qk_norm_rope(qk.clone(), None, cos, sin, positions, r3), want), name
            normed.append([backend.qk_norm_rope(qk.clone(), norm, cos, sin, positions, r3) for r3 in (False, True)])
            fused, eager = (PagedKVCache("int8", 1, hkv, d, num_blocks=4, block_size=16) for _ in range(2))
            backend.write_kv(fused, 0, slots, kv[:, :hkv], kv[:, hkv:])
            eager.write(0, slots, kv[:, :hkv], kv[:, hkv:])
            for tensor in fused.tensors:
                assert torch.equal(fused.tensors[tensor], eager.tensors[tensor]), (name, tensor)
            assert torch.equal(backend.argmax_rows(logits), logits.argmax(-1)), name
        for other in normed[1:]:
            assert all(torch.equal(a, b) for a, b in zip(normed[0], other))


# (Hq, Hkv, D): decode items of 16 query vectors from 8 heads (Qwen3-0.6B), 12 of 16 lanes used (6 query heads of
# one KV head), 4 heads of one vector each, SmolLM2's 9 of 3, 10 of 2, and 2 of 1 (8 keys per AVX-512 vector)
ATTENTION_SHAPES = ((16, 8, 128), (6, 1, 64), (4, 4, 32), (9, 3, 64), (20, 2, 64), (2, 1, 128))


def _filled_cache(hkv: int, d: int, g: torch.Generator):
    from npu.kv_cache import PagedKVCache

    cache = PagedKVCache("int8", 2, hkv, d, num_blocks=80, block_size=16)
    slots = torch.randperm(80 * 16, generator=g)
    cache.write(1, slots, torch.randn(1280, hkv, d, generator=g) * 3, torch.randn(1280, hkv, d, generator=g))
    return cache, slots


def test_paged_attention_is_bit_identical_in_every_family_that_has_it():
    """Decode (contexts of 1 to 600 keys: split in up to 3 parts, odd lengths) and prefill (whole prompts and later
    chunks) give the same bits in each family with the attention kernels: the INT32 products are exact and every
    float step is the same operation in the same order (paged_attention_avx2.c)."""
    from npu.backends.cpu.vnni import ATTENTION
    from npu.model import DecodeGroup, SeqSpan

    names = [name for name, lib in _families().items() if ATTENTION in lib.family.ops]
    if len(names) < 2:
        pytest.skip(f"fewer than two kernel families with paged attention run here: {names}")
    backends = [CpuBackend(cpu_kernels=name) for name in names]
    g = torch.Generator().manual_seed(21)
    for hq, hkv, d in ATTENTION_SHAPES:
        cache, slots_all = _filled_cache(hkv, d, g)
        lengths, spans, start = [1, 2, 17, 130, 64, 256, 257, 401, 600], [], 0
        for i, n in enumerate(lengths):
            spans.append(SeqSpan(i, 1, slots_all[start : start + n]))
            start = (start + n) % 600
        group = DecodeGroup.build(spans, len(spans))
        q = torch.randn(len(lengths), hq, d, generator=g) * 2
        decoded = [b.decode_attention(q, cache, 1, group.slots, group.lengths, d**-0.5) for b in backends]
        for q_len, ctx in ((1, 1), (37, 37), (16, 100), (130, 300)):
            wide = torch.randn(q_len, hq * d + 7, generator=g)
            qp = wide[:, : hq * d].view(q_len, hq, d)
            slots = slots_all[:ctx].contiguous()
            prefilled = [b.prefill_attention(qp, cache, 1, slots, d**-0.5) for b in backends]
            for name, out in zip(names[1:], prefilled[1:]):
                assert torch.equal(out, prefilled[0]), (name, hq, hkv, d, q_len, ctx)
        for name, out in zip(names[1:], decoded[1:]):
            assert torch.equal(out, decoded[0]), (name, hq, hkv, d, (out - decoded[0]).abs().max())


def test_bf16_gemm_of_the_families_agree_within_fp32_accumulation():
    """The BF16 lm_head GEMM: vdpbf16ps (AVX-512 BF16) against the AVX2 family's fused multiply-adds in the order
    Intel defines for it. Each product is exact and each addition rounds once in both, but hardware need not keep
    the definition's order, so the test allows what another order of K fp32 additions may change,
    ``K 2^-23 sum|x w|`` between two orders (on the Zen 4 this was written on: no output differed)."""
    from npu.backends.cpu.vnni import BF16_GEMM, Bf16Linear

    libs = [lib for lib in _families().values() if BF16_GEMM in lib.family.ops and lib.has_bf16]
    if len(libs) < 2:
        pytest.skip("fewer than two kernel families with a BF16 GEMM run here")
    g = torch.Generator().manual_seed(22)
    for n, k in ((1000, 576), (333, 70), (2048, 1024)):
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        ops = [Bf16Linear(w, lib, Workspace()) for lib in libs]
        norm = RMSNorm(torch.rand(k, generator=g) + 0.5, 1e-6)
        for m in (1, 3, 5, 16):
            x, res = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
            for kwargs in ({}, {"norm": norm, "residual": res}):
                outs = [op(x, **kwargs) for op in ops]
                inputs = rms_norm(x.double(), norm.weight.double(), norm.eps) if kwargs else x.double()
                magnitude = inputs.to(torch.bfloat16).double().abs() @ w.double().abs().t()
                # two accumulation orders, then the residual added in fp32 (a rounding of its own)
                bound = k * 2**-23 * magnitude + 2**-23 * (res.double().abs() + magnitude) + 1e-30
                for other in outs[1:]:
                    differ = other != outs[0]
                    assert ((other.double() - outs[0].double()).abs() <= bound).all(), (n, k, m)
                    print(f"n={n} k={k} m={m}: {differ.float().mean().item():.4f} of outputs differ")
