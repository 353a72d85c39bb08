"""Continuous batching with one token budget per step (vLLM v1 style).

Every sequence has ``num_computed_tokens`` that catch up to its known tokens (prompt + output).
A step first serves running sequences (a decode is 1 token, a long prompt the next chunk), then admits
waiting ones while the budget, the sequence cap and the free KV blocks allow. Prefix-cache hits set
a new sequence's computed count ahead, which is how cached prefixes skip prefill. When blocks run
out, the lowest-priority, newest running sequence is preempted by recompute.

Requests share the running batch fairly (within a priority): admission takes the waiting sequence whose request
runs the fewest sequences (round robin between requests), and when the batch is full while a request runs fewer
than its share (``max_num_seqs`` / the number of requests), one sequence of the request running the most, above
its share, is preempted to make room. So a request's ``n`` cannot hold the batch: four requests of
``n = 16`` no longer keep a fifth client waiting until one of them ends.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sequence import FinishReason, Sequence, Status, TokenLogprob
from npu.messages import NewSequence, ScheduledChunk, StepRequest, StepResult


@dataclass
class SequenceUpdate:
    """What one step changed for one sequence: one sampled token (a verified draft gives several updates), or
    the sequence's failure. ``new_text`` is filled in after the scheduler, with the stop strings
    (:meth:`engine.core.EngineCore.step`)."""

    seq: Sequence
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    finished: bool
    error: str | None = None  # why the sequence failed (the worker could not run it, or its grammar failed)
    new_text: str = ""
    num_output_tokens: int = 0  # the sequence's output length counting this update's token
    text_hidden: bool = False  # the token ended the sequence as EOS or a stop token id: its text is not shown


@dataclass
class ScheduledStep:
    request: StepRequest
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


@dataclass
class _StepBuilder:
    """The step :meth:`Scheduler.schedule` is building: what is left of its token budget, and its parts."""

    budget: int
    now: float
    new_seqs: list[NewSequence] = field(default_factory=list)
    chunks: list[ScheduledChunk] = field(default_factory=list)
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        if config.max_model_len is None:
            raise ValueError("the scheduler needs max_model_len (EngineCore sets it from the worker's report)")
        self.config = config
        self.max_model_len: int = config.max_model_len
        self.bm = block_manager
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self._worker_known: set[int] = set()
        self._to_release: list[int] = []  # sequences the worker must forget at the next step
        self._step_id = 0
        self.num_preemptions = 0
        self.num_constraint_failures = 0  # sequences ended because their grammar failed mid-answer

    # ---- admission and removal -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.seqs[seq.seq_id] = seq
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def _release(self, seq: Sequence) -> None:
        self.bm.free(seq.seq_id)
        if seq.seq_id in self._worker_known:
            self._worker_known.discard(seq.seq_id)
            self._to_release.append(seq.seq_id)

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        if seq.finished:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.times.finished = time.monotonic()
        del self.seqs[seq.seq_id]

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop its KV; it waits again with its generated tokens kept."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._to_release)

    # ---- one step ---------------------------------------------------------------------------
    def _chunk_len(self, seq: Sequence, computed: int, budget: int) -> int:
        """Tokens to compute for ``seq`` this step, given ``computed`` already done."""
        n = min(seq.num_tokens - computed, budget)
        if self.config.long_prefill_token_threshold > 0:
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    def _lookahead(self, seq: Sequence, n: int, budget: int) -> int:
        """Drafted tokens ``seq`` may get after a chunk of ``n``: only after a sampling chunk, never past the
        context, its max_tokens (the step returns up to draft + 1 tokens) or the step's token budget."""
        end = seq.num_computed_tokens + n
        if not self.config.num_lookahead_tokens or end != seq.num_tokens or not seq.allows_drafts:
            return 0
        if self.config.lookahead_max_running is not None and len(self.running) >= self.config.lookahead_max_running:
            return 0
        left = seq.max_tokens - len(seq.output_token_ids) - 1
        return max(0, min(self.config.num_lookahead_tokens, self.max_model_len - end, left, budget))

    def schedule(self) -> ScheduledStep:
        """One step: a fair share made where the batch is full, running sequences first, then waiting ones
        admitted into what is left of the budget."""
        self._step_id += 1
        step = _StepBuilder(self.config.max_num_batched_tokens, time.monotonic())
        self._make_room_for_a_fair_share()
        self._schedule_running(step)
        self._admit_waiting(step)
        for seq, n in step.scheduled:
            seq.num_computed_tokens += n
        request = StepRequest(self._step_id, self._to_release, step.new_seqs, step.chunks)
        self._to_release = []
        return ScheduledStep(request, step.scheduled)

    def _schedule_running(self, step: _StepBuilder) -> None:
        """Running sequences, best first, each its next chunk (a decode: one token); when blocks run out the
        worst running sequence is preempted, down to the one being scheduled."""
        i = 0
        while i < len(self.running) and step.budget > 0:
            seq = self.running[i]
            n = self._chunk_len(seq, seq.num_computed_tokens, step.budget)
            new_blocks = self.bm.allocate(seq.seq_id, seq.num_computed_tokens + n)
            while new_blocks is None:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
                new_blocks = self.bm.allocate(seq.seq_id, seq.num_computed_tokens + n)
            if new_blocks is None:
                break  # seq itself was preempted: it was the last one
            draft = self._lookahead(seq, n, step.budget - n)
            if draft:  # room to draft into, where free blocks allow (never preempting for a guess)
                more = self.bm.allocate(seq.seq_id, seq.num_computed_tokens + n + draft)
                draft = draft if more is not None else 0
                new_blocks += more or []
            self._emit(step, seq, n, new_blocks, draft)
            i += 1

    def _next_waiting(self) -> int:
        """The index in ``waiting`` of the sequence to admit next: of the best priority waiting, the one whose
        request runs the fewest sequences, then the earliest."""
        running = Counter(s.request_id for s in self.running)
        best, chosen, fewest = self.waiting[0].priority, 0, None
        for i, seq in enumerate(self.waiting):  # (sorted: the best priority first, earliest first within it)
            if seq.priority != best:
                break
            count = running[seq.request_id]
            if fewest is None or count < fewest:
                chosen, fewest = i, count
                if count == 0:
                    break  # nobody can be ahead of an earliest sequence whose request runs nothing
        return chosen

    def _make_room_for_a_fair_share(self) -> None:
        """With the batch full: if the next waiting sequence's request runs fewer sequences than its share,
        preempt the newest sequence of the request that runs the most (above its share, and no more important
        than the waiting one). One per step: the room goes to that sequence when waiting ones are admitted."""
        if not self.waiting or len(self.running) < self.config.max_num_seqs:
            return
        waiting = self.waiting[self._next_waiting()]
        running = Counter(s.request_id for s in self.running)
        requests = set(running) | {s.request_id for s in self.waiting}
        share = max(1, self.config.max_num_seqs // len(requests))
        if running[waiting.request_id] >= share:
            return
        heavy = Counter(s.request_id for s in self.running if s.priority >= waiting.priority).most_common(1)
        if not heavy or heavy[0][1] <= share:
            return
        self._preempt(max((s for s in self.running if s.request_id == heavy[0][0]), key=lambda s: s.sort_key))

    def _admit_waiting(self, step: _StepBuilder) -> None:
        """Waiting sequences, in :meth:`_next_waiting`'s order, while the budget, the sequence cap and free blocks
        allow (never preempting for them); a prefix-cache hit starts a sequence's computed tokens past its
        cached blocks."""
        while self.waiting and step.budget > 0 and len(self.running) < self.config.max_num_seqs:
            index = self._next_waiting()
            seq = self.waiting[index]
            cached = self.bm.find_cached_prefix(seq.all_token_ids)
            computed = len(cached) * self.bm.block_size
            n = self._chunk_len(seq, computed, step.budget)
            if not self.bm.can_admit(cached, computed + n):
                break
            self.waiting.pop(index)
            self.bm.adopt_cached(seq.seq_id, cached, seq.num_tokens)
            seq.num_computed_tokens = computed
            if not seq.admitted_once:
                seq.num_cached_tokens = computed
                seq.admitted_once = True
            new_blocks = self.bm.allocate(seq.seq_id, computed + n)
            assert new_blocks is not None
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            self._emit(step, seq, n, new_blocks)

    def _emit(self, step: _StepBuilder, seq: Sequence, n: int, new_blocks: list[int], max_draft: int = 0) -> None:
        """Add ``n`` tokens of ``seq`` (and ``max_draft`` drafted ones) to the step being built."""
        if seq.seq_id not in self._worker_known:
            # The worker learns the whole table, prefix-cache blocks included.
            new_blocks = list(self.bm.tables[seq.seq_id])
            self._worker_known.add(seq.seq_id)
            step.new_seqs.append(
                NewSequence(
                    seq_id=seq.seq_id,
                    token_ids=seq.all_token_ids,
                    num_prompt_tokens=len(seq.prompt_token_ids),
                    num_cached_tokens=seq.num_computed_tokens,
                    sampling=seq.worker_options,
                )
            )
        end = seq.num_computed_tokens + n
        step.chunks.append(ScheduledChunk(seq.seq_id, n, new_blocks, sample=end == seq.num_tokens, max_draft=max_draft))
        self.bm.cache_full_blocks(seq.seq_id, seq.all_token_ids, end)
        step.scheduled.append((seq, n))
        step.budget -= n + max_draft
        if seq.times.first_scheduled is None:
            seq.times.first_scheduled = step.now

    # ---- results ----------------------------------------------------------------------------
    def update(self, step: ScheduledStep, result: StepResult) -> list[SequenceUpdate]:
        """Append sampled tokens and apply the token-level stop conditions; finished sequences are released.
        Sequences the worker could not run (``step`` says which of their tokens were not written) are finished
        with their error."""
        now = time.monotonic()
        updates: list[SequenceUpdate] = [
            self._fail(step, f.seq_id, f"the worker could not run this request: {f.message}") for f in result.failed
        ]
        updates = [u for u in updates if u is not None]
        seen: set[int] = set()
        for t in result.tokens:
            seq = self.seqs.get(t.seq_id)
            if seq is None or seq.finished:
                continue  # aborted while the step ran (or finished by an earlier token of this step)
            if t.seq_id in seen:  # a further token of a verified draft: the one before it was computed
                seq.num_computed_tokens += 1
            seen.add(t.seq_id)
            seq.append_output(t.token_id)
            if seq.grammar is not None and seq.grammar.error is not None:
                updates.append(self.fail_constraint(seq))
                continue
            new_lp = []
            if t.logprob is not None:
                new_lp.append(TokenLogprob(t.token_id, t.logprob, t.top_logprobs))
                seq.logprobs.extend(new_lp)
            seq.times.token_times.append(now)
            if seq.times.first_token is None:
                seq.times.first_token = now
            seq.times.last_token = now
            updates.append(self._check_stop(seq, t.token_id, new_lp))
        return updates

    def stop_at_string(self, seq: Sequence, matched: str) -> None:
        """A stop string completed in the text of ``seq``'s latest token (found after :meth:`update`): finish
        it, or, where that token also reached a length limit, record that it stopped at the string."""
        if seq.finished:
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, matched
        else:
            self.finish(seq, FinishReason.STOP, matched)

    def fail_constraint(self, seq: Sequence) -> SequenceUpdate:
        """End a sequence whose grammar failed (a resource limit of the grammar engine met mid-answer): with an
        error, never with the rest of the answer unconstrained. Its KV is whole; the worker is told to forget
        it with the next step, as for any finished sequence."""
        self.finish(seq, FinishReason.ABORT)
        self.num_constraint_failures += 1
        message = (
            f"the output's grammar could not be enforced past token {len(seq.output_token_ids)} "
            f"({seq.grammar.error}); the request's answer is not returned"
        )
        return SequenceUpdate(seq, [], [], finished=True, error=message)

    def _fail(self, step: ScheduledStep, seq_id: int, message: str) -> SequenceUpdate | None:
        self._worker_known.discard(seq_id)  # the worker has already forgotten it: no release to send
        seq = self.seqs.get(seq_id)
        if seq is None or seq.finished:
            return None  # aborted while the step ran
        # This step's tokens of the sequence were never written to the KV cache.
        written = seq.num_computed_tokens - sum(n for s, n in step.scheduled if s is seq)
        self.bm.forget_unwritten(seq.seq_id, written)
        self.finish(seq, FinishReason.ABORT)
        return SequenceUpdate(seq, [], [], finished=True, error=message)

    def _check_stop(self, seq: Sequence, token: int, new_lp: list[TokenLogprob]) -> SequenceUpdate:
        """Token-level stops (vLLM's check_stop): EOS and stop token ids once min_tokens are out (EOS before, where
        a grammar has ended), then max_tokens and max_model_len. Stop strings are matched in the text, after this."""
        p = seq.params
        n_out = len(seq.output_token_ids)
        reason: FinishReason | None = None
        stop_reason: int | None = None
        past_min = n_out >= p.min_tokens
        if (
            not p.ignore_eos
            and token in seq.eos_token_ids
            # a grammar that accepted EOS is complete and allows nothing more: it ends the output before min_tokens
            and (past_min or (seq.grammar is not None and seq.grammar.finished))
        ):
            reason = FinishReason.STOP
        elif past_min and token in seq.stop_token_set:
            reason, stop_reason = FinishReason.STOP, token
        hidden = reason is not None
        if reason is None and (n_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = FinishReason.LENGTH
        if reason is not None:
            self.finish(seq, reason, stop_reason)
        return SequenceUpdate(seq, [token], new_lp, reason is not None, num_output_tokens=n_out, text_hidden=hidden)
