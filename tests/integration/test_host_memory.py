"""Huge-page host buffers (npu/host_memory.py): alignment, contents, arena packing, and that Linux really
backs them with huge pages where its THP setting allows."""

from pathlib import Path

import pytest
import torch

from npu.host_memory import HUGE_PAGE_BYTES, TENSOR_ALIGN, HugePageArena, empty_huge_pages, zeros_huge_pages

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that contains ``address`` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's header line: start-end perms ...
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_zeros_huge_pages_is_aligned_zero_and_writable():
    t = zeros_huge_pages((3, 5, 7), torch.float32)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % HUGE_PAGE_BYTES == 0
    assert torch.count_nonzero(t) == 0
    t[2, 4, 6] = 1.5
    assert t.sum().item() == 1.5


def test_arena_packs_aligned_tensors_without_overlap():
    arena = HugePageArena(chunk_bytes=1 << 20)
    sizes = [
        (1000, torch.int8),
        (333, torch.float32),
        (4096, torch.bfloat16),
        (700_000, torch.int8),
        (3 << 20, torch.int8),
    ]  # the last one is larger than a chunk: a mapping of its own
    tensors = []
    for i, (n, dtype) in enumerate(sizes):
        t = arena.empty(n, dtype)
        assert t.numel() == n and t.dtype == dtype and t.data_ptr() % TENSOR_ALIGN == 0
        t.fill_(i + 1)
        tensors.append(t)
    for i, t in enumerate(tensors):  # each still holds its own value: no two overlap
        assert torch.all(t == i + 1), i
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


@pytest.mark.skipif(
    not THP_SETTING.exists() or "[never]" in THP_SETTING.read_text(),
    reason="transparent huge pages are off on this machine",
)
def test_buffers_are_backed_by_huge_pages_where_the_kernel_offers_them():
    t = empty_huge_pages(4 * HUGE_PAGE_BYTES)
    t.fill_(1)  # first touch allocates the pages
    assert _anon_huge_kb(t.data_ptr()) >= 2 * HUGE_PAGE_BYTES // 1024
