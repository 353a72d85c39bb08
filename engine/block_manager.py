"""Paged KV block accounting with automatic prefix caching.

Blocks are reference counted. A block that is full gets a chained hash of (parent hash, its token
ids) and is registered in the prefix cache when the tokens that fill it are scheduled; a later
sequence whose leading full blocks hash the same reuses them and skips their prefill. Unreferenced
blocks sit in a free queue in release order; a cached one stays findable until it is taken from the
queue for new data (least recently released first), which evicts its hash.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

ROOT_HASH = b""


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """Chained hash of one full block (collision-resistant, unlike Python's ``hash``)."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        # seq id -> its block ids, and the hashes of its leading full blocks.
        self.tables: dict[int, list[int]] = {}
        self._hashes: dict[int, list[bytes]] = {}
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks held by sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_admit(self, cached: list[int], num_tokens: int) -> bool:
        """Whether a new sequence can get blocks for its first ``num_tokens`` tokens, starting from the cached
        blocks ``cached`` (:meth:`find_cached_prefix`): the blocks beyond those must be free, and so must the
        cached ones that sit in the free queue themselves (adopting them takes them out of it)."""
        cached_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        need = -(-num_tokens // self.block_size) - len(cached)
        return need + cached_free <= len(self._free)

    # ---- prefix cache ----------------------------------------------------------------------
    def find_cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Block ids caching the longest run of leading full blocks, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = ROOT_HASH
        max_blocks = (len(token_ids) - 1) // self.block_size
        for i in range(max_blocks):
            h = block_hash(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
            parent = h
        return hits

    def adopt_cached(self, seq_id: int, block_ids: list[int], num_tokens: int) -> None:
        """Give a new sequence of ``num_tokens`` the cached leading blocks :meth:`find_cached_prefix` found."""
        assert seq_id not in self.tables
        if self.enable_prefix_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += len(block_ids) * self.block_size
        for b in block_ids:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self._free[b]
            block.ref_count += 1
        self.tables[seq_id] = list(block_ids)
        self._hashes[seq_id] = [self.blocks[b].hash for b in block_ids]  # type: ignore[misc]

    def cache_full_blocks(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """Register the blocks of ``seq_id`` that ``num_computed`` tokens fill completely."""
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes.setdefault(seq_id, [])
        table = self.tables[seq_id]
        for i in range(len(hashes), num_computed // self.block_size):
            parent = hashes[-1] if hashes else ROOT_HASH
            h = block_hash(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            hashes.append(h)
            block = self.blocks[table[i]]
            if h not in self._cached and block.hash is None:
                block.hash = h
                self._cached[h] = block.block_id

    def forget_unwritten(self, seq_id: int, num_written_tokens: int) -> None:
        """Take the blocks of ``seq_id`` past its first ``num_written_tokens`` out of the prefix cache: they
        were registered when scheduled, but their KV was never written (the step failed)."""
        hashes = self._hashes.get(seq_id)
        if not hashes:
            return
        table = self.tables[seq_id]
        first = num_written_tokens // self.block_size
        for i in range(first, len(hashes)):
            block = self.blocks[table[i]]
            if block.hash == hashes[i] and self._cached.get(block.hash) == block.block_id:
                del self._cached[block.hash]
                block.hash = None
        del hashes[first:]

    # ---- allocation ------------------------------------------------------------------------
    def allocate(self, seq_id: int, num_tokens: int) -> list[int] | None:
        """Grow the table of ``seq_id`` to hold ``num_tokens``; the new block ids, or None if too few are free."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > len(self._free):
            return None
        new: list[int] = []
        for _ in range(need):
            b, _ = self._free.popitem(last=False)  # least recently released first
            block = self.blocks[b]
            if block.hash is not None:  # evict it from the prefix cache
                if self._cached.get(block.hash) == b:
                    del self._cached[block.hash]
                block.hash = None
            block.ref_count = 1
            new.append(b)
        self.tables.setdefault(seq_id, []).extend(new)
        return new

    def free(self, seq_id: int) -> None:
        """Release every block of ``seq_id``. Tail blocks are queued first, so they are evicted first."""
        for b in reversed(self.tables.pop(seq_id, [])):
            block = self.blocks[b]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {b} freed twice"
            if block.ref_count == 0:
                self._free[b] = None
        self._hashes.pop(seq_id, None)

    def check_invariants(self) -> None:
        """Every block is either referenced by tables or free, never both; counts match (for tests)."""
        refs = [0] * self.num_blocks
        for table in self.tables.values():
            for b in table:
                refs[b] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], (block, refs[block.block_id])
            assert (block.ref_count == 0) == (block.block_id in self._free), block
        for h, b in self._cached.items():
            assert self.blocks[b].hash == h
