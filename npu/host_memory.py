"""Host buffers on transparent huge pages, for the large long-lived arrays the kernels stream: packed
weights and the KV cache.

With 4 KiB pages every 4 KiB of a KV block or a weight stream is another TLB entry, and a decode step
touches hundreds of MB; with 2 MiB pages the page walks mostly go away. ``benchmarks/host_memory_bench.py``
(2-core Zen 4 VM, THP in ``madvise`` mode, the same kernels on the same data, alternating): decode
attention over a 28-layer INT8 cache, whose blocks are scattered, 4-14 % faster; the GEMV over packed
weights, one sequential stream, unchanged within noise.

Linux hands out huge pages for an anonymous mapping advised with ``MADV_HUGEPAGE`` when
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``; with ``never`` (or
elsewhere) the advice is ignored and these are ordinary pages: nothing else changes.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE_BYTES = 2 << 20  # x86-64 / arm64 transparent huge page
# Small tensors (most packed linears are 1-6 MiB) share mappings of this size instead of each rounding up
# to whole huge pages; only the tail of a chunk that the next tensor does not fit in goes unused.
ARENA_CHUNK_BYTES = 64 << 20
TENSOR_ALIGN = 64  # the kernels' vector loads want 64-byte aligned rows


def empty_huge_pages(nbytes: int) -> torch.Tensor:
    """An uninitialized (in fact zero) uint8 tensor of ``nbytes`` whose first byte is 2 MiB aligned, in an
    anonymous mapping advised for huge pages. The tensor keeps the mapping alive."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # before the first touch: pages are allocated on first write
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # kernel without THP
            pass
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    skip = -raw.data_ptr() % HUGE_PAGE_BYTES
    return raw[skip : skip + nbytes]


def zeros_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros of ``shape`` on huge pages, every page touched now (the memory is committed at load time,
    not in the middle of a step)."""
    return empty_huge_pages(math.prod(shape) * dtype.itemsize).view(dtype).view(shape).zero_()


class HugePageArena:
    """Hands out tensors carved from huge-page mappings of ``chunk_bytes`` (a tensor larger than that gets
    a mapping of its own). Tensors are never returned to the arena: it is for weights that live as long
    as the model."""

    def __init__(self, chunk_bytes: int = ARENA_CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self._chunk = torch.empty(0, dtype=torch.uint8)
        self._used = 0

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized 1-D tensor of ``numel`` elements, 64-byte aligned."""
        nbytes = numel * dtype.itemsize
        if nbytes > self.chunk_bytes:
            return empty_huge_pages(nbytes).view(dtype)
        if self._used + nbytes > self._chunk.numel():
            self._chunk, self._used = empty_huge_pages(self.chunk_bytes), 0
        out = self._chunk[self._used : self._used + nbytes].view(dtype)
        self._used += -(-nbytes // TENSOR_ALIGN) * TENSOR_ALIGN
        return out
