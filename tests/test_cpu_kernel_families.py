"""CPU kernel families (npu/backends/cpu/vnni.py FAMILIES): each one this CPU can execute gives the A8W8 GEMM's
results bit for bit (INT32 accumulation is exact, and the float prologue and epilogue run the same operations in
the same order); the NEON family, cross-compiled, does too under qemu-aarch64; the AVX2 family's int16 pair sums
cannot saturate; the backend takes the family asked for, the fastest one by default, and says which; a family
the CPU cannot run is refused with the reason."""

from __future__ import annotations

import platform
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from loaders.quantization import Int8Linear, quantize_linear
from npu.backends.base import RMSNorm
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


def test_avx2_pair_sums_do_not_saturate():
    """vpmaddubsw adds two u8 x s8 products into a saturating int16: the largest pair the AVX2 family forms,
    |-128| * 127 twice (32512), must come out exact, for every sign combination."""
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
            assert backend.prepare_decoder_stack([], 1, 1, 64, *[None] * 3) is None
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


# ---- the NEON family, built for aarch64 and run under emulation --------------------------------------------
HARNESS = Path(__file__).parent / "native" / "a8w8_harness.c"
KERNELS = Path(vnni.__file__).parent
NEON_PROLOGUES = {"none": 0, "rmsnorm": 1, "silu_mul": 2, "silu_mul_hadamard_4": 2 | 2 << 8, "hadamard_16": 4 << 8}


@pytest.fixture(scope="module")
def neon_harness(tmp_path_factory) -> list[str]:
    """The NEON family's GEMM linked into tests/native/a8w8_harness.c: natively on aarch64, else cross-compiled
    (Debian's gcc-aarch64-linux-gnu, static) and run by qemu-aarch64 (qemu-user); scripts/test.sh installs both."""
    family = FAMILIES["neon"]
    native = platform.machine() in ("aarch64", "arm64")
    compiler = "gcc" if native else "aarch64-linux-gnu-gcc"
    runner = [] if native else ["qemu-aarch64"]
    missing = [tool for tool in [compiler, *runner] if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (scripts/test.sh installs them with apt)")
    exe = tmp_path_factory.mktemp("neon") / "a8w8_harness"
    flags = [f for f in family.cflags if f not in ("-shared", "-fPIC", "-fopenmp")]
    sources = [str(KERNELS / s) for s in family.sources]
    cmd = [compiler, *flags, *([] if native else ["-static"]), f"-I{KERNELS}", *sources, str(HARNESS), "-o", str(exe)]
    subprocess.run([*cmd, "-lm"], check=True, capture_output=True)
    return [*runner, str(exe)]


def _harness_gemm(cmd, lw: Int8Linear, x, prologue: int, norm=None, residual=None, eps: float = 1e-6):
    m, (n, k) = x.shape[0], lw.qweight.shape
    flags = (m, k, n, prologue, norm is not None, lw.bias is not None, residual is not None)
    parts = [struct.pack("<7if", *flags, eps), x.float().numpy().tobytes()]
    parts += [] if norm is None else [norm.float().numpy().tobytes()]
    parts += [lw.qweight.numpy().tobytes(), lw.scale.float().numpy().tobytes()]
    parts += [] if lw.bias is None else [lw.bias.float().numpy().tobytes()]
    parts += [] if residual is None else [residual.float().numpy().tobytes()]
    done = subprocess.run(cmd, input=b"".join(parts), capture_output=True, check=True, timeout=120)
    return torch.from_numpy(np.frombuffer(done.stdout, dtype=np.float32).copy()).view(m, n)


def test_neon_family_is_bit_exact_under_emulation(neon_harness):
    """Small shapes (emulation is slow): against torch._int_mm's path without a prologue; with every prologue
    against a family this machine runs natively (the float prologues give the same bits everywhere)."""
    native = next(iter(lib for name, lib in _families_or_none().items() if name != "neon"), None)
    g = torch.Generator().manual_seed(5)
    for m, k, n in ((1, 64, 40), (5, 96, 36), (9, 128, 20)):
        lw = _weights(n, k, g)
        x = torch.randn(m, k, generator=g) * 3
        gu = torch.randn(m, 2 * k, generator=g) * 3
        residual = torch.randn(m, n, generator=g)
        norm = torch.rand(k, generator=g) + 0.5
        ref = Int8GemmLinear(lw)
        assert torch.equal(_harness_gemm(neon_harness, lw, x, 0), ref(x)), (m, k, n)
        assert torch.equal(_harness_gemm(neon_harness, lw, x, 0, residual=residual), ref(x, residual=residual))
        if native is None:
            continue
        for name, code in NEON_PROLOGUES.items():
            block = 1 << (code >> 8) if code >> 8 else 0
            op = VnniLinear(lw, native, Workspace(), input_hadamard=block)
            kind = code & 0xFF
            if kind == 1:
                want, got = op(x, norm=RMSNorm(norm, 1e-6)), _harness_gemm(neon_harness, lw, x, code, norm=norm)
            elif kind == 2:
                want, got = op(gu, gated=True), _harness_gemm(neon_harness, lw, gu, code)
            else:
                want, got = op(x), _harness_gemm(neon_harness, lw, x, code)
            assert torch.equal(got, want), (m, k, n, name)


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


def test_bf16_gemm_of_the_families_agree_within_a_rounding_step():
    """The BF16 lm_head GEMM: vdpbf16ps (AVX-512 BF16) against the AVX2 family's fused multiply-adds in the order
    Intel defines for it. Each product is exact and each addition rounds once in both, but hardware need not keep
    the definition's order, so the test allows what another order may change: the last bit of the fp32 sum,
    hence at most one BF16 step in a few outputs (on the Zen 4 this was written on: none)."""
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
                for other in outs[1:]:
                    step = 2.0 ** (torch.frexp(outs[0])[1].float() - 8)  # one BF16 step at each output's size
                    differ = other != outs[0]
                    assert ((other - outs[0]).abs() <= step + 1e-30).all(), (n, k, m)
                    assert differ.float().mean() <= 0.01, (n, k, m, differ.float().mean())
