"""Turns one StepRequest into a forward pass and sampled tokens; keeps per-sequence worker state."""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass

import torch

from loaders.weights import load_model_weights
from npu.backends import get_backend
from npu.config import WorkerConfig
from npu.kv_cache import PagedKVCache
from npu.messages import (
    NewSequence,
    Ready,
    SampledToken,
    ScheduledChunk,
    SequenceFailure,
    SpecDecodeStats,
    StepRequest,
    StepResult,
)
from npu.model import DecoderModel, ForwardBatch, SeqSpan
from npu.sampler import Sampler, SequenceSamplingState, options_error
from npu.spec_decode import NgramProposer

log = logging.getLogger("a8w8.worker")


@dataclass
class WorkerSequence:
    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    sampling: SequenceSamplingState
    proposer: NgramProposer | None = None  # speculative decoding's drafter, where it is on


def fit_max_model_len(
    requested: int | None, max_position_embeddings: int, num_blocks: int, block_size: int, budget_bytes: int
) -> tuple[int, int | None]:
    """(max_model_len, the length it was lowered from or None). Without an explicit ``requested`` length the
    model's own is used, lowered to what the KV cache holds (one sequence of max_model_len must fit, as in
    llama-server, which sizes its context to memory); an explicit length the cache cannot hold is an error."""
    wanted = min(requested or max_position_embeddings, max_position_embeddings)
    fits = num_blocks * block_size
    if fits >= wanted:
        return wanted, None
    if requested is not None or fits == 0:
        raise ValueError(
            f"the KV cache budget of {budget_bytes} bytes holds {num_blocks} blocks of {block_size} tokens "
            f"({fits} tokens), fewer than one sequence of max_model_len={wanted} needs; raise --kv-cache-memory "
            "or lower --max-model-len"
        )
    return fits, wanted


class ModelRunner:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.backend = get_backend(config.device, config.num_threads, config.cpu_kernels)
        weights = load_model_weights(
            config.model_dir, config.quantization, quantize_lm_head=config.quantize_lm_head, dtype=config.dtype
        )
        cfg = weights.config
        self.model_config = cfg
        num_blocks = PagedKVCache.blocks_for_budget(
            config.kv_cache_dtype,
            config.kv_cache_memory_bytes,
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            config.block_size,
        )
        self.max_model_len, self.max_model_len_capped_from = fit_max_model_len(
            config.max_model_len,
            cfg.max_position_embeddings,
            num_blocks,
            config.block_size,
            config.kv_cache_memory_bytes,
        )
        self.weight_bytes = weights.linear_bytes()
        self.model = DecoderModel(weights, self.backend, self.max_model_len)  # (consumes the loaded layers)
        self.quantization = weights.quantization.value
        self.cache = PagedKVCache(
            config.kv_cache_dtype,
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            num_blocks,
            config.block_size,
            self.backend.device,
        )
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
            device=self.backend.device_name,
            backend_note=self.backend.note,
            max_model_len_capped_from=self.max_model_len_capped_from,
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

    def _new_sequence_error(self, ns: NewSequence) -> str | None:
        if ns.seq_id in self.seqs:
            return f"new sequence {ns.seq_id} already exists"
        if not 0 <= ns.num_cached_tokens < len(ns.token_ids) or ns.num_prompt_tokens > len(ns.token_ids):
            return f"sequence {ns.seq_id}: inconsistent token counts"
        vocab = self.model_config.vocab_size
        bad = [t for t in ns.token_ids if not 0 <= t < vocab]
        if bad:
            return f"sequence {ns.seq_id}: token id {bad[0]} is outside the vocabulary [0, {vocab})"
        return options_error(ns.sampling, vocab)

    def _chunk_error(self, ch: ScheduledChunk, ws: WorkerSequence | None) -> str | None:
        if ws is None:
            return f"chunk for unknown sequence {ch.seq_id}"
        bs, nb = self.cache.block_size, self.cache.num_blocks
        bad = [b for b in ch.new_block_ids if not 0 <= b < nb]
        if bad:
            return f"sequence {ch.seq_id}: block index {bad[0]} out of range [0, {nb})"
        end = ws.num_computed + ch.num_tokens
        if ch.num_tokens <= 0 or end > len(ws.token_ids):
            return (
                f"sequence {ch.seq_id}: {ch.num_tokens} tokens from {ws.num_computed} exceeds {len(ws.token_ids)} known"
            )
        if end > self.max_model_len:
            return f"sequence {ch.seq_id}: position {end - 1} beyond max_model_len {self.max_model_len}"
        if (len(ws.block_table) + len(ch.new_block_ids)) * bs < end:
            return f"sequence {ch.seq_id}: block table too short for {end} tokens"
        if ch.sample and end != len(ws.token_ids):
            return f"sequence {ch.seq_id}: sample requested before the last known token"
        if ch.max_draft and (
            not ch.sample
            or self.config.speculative is None
            or ch.max_draft < 0
            or end + ch.max_draft > self.max_model_len
            or (len(ws.block_table) + len(ch.new_block_ids)) * bs < end + ch.max_draft
        ):
            return f"sequence {ch.seq_id}: no room (or no speculative decoding) for {ch.max_draft} drafted tokens"
        return None

    def _plan(self, req: StepRequest, failures: dict[int, str]) -> list[ScheduledChunk]:
        """Apply the step's releases and new sequences, and return the chunks that can run. A sequence
        whose part of the step is inconsistent is recorded in ``failures`` and forgotten; the rest of the
        step is unaffected (checked before anything is written)."""
        for s in req.finished_seq_ids:
            self.seqs.pop(s, None)  # releasing an unknown sequence is a no-op: releases are idempotent
        new: dict[int, WorkerSequence] = {}
        for ns in req.new_seqs:
            err = "sent twice in one step" if ns.seq_id in new else self._new_sequence_error(ns)
            if err:
                failures[ns.seq_id] = err
                continue
            n_prompt = ns.num_prompt_tokens
            state = SequenceSamplingState(ns.sampling, ns.token_ids[:n_prompt])
            for t in ns.token_ids[n_prompt:]:
                state.record(t)
            proposer = NgramProposer(self.config.speculative) if self.config.speculative is not None else None
            new[ns.seq_id] = WorkerSequence(list(ns.token_ids), ns.num_cached_tokens, [], state, proposer)
        seen: set[int] = set()
        for ch in req.chunks:
            if ch.seq_id in failures:
                continue
            ws = new.get(ch.seq_id) or self.seqs.get(ch.seq_id)
            err = (
                f"sequence {ch.seq_id} scheduled twice in one step" if ch.seq_id in seen else self._chunk_error(ch, ws)
            )
            seen.add(ch.seq_id)
            if err:
                failures[ch.seq_id] = err
        # A failed sequence's new blocks are never written: a sequence that would read them (a prefix-cache
        # hit on them in this same step) cannot run either.
        unwritten = {b for ch in req.chunks if ch.seq_id in failures for b in ch.new_block_ids}
        changed = bool(unwritten)
        while changed:
            changed = False
            for ch in req.chunks:
                if ch.seq_id in failures:
                    continue
                ws = new.get(ch.seq_id) or self.seqs[ch.seq_id]
                if not unwritten.isdisjoint(ws.block_table + ch.new_block_ids):
                    failures[ch.seq_id] = f"sequence {ch.seq_id}: reads KV blocks of a sequence that failed"
                    unwritten.update(ch.new_block_ids)
                    changed = True
        for s in failures:
            self.seqs.pop(s, None)
            new.pop(s, None)
        self.seqs.update(new)
        return [ch for ch in req.chunks if ch.seq_id not in failures]

    def _fail(self, failures: dict[int, str], seq_ids, message: str) -> None:
        for s in seq_ids:
            failures[s] = message
            self.seqs.pop(s, None)

    def execute(self, req: StepRequest) -> StepResult:
        """Apply one step. Sequences that cannot run (inconsistent step data, a forward or sampling error)
        come back in ``failed`` and are forgotten; every other sequence's step runs as usual."""
        t0 = time.perf_counter()
        failures: dict[int, str] = {}
        chunks = self._plan(req, failures)

        def result(tokens: list[SampledToken]) -> StepResult:
            return StepResult(
                step_id=req.step_id,
                tokens=tokens,
                compute_seconds=time.perf_counter() - t0,
                failed=[SequenceFailure(s, m) for s, m in failures.items()],
            )

        if not chunks:
            return result([])
        token_ids: list[int] = []
        positions: list[int] = []
        spans: list[SeqSpan] = []
        logits_rows: list[int] = []
        sample_seqs: list[int] = []
        drafts: list[list[int]] = []
        masks: list[bytes | None] = []  # each sampled sequence's allowed-token bitmask (constrained decoding)
        for ch in chunks:
            ws = self.seqs[ch.seq_id]
            ws.block_table.extend(ch.new_block_ids)
            start, end = ws.num_computed, ws.num_computed + ch.num_tokens
            # speculative decoding: drafted tokens are computed after the chunk, in the same forward
            draft = ws.proposer.propose(ws.token_ids, ch.max_draft) if ch.max_draft and ws.proposer else []
            table = torch.tensor(ws.block_table, dtype=torch.long)
            slots = self.cache.slots_of(table, end + len(draft))
            spans.append(SeqSpan(len(token_ids), ch.num_tokens, slots[:end]))
            token_ids.extend(ws.token_ids[start:end])
            positions.extend(range(start, end))
            # Each drafted token is a query row of its own over its prefix, as decoding it after its predecessors
            # would be: the same (decode) attention kernel, so bit for bit the same numbers. (In A8W8 a last-bit
            # difference can move an activation across an INT8 step, and greedy output would drift.)
            for i, t in enumerate(draft):
                spans.append(SeqSpan(len(token_ids), 1, slots[: end + i + 1]))
                token_ids.append(t)
                positions.append(end + i)
            ws.num_computed = end
            if ch.sample:
                logits_rows.extend(range(len(token_ids) - 1 - len(draft), len(token_ids)))
                sample_seqs.append(ch.seq_id)
                drafts.append(draft)
                masks.append(ch.allowed_token_bitmask)
        pos = torch.tensor(positions, dtype=torch.long)
        slot_mapping = torch.cat([span.context_slots[-span.q_len :] for span in spans])
        batch = ForwardBatch(
            token_ids=torch.tensor(token_ids, dtype=torch.long),
            positions=pos,
            slot_mapping=slot_mapping,
            seqs=spans,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long),
        )
        batch.group_decodes()
        try:
            logits = self.model.forward(batch, self.cache)
        except Exception as e:  # noqa: BLE001 - the batch's sequences are the only ones it can be blamed on
            log.error("forward of step %d failed:\n%s", req.step_id, traceback.format_exc())
            self._fail(failures, [ch.seq_id for ch in chunks], f"forward failed: {type(e).__name__}: {e}")
            return result([])
        tokens: list[SampledToken] = []
        spec = None
        if logits_rows:
            tokens, sample_failures = self.sampler.sample(
                logits, sample_seqs, [self.seqs[s].sampling for s in sample_seqs], drafts, masks
            )
            for f in sample_failures:
                self._fail(failures, [f.seq_id], f.message)
            for t in tokens:
                self.seqs[t.seq_id].token_ids.append(t.token_id)
            spec = self._account_drafts(sample_seqs, drafts, tokens) if any(drafts) else None
        res = result(tokens)
        res.spec = spec
        return res

    def _account_drafts(
        self, seq_ids: list[int], drafts: list[list[int]], tokens: list[SampledToken]
    ) -> SpecDecodeStats:
        """After verification: a sequence's accepted drafts are computed (their KV is valid; the rest of the
        draft's KV is overwritten later), its drafter learns how it did; the step's statistics."""
        returned: dict[int, int] = {}
        for t in tokens:
            returned[t.seq_id] = returned.get(t.seq_id, 0) + 1
        stats = SpecDecodeStats(accepted_per_position=[0] * max(len(d) for d in drafts))
        for seq_id, draft in zip(seq_ids, drafts):
            ws = self.seqs.get(seq_id)
            if not draft or ws is None:
                continue
            accepted = returned.get(seq_id, 1) - 1
            ws.num_computed += accepted
            ws.proposer.record(len(draft), accepted)
            stats.num_drafts += 1
            stats.num_draft_tokens += len(draft)
            stats.num_accepted_tokens += accepted
            for i in range(accepted):
                stats.accepted_per_position[i] += 1
        return stats
