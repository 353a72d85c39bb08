"""Turns one StepRequest into a forward pass and sampled tokens; keeps per-sequence worker state."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from loaders.weights import load_model_weights
from npu.backends import get_backend
from npu.kv_cache import PagedKVCache
from npu.messages import Ready, SampledToken, StepRequest, StepResult, WorkerConfig
from npu.model import ForwardBatch, DecoderModel, SeqSpan
from npu.sampler import Sampler, SequenceSamplingState


# From this many single-token sequences in a step on, their attention runs as one batched call
# (the backend's fused paged kernel where it has one, else a padded, masked SDPA).
DECODE_GROUP_MIN = 1


class InvalidStep(ValueError):
    """The step refers to something the worker does not have; nothing was changed."""


@dataclass
class WorkerSequence:
    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    sampling: SequenceSamplingState


class ModelRunner:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.backend = get_backend(config.backend, config.num_threads, config.int8_kernel)
        weights = load_model_weights(config.model_dir, config.quantization, quantize_lm_head=config.quantize_lm_head)
        cfg = weights.config
        self.model_config = cfg
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.model = DecoderModel(weights, self.backend, self.max_model_len)
        self.weight_bytes = weights.linear_bytes()
        self.quantization = weights.quantization.value
        num_blocks = PagedKVCache.blocks_for_budget(
            config.kv_cache_dtype, config.kv_cache_memory_bytes, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
            config.block_size,
        )
        min_blocks = -(-self.max_model_len // config.block_size)
        if num_blocks < min_blocks:
            raise ValueError(
                f"kv cache budget {config.kv_cache_memory_bytes} bytes holds {num_blocks} blocks, fewer than the "
                f"{min_blocks} one sequence of max_model_len={self.max_model_len} needs; raise --kv-cache-memory "
                "or lower --max-model-len"
            )
        self.cache = PagedKVCache(config.kv_cache_dtype, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                  num_blocks, config.block_size)
        self.sampler = Sampler(config.sampleable_vocab_size or cfg.vocab_size, config.seed, self.backend.argmax_rows)
        self.seqs: dict[int, WorkerSequence] = {}

    def ready_message(self) -> Ready:
        return Ready(
            max_model_len=self.max_model_len,
            num_blocks=self.cache.num_blocks,
            block_size=self.cache.block_size,
            vocab_size=self.model_config.vocab_size,
            kv_cache_dtype=self.config.kv_cache_dtype,
            quantization=self.quantization,
            backend=self.backend.name,
            weight_bytes=self.weight_bytes,
        )

    def warmup(self) -> None:
        """One tiny forward so that first-request latency does not include lazy kernel setup."""
        batch = ForwardBatch(
            token_ids=torch.zeros(2, dtype=torch.long),
            positions=torch.arange(2),
            slot_mapping=torch.arange(2),
            seqs=[SeqSpan(0, 2, torch.arange(2))],
            logits_rows=torch.tensor([1]),
        )
        self.model.forward(batch, self.cache)

    def _validate(self, req: StepRequest) -> None:
        bs, nb = self.cache.block_size, self.cache.num_blocks
        known = set(self.seqs) - set(req.finished_seq_ids)
        for s in req.finished_seq_ids:
            if s not in self.seqs:
                raise InvalidStep(f"finished_seq_ids: unknown sequence {s}")
        lengths: dict[int, tuple[int, int, int]] = {}  # seq -> (tokens, computed, blocks)
        for s in known:
            ws = self.seqs[s]
            lengths[s] = (len(ws.token_ids), ws.num_computed, len(ws.block_table))
        for ns in req.new_seqs:
            if ns.seq_id in known:
                raise InvalidStep(f"new sequence {ns.seq_id} already exists")
            if not 0 <= ns.num_cached_tokens < len(ns.token_ids) or ns.num_prompt_tokens > len(ns.token_ids):
                raise InvalidStep(f"sequence {ns.seq_id}: inconsistent token counts")
            known.add(ns.seq_id)
            lengths[ns.seq_id] = (len(ns.token_ids), ns.num_cached_tokens, 0)
        seen: set[int] = set()
        for ch in req.chunks:
            if ch.seq_id not in known:
                raise InvalidStep(f"chunk for unknown sequence {ch.seq_id}")
            if ch.seq_id in seen:
                raise InvalidStep(f"sequence {ch.seq_id} scheduled twice in one step")
            seen.add(ch.seq_id)
            bad = [b for b in ch.new_block_ids if not 0 <= b < nb]
            if bad:
                raise InvalidStep(f"sequence {ch.seq_id}: block index {bad[0]} out of range [0, {nb})")
            n_tok, computed, n_blocks = lengths[ch.seq_id]
            end = computed + ch.num_tokens
            if ch.num_tokens <= 0 or end > n_tok:
                raise InvalidStep(f"sequence {ch.seq_id}: {ch.num_tokens} tokens from {computed} exceeds {n_tok} known")
            if end > self.max_model_len:
                raise InvalidStep(f"sequence {ch.seq_id}: position {end - 1} beyond max_model_len {self.max_model_len}")
            if (n_blocks + len(ch.new_block_ids)) * bs < end:
                raise InvalidStep(f"sequence {ch.seq_id}: block table too short for {end} tokens")
            if ch.sample and end != n_tok:
                raise InvalidStep(f"sequence {ch.seq_id}: sample requested before the last known token")

    def execute(self, req: StepRequest) -> StepResult:
        """Validate, then apply the step. An InvalidStep leaves every sequence as it was."""
        t0 = time.perf_counter()
        self._validate(req)
        for s in req.finished_seq_ids:
            del self.seqs[s]
        for ns in req.new_seqs:
            n_prompt = ns.num_prompt_tokens
            state = SequenceSamplingState(ns.sampling, ns.token_ids[:n_prompt])
            for t in ns.token_ids[n_prompt:]:
                state.record(t)
            self.seqs[ns.seq_id] = WorkerSequence(list(ns.token_ids), ns.num_cached_tokens, [], state)
        if not req.chunks:
            return StepResult(step_id=req.step_id, tokens=[], compute_seconds=time.perf_counter() - t0)
        token_ids: list[int] = []
        positions: list[int] = []
        spans: list[SeqSpan] = []
        logits_rows: list[int] = []
        sample_seqs: list[int] = []
        for ch in req.chunks:
            ws = self.seqs[ch.seq_id]
            ws.block_table.extend(ch.new_block_ids)
            start, end = ws.num_computed, ws.num_computed + ch.num_tokens
            q_start = len(token_ids)
            token_ids.extend(ws.token_ids[start:end])
            positions.extend(range(start, end))
            table = torch.tensor(ws.block_table, dtype=torch.long)
            spans.append(SeqSpan(q_start, ch.num_tokens, self.cache.slots_of(table, end)))
            ws.num_computed = end
            if ch.sample:
                logits_rows.append(len(token_ids) - 1)
                sample_seqs.append(ch.seq_id)
        pos = torch.tensor(positions, dtype=torch.long)
        slot_mapping = torch.cat([span.context_slots[-span.q_len :] for span in spans])
        batch = ForwardBatch(
            token_ids=torch.tensor(token_ids, dtype=torch.long),
            positions=pos,
            slot_mapping=slot_mapping,
            seqs=spans,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long),
        )
        batch.group_decodes(DECODE_GROUP_MIN)
        logits = self.model.forward(batch, self.cache)
        tokens: list[SampledToken] = []
        if logits_rows:
            tokens = self.sampler.sample(logits, sample_seqs, [self.seqs[s].sampling for s in sample_seqs])
            for t in tokens:
                self.seqs[t.seq_id].token_ids.append(t.token_id)
        return StepResult(step_id=req.step_id, tokens=tokens, compute_seconds=time.perf_counter() - t0)
