"""Calling a kernel family built for another machine: the aarch64 NEON family under qemu-aarch64.

The family's C files and ``tests/native/kernel_harness.c`` are built into one static aarch64 program (natively
on aarch64, else with Debian's ``gcc-aarch64-linux-gnu``, run by ``qemu-aarch64`` from ``qemu-user``;
``scripts/test.sh`` installs both). Its arguments live in a :class:`SharedArena`: a memory file this process maps
at a fixed address and the program maps at the same one, so that a pointer (a tensor's ``data_ptr()``, or one
inside a C structure) means the same bytes on both sides. :class:`EmulatedKernels` then calls the family's
functions by name, and :class:`NativeKernels` calls a family this CPU runs the same way, so a test makes the same
calls on both and compares the bytes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import struct
import subprocess
from pathlib import Path

import torch

from npu.backends.cpu import vnni

HARNESS = Path(__file__).parent / "native" / "kernel_harness.c"
KERNELS = Path(vnni.__file__).parent
NARGS = 16  # kernel_harness.c's request: char name[32]; uint64_t args[16]
ALIGN = 64
# Where the arena is mapped in both processes: far from where Linux puts heaps, libraries and stacks (and below
# 2^47, in the user address space of x86-64 and of aarch64 alike); the next candidate where one is taken.
ARENA_ADDRESSES = [0x3A0000000000 + i * 0x10000000000 for i in range(8)]
_PROT_RW, _MAP_SHARED, _MAP_FIXED_NOREPLACE = 0x3, 0x01, 0x100000


def build_neon_harness(out_dir: Path, name: str = "neon") -> tuple[list[str] | None, str]:
    """An aarch64 family (neon, neon-plain) linked into the harness: (command to run it, "") or (None, why it cannot
    be built here)."""
    family = vnni.FAMILIES[name]
    native = platform.machine() in ("aarch64", "arm64")
    compiler = "gcc" if native else "aarch64-linux-gnu-gcc"
    runner = [] if native else ["qemu-aarch64"]
    missing = [tool for tool in [compiler, *runner] if shutil.which(tool) is None]
    if missing:
        return None, f"{', '.join(missing)} not installed (scripts/test.sh installs them with apt)"
    exe = out_dir / "kernel_harness"
    # single-threaded (no -fopenmp: the pragmas are ignored), as emulated threads only add time
    flags = [f for f in family.cflags if f not in ("-shared", "-fPIC", "-fopenmp")]
    sources = [str(KERNELS / s) for s in family.sources]
    cmd = [compiler, *flags, *([] if native else ["-static"]), f"-I{KERNELS}", *sources, str(HARNESS), "-o", str(exe)]
    subprocess.run([*cmd, "-lm"], check=True, capture_output=True)
    return [*runner, str(exe)], ""


class SharedArena:
    """A memory file mapped at the same address here and in the harness; tensors are carved from it."""

    def __init__(self, size: int):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        self.size, self.fd = size, os.memfd_create("kernel-arena")
        os.ftruncate(self.fd, size)
        for address in ARENA_ADDRESSES:
            if libc.mmap(address, size, _PROT_RW, _MAP_SHARED | _MAP_FIXED_NOREPLACE, self.fd, 0) == address:
                self.base = address
                break
        else:
            raise OSError(f"no free address for the shared arena among {[hex(a) for a in ARENA_ADDRESSES]}")
        self._libc, self._used = libc, 0

    def contains(self, address: int, nbytes: int = 1) -> bool:
        return self.base <= address and address + nbytes <= self.base + self.size

    def raw(self, nbytes: int) -> int:
        """The address of ``nbytes`` fresh bytes (zeroed, cache-line aligned)."""
        at = self.base + self._used
        self._used += -(-max(nbytes, 1) // ALIGN) * ALIGN
        if self._used > self.size:
            raise MemoryError(f"the shared arena's {self.size} bytes are used up")
        ctypes.memset(at, 0, nbytes)
        return at

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        buffer = (ctypes.c_char * max(nbytes, 1)).from_address(self.raw(nbytes))
        return torch.frombuffer(buffer, dtype=dtype, count=numel).view(*shape)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        out = self.empty(tuple(tensor.shape), tensor.dtype)
        out.copy_(tensor)
        return out

    def struct(self, value: ctypes.Structure | ctypes.Array) -> int:
        """A C structure (or array of them) copied into the arena; its address."""
        at = self.raw(ctypes.sizeof(value))
        ctypes.memmove(at, ctypes.addressof(value), ctypes.sizeof(value))
        return at

    def close(self) -> None:
        self._libc.munmap(ctypes.c_void_p(self.base), ctypes.c_size_t(self.size))
        os.close(self.fd)


def _address(arg) -> int | float:
    if isinstance(arg, torch.Tensor):
        return arg.data_ptr()
    return 0 if arg is None else arg


def _is_pointer(ctype) -> bool:
    return isinstance(ctype, type) and issubclass(ctype, ctypes._Pointer)


class NativeKernels:
    """A family this CPU runs, called with the same arguments as :class:`EmulatedKernels` (tensors, ints, floats,
    None for NULL, ints for other addresses)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib, self.family = lib, lib.family

    def __getattr__(self, name: str):
        fn = getattr(self.lib, name)

        def call(*args):
            types = fn.argtypes or [None] * len(args)
            # an address where a structure pointer is declared (decoder_stack.py) becomes that pointer type
            return fn(
                *(
                    ctypes.cast(a, t) if isinstance(a, int) and _is_pointer(t) else _address(a)
                    for a, t in zip(args, types)
                )
            )

        return call


class EmulatedKernels:
    """The harness program: ``kernels.<function>(*args)`` runs that function there and returns its result.
    Every pointer argument must point into ``arena`` (checked here: anything else would crash the harness)."""

    def __init__(self, command: list[str], arena: SharedArena, family: vnni.KernelFamily):
        self.arena, self.family = arena, family
        self.process = subprocess.Popen(
            [*command, f"/proc/self/fd/{arena.fd}", hex(arena.base), str(arena.size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=[arena.fd],
        )

    def _word(self, name: str, arg) -> bytes:
        if isinstance(arg, torch.Tensor):
            nbytes = arg.untyped_storage().nbytes()
            if not self.arena.contains(arg.untyped_storage().data_ptr(), nbytes):
                raise ValueError(f"{name}: a tensor argument outside the shared arena")
        if isinstance(arg, float):
            return struct.pack("<fI", arg, 0)
        value = _address(arg)
        if isinstance(arg, int) and value > 1 << 32 and not self.arena.contains(value):
            raise ValueError(f"{name}: an address outside the shared arena")
        return struct.pack("<Q", value & (1 << 64) - 1)

    def __getattr__(self, name: str):
        def call(*args) -> int:
            assert len(args) <= NARGS and len(name) < 32, name
            request = name.encode().ljust(32, b"\0") + b"".join(self._word(name, a) for a in args)
            self.process.stdin.write(request.ljust(32 + 8 * NARGS, b"\0"))
            self.process.stdin.flush()
            answer = self.process.stdout.read(8)
            if len(answer) != 8:
                raise RuntimeError(f"the kernel harness died in {name} (exit {self.process.wait()})")
            return struct.unpack("<q", answer)[0]

        return call

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
