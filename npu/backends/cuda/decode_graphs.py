"""Pure decode steps replayed from CUDA graphs, one graph per (batch, context length) bucket.

A decode step of a 40-layer model launches several hundred small kernels; at batch 1 their launch overhead
is as long as the weight streaming itself. A captured graph launches them all at once. Inputs are copied
into the graph's static buffers, padded up to the bucket: padding rows have KV slot -1 (the KV write skips
them) and context length 0 (attention gives zeros), and every kernel computes a row or a sequence from its
own data only, so the real rows' results are those of the eager layer loop, bit for bit
(``tests/integration/test_cuda_kernels.py`` compares them through the same padding, run eagerly under the interpreter).

Graphs are captured lazily, the first time a bucket is met (a one-time cost of a few hundred milliseconds
per bucket), and share one memory pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from npu.kv_cache import Int8KV, PagedKVCache
from npu.model import DecodeGroup, ForwardBatch

# Batch buckets are powers of two up to this; larger decode steps run eagerly.
MAX_GRAPH_BATCH = 256
# Context buckets are powers of two from this (the decode attention's split size) up to max positions.
MIN_CONTEXT_BUCKET = 256

LayerLoop = Callable[[torch.Tensor, ForwardBatch, PagedKVCache], torch.Tensor]


def bucket(n: int, smallest: int = 1) -> int:
    """The power of two >= ``n`` (at least ``smallest``)."""
    return max(smallest, 1 << (n - 1).bit_length())


@dataclass
class _StaticStep:
    """One bucket's input buffers, its batch over them and (once captured) its graph and output."""

    x: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    slots: torch.Tensor
    lengths: torch.Tensor
    batch: ForwardBatch
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None


class PaddedDecodeStack:
    """The backend's ``decode_stack``: runs a pure decode step through static, bucket-padded buffers; on a
    CUDA device from a captured graph, elsewhere (``capture=False``) eagerly through the same buffers."""

    def __init__(self, layer_loop: LayerLoop, hidden: int, max_positions: int, device: torch.device, capture: bool):
        self.layer_loop, self.hidden, self.device, self.capture = layer_loop, hidden, device, capture
        self.max_context_bucket = bucket(max_positions, MIN_CONTEXT_BUCKET)
        self.steps: dict[tuple[int, int, int], _StaticStep] = {}
        self.pool = None

    def _static_step(self, batch_bucket: int, context_bucket: int) -> _StaticStep:
        dev = self.device
        x = torch.zeros(batch_bucket, self.hidden, dtype=torch.float32, device=dev)
        positions = torch.zeros(batch_bucket, dtype=torch.long, device=dev)
        slot_mapping = torch.full((batch_bucket,), -1, dtype=torch.long, device=dev)
        slots = torch.zeros(batch_bucket, context_bucket, dtype=torch.long, device=dev)
        lengths = torch.zeros(batch_bucket, dtype=torch.int32, device=dev)
        group = DecodeGroup(torch.arange(batch_bucket, device=dev), slots, lengths, covers_all_rows=True)
        batch = ForwardBatch(
            token_ids=positions,  # (the layer loop reads only its length)
            positions=positions,
            slot_mapping=slot_mapping,
            seqs=[],
            logits_rows=positions[:0],
            decode=group,
        )
        return _StaticStep(x, positions, slot_mapping, slots, lengths, batch)

    def _capture(self, step: _StaticStep, cache: PagedKVCache) -> None:
        # Every row is padding here (no KV slot, no context): warming up and capturing touch no cache entry.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.layer_loop(step.x, step.batch, cache)  # compiles every kernel before capture
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step.out = self.layer_loop(step.x, step.batch, cache)
        self.pool = graph.pool()
        step.graph = graph

    def decode(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        context_slots: torch.Tensor,
        lengths: torch.Tensor,
        cache: PagedKVCache,
    ) -> bool:
        """Run every layer on ``x`` ``[S, hidden]`` in place; False (nothing touched) past the largest bucket,
        or for a KV dtype other than INT8: the padding rows rely on the Triton INT8 KV write skipping slot -1,
        and the reference KV write of the other dtypes (``index_copy_``) does not (on an H200 its device-side
        bounds assert fired on the first capture of an fp32-KV model)."""
        s, longest = context_slots.shape
        if s > MAX_GRAPH_BATCH or longest > self.max_context_bucket or not isinstance(cache.format, Int8KV):
            return False
        key = (bucket(s), bucket(longest, MIN_CONTEXT_BUCKET), id(cache))
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = self._static_step(key[0], key[1])
            if self.capture:
                self._capture(step, cache)
        step.x[:s].copy_(x)
        step.positions[:s].copy_(positions)
        step.slot_mapping[:s].copy_(slot_mapping)
        step.slots[:s, :longest].copy_(context_slots)  # (columns past a row's length are never read)
        step.lengths[:s].copy_(lengths)
        step.lengths[s:].zero_()
        step.slot_mapping[s:].fill_(-1)
        if step.graph is not None:
            step.graph.replay()
            out = step.out
        else:
            out = self.layer_loop(step.x, step.batch, cache)
        x.copy_(out[:s])
        return True
