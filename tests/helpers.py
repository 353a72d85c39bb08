"""Test helpers shared by several test modules."""

from __future__ import annotations

from npu.messages import ScheduledChunk, StepRequest
from npu.runner import ModelRunner

BLOCK_SIZE = 4  # small blocks so prompts and decodes cross many block boundaries


class Driver:
    """Drives a ModelRunner directly (no process) with trivially sequential block allocation."""

    def __init__(self, runner: ModelRunner):
        self.runner, self.step_id, self.next_block = runner, 0, 0
        self.blocks: dict[int, int] = {}
        self.computed: dict[int, int] = {}

    def _blocks_for(self, seq: int, end: int) -> list[int]:
        need = -(-end // BLOCK_SIZE) - self.blocks.get(seq, 0)
        ids = list(range(self.next_block, self.next_block + need))
        self.next_block += need
        self.blocks[seq] = self.blocks.get(seq, 0) + need
        return ids

    def run(self, new=(), chunks=()):
        self.step_id += 1
        real_chunks = []
        for seq, n, sample in chunks:
            end = self.computed.get(seq, 0) + n
            real_chunks.append(ScheduledChunk(seq, n, self._blocks_for(seq, end), sample))
            self.computed[seq] = end
        return self.runner.execute(StepRequest(self.step_id, [], list(new), real_chunks))
