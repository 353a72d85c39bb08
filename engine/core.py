"""The synchronous engine: requests in, schedule -> run (worker) -> postprocess, updates out."""

from __future__ import annotations

import dataclasses
import itertools
import threading
from pathlib import Path

import msgspec

from engine.block_manager import BlockManager
from engine.chat_template import ChatTemplate, ChatTemplateError
from engine.config import EngineConfig
from engine.detokenizer import OutputText
from engine.sampling_params import InvalidRequest, PromptTooLong, SamplingParams
from engine.scheduler import Scheduler, SequenceUpdate
from engine.sequence import FinishReason, Sequence
from engine.step_watch import StepWatch
from engine.structured_output import GrammarCompiler
from engine.tokenizer import Tokenizer, load_tokenizer, max_text_bytes_per_token, tokenizer_json
from loaders.config import GenerationDefaults, load_generation_defaults, load_model_config
from npu.client import WorkerClient
from npu.messages import Ready, SpecDecodeStats, StepRequest

# Every worker serves one short request before the engine says it is ready, so that the first client does not pay
# for what a first request sets up (kernel primitives for its shapes, the sampler's and the decode path's first
# calls, the detokenizer): its prompt and its length.
WARMUP_PROMPT = "Hello!"
WARMUP_MAX_TOKENS = 4
# Priorities order requests in the scheduler; like vLLM's, they are 64-bit signed integers.
PRIORITY_MIN, PRIORITY_MAX = -(2**63), 2**63 - 1


def check_text_length(max_model_len: int, num_bytes: int, bytes_per_token: int) -> None:
    """A prompt text refused before tokenization: it has at least ``num_bytes / bytes_per_token`` tokens."""
    at_least = -(-num_bytes // bytes_per_token)
    if at_least >= max_model_len:
        raise PromptTooLong(max_model_len, at_least, at_least=True, num_bytes=num_bytes)


def check_context_length(max_model_len: int, prompt_len: int, max_tokens: int | None) -> None:
    """PromptTooLong unless the prompt (and ``max_tokens`` after it) fit."""
    if prompt_len >= max_model_len or (max_tokens is not None and prompt_len + max_tokens > max_model_len):
        raise PromptTooLong(max_model_len, prompt_len, max_tokens)


class EngineCore:
    """Owns the worker client, the block manager and the scheduler. Driven by one thread.

    Threading: the scheduler's state (:meth:`add`, :meth:`abort`, :meth:`step`, :meth:`take_unstarted`) belongs to
    one thread, the one that last called :meth:`start` or :meth:`claim_thread`; a call from any other raises
    RuntimeError. :meth:`encode_prompt`, :meth:`check_prompt_ids`, :meth:`check_request` and
    :meth:`make_sequences` read only what is fixed between starts, and the grammar compiler has its own lock:
    those may be called from any thread (engine/client.py says which the server uses where).

    :meth:`start` spawns a worker and builds the scheduler from what it reports; after the worker dies,
    :meth:`take_unstarted` empties the scheduler and ``start(carried)`` does the same again, carrying over
    the sequences that never reached the worker.
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        model_dir = Path(config.worker.model_dir)
        self.model_config = load_model_config(model_dir)
        self.tokenizer: Tokenizer = load_tokenizer(model_dir, config.tokenizer_impl)
        self.chat_template = ChatTemplate.from_model_dir(model_dir, config.chat_template)
        self.generation_defaults: GenerationDefaults = load_generation_defaults(
            model_dir, config.generation_config, config.override_generation_config
        )
        # Lets a prompt that cannot fit be refused by its size, before the tokenizer spends time on it.
        self.text_bytes_per_token = max_text_bytes_per_token(self.tokenizer)
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys(self.generation_defaults.eos_token_ids + self.model_config.eos_token_ids)
        )
        # Constrained decoding's grammars, against the model's vocabulary (the tokenizer's view built on first use).
        self.grammars = GrammarCompiler(
            lambda: tokenizer_json(self.tokenizer, model_dir),
            self.model_config.vocab_size,
            self.eos_token_ids,
            config.grammar_limits,
        )
        worker_cfg = config.worker
        if worker_cfg.sampleable_vocab_size is None:
            # Ids past the tokenizer's vocabulary are padding rows of the embedding: never sampled.
            vocab = min(self.tokenizer.vocab_size, self.model_config.vocab_size)
            worker_cfg = msgspec.structs.replace(worker_cfg, sampleable_vocab_size=vocab)
        self.worker_config = worker_cfg
        self.worker: WorkerClient | None = None
        self.worker_info: Ready | None = None
        self._scheduler: Scheduler | None = None  # built by start() from the worker's report, again at each restart
        self.max_model_len: int | None = None  # known once the first worker has started
        self._seq_ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.last_step_compute_seconds = 0.0
        self.spec_totals = SpecDecodeStats()  # summed over all steps
        self.step_watch = StepWatch(config.step_deadlines)
        self._owner_thread: int | None = None  # the thread that may change the scheduler's state

    def claim_thread(self) -> None:
        """From now on only this thread may add, abort or step (AsyncEngine's engine thread claims it)."""
        self._owner_thread = threading.get_ident()

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner_thread:
            raise RuntimeError(
                "EngineCore's scheduler is driven by one thread (the one that called start() or claim_thread()); "
                "the server reaches it only through engine/client.py's EngineClient"
            )

    def start(self, carried: list[Sequence] = ()) -> None:
        """Spawn a worker, block until it has loaded the model, then build a fresh block manager and
        scheduler from its report, serve the warm-up request and queue ``carried`` (sequences that never
        reached a worker). On the first start, the grammar engine's view of the vocabulary is built meanwhile,
        in a thread (the first constrained request would otherwise wait for it)."""
        self.claim_thread()
        grammars = None
        if self.worker_info is None:
            grammars = threading.Thread(target=self.grammars.warm_up, name="a8w8-grammar-warmup", daemon=True)
            grammars.start()
        self.step_watch.reset()
        self.worker = WorkerClient(self.worker_config)
        info = self.worker.wait_ready()
        asked = self.config.scheduler.max_model_len
        max_len = info.max_model_len if asked is None else min(info.max_model_len, asked)
        spec = self.worker_config.speculative
        sched_cfg = dataclasses.replace(
            self.config.scheduler,
            max_model_len=max_len,
            num_lookahead_tokens=spec.num_speculative_tokens if spec else 0,
            lookahead_max_running=spec.disable_by_batch_size if spec else None,
        )
        bm = BlockManager(info.num_blocks, info.block_size, sched_cfg.enable_prefix_caching)
        self.worker_info, self.max_model_len, self._scheduler = info, max_len, Scheduler(sched_cfg, bm)
        self._warm_up()
        for seq in carried:
            self._scheduler.add(seq)
        if grammars is not None:
            grammars.join()

    def _warm_up(self) -> None:
        """Serve :data:`WARMUP_PROMPT` (in the chat template, as a chat request sends it) for a few sampled
        tokens through the whole step path; the token counters do not count it."""
        ids = self.tokenizer.encode(WARMUP_PROMPT)
        if self.chat_template is not None:
            try:
                ids = self.tokenizer.encode(self.chat_template.render([{"role": "user", "content": WARMUP_PROMPT}]))
            except ChatTemplateError:
                pass  # (a template that wants more than one user message: the plain prompt will do)
        ids = ids[: max(1, self.max_model_len - WARMUP_MAX_TOKENS - 1)]
        params = SamplingParams(max_tokens=WARMUP_MAX_TOKENS, temperature=1.0, top_p=0.9, seed=0, ignore_eos=True)
        counters = self.prompt_tokens_total, self.generation_tokens_total, msgspec.structs.replace(self.spec_totals)
        seqs = self.make_sequences("warmup", ids, params)
        self.add(seqs)
        while not all(seq.finished for seq in seqs):
            self.step()
        self.prompt_tokens_total, self.generation_tokens_total, self.spec_totals = counters
        bm = self.scheduler.bm  # (this start's block manager: its prefix-cache counters start from here)
        bm.prefix_queries = bm.prefix_hits = 0

    @property
    def scheduler(self) -> Scheduler:
        """The current worker's scheduler. There is none before the first :meth:`start`: its block count and
        max_model_len come from what the worker reports once it has loaded the model."""
        if self._scheduler is None:
            raise RuntimeError("EngineCore.start() has not run yet: no worker, so no scheduler")
        return self._scheduler

    def take_unstarted(self) -> tuple[list[Sequence], list[Sequence]]:
        """After the worker is lost: (sequences that never reached it, which can run on the next one; every
        other unfinished sequence, whose computed state is gone). The scheduler is emptied."""
        self._check_thread()
        if self._scheduler is None:
            return [], []
        sched = self._scheduler
        keep, lost = [], []
        for seq in sched.waiting + sched.running:
            (lost if seq.admitted_once else keep).append(seq)
        for seq in keep:
            sched.waiting.remove(seq)
            del sched.seqs[seq.seq_id]
        for seq in lost:
            sched.finish(seq, FinishReason.ABORT)
        return keep, lost

    def stop_worker(self) -> None:
        """Stop (or reap) the current worker process."""
        if self.worker is not None:
            self.worker.shutdown()

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize a prompt; a text too long for the context by its byte count alone is refused first
        (InvalidRequest). Takes CPU time in proportion to the text: call it off the event loop."""
        if self.max_model_len:
            check_text_length(self.max_model_len, len(text.encode("utf-8", "surrogatepass")), self.text_bytes_per_token)
        return self.tokenizer.encode(text)

    def check_prompt_ids(self, ids: list[int]) -> None:
        """Token-id prompts: length and vocabulary checked before anything decodes them (InvalidRequest)."""
        if not ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        if self.max_model_len:
            check_context_length(self.max_model_len, len(ids), None)
        self._check_vocab(ids)

    def _check_vocab(self, ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is out of range [0, {vocab})", "prompt")

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0) -> None:
        """Everything :meth:`make_sequences` checks of a request (InvalidRequest), without building it: the
        server runs this before it spends time on the request's grammar."""
        params.validate(self.model_config.vocab_size, self.max_model_len)
        if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise InvalidRequest(f"priority must be a 64-bit signed integer, got {priority}", "priority")
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        check_context_length(self.max_model_len, len(prompt_token_ids), params.max_tokens)
        self._check_vocab(prompt_token_ids)

    def make_sequences(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> list[Sequence]:
        """Validate a request and build its ``n`` sequences (raises InvalidRequest)."""
        self.check_request(prompt_token_ids, params, priority)
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        seqs = []
        for i in range(params.n):
            seqs.append(
                Sequence(
                    seq_id=next(self._seq_ids),
                    request_id=request_id,
                    index=i,
                    prompt_token_ids=list(prompt_token_ids),
                    params=params,
                    seed=None if params.seed is None else params.seed + i,
                    max_tokens=max_tokens,
                    priority=priority,
                    eos_token_ids=self.eos_token_ids,
                    text=OutputText(
                        self.tokenizer, params.skip_special_tokens, params.stop, params.include_stop_str_in_output
                    ),
                    grammar=params.structured.grammar.matcher() if params.structured else None,
                )
            )
        try:  # what goes to the worker must cross the pipe; checked here, not when a step carrying it is sent
            msgspec.msgpack.encode(seqs[-1].worker_options)  # the last has the largest seed (seed + i)
        except (OverflowError, TypeError) as e:
            raise InvalidRequest(f"a sampling parameter cannot be represented: {e}", None) from None
        return seqs

    def add(self, seqs: list[Sequence]) -> None:
        self._check_thread()
        for seq in seqs:
            self.scheduler.add(seq)
        self.prompt_tokens_total += len(seqs[0].prompt_token_ids) if seqs else 0

    def abort(self, seqs: list[Sequence]) -> None:
        self._check_thread()
        for seq in seqs:
            if not seq.finished and seq.seq_id in self.scheduler.seqs:
                self.scheduler.finish(seq, FinishReason.ABORT)

    def step(self) -> list[SequenceUpdate]:
        """One schedule -> run -> postprocess cycle."""
        self._check_thread()
        assert self.worker is not None  # (start() made it, with the scheduler)
        step = self.scheduler.schedule()
        req = step.request
        if not req.chunks and not req.finished_seq_ids and not req.new_seqs:
            return []
        failed_grammars = self._attach_grammar_masks(req)
        self.step_watch.begin(step.num_tokens)
        result = self.worker.step(req, self.step_watch.hang_after())
        self.step_watch.end(result.compute_seconds)
        updates = self.scheduler.update(step, result)
        updates += [self.scheduler.fail_constraint(seq) for seq in failed_grammars if not seq.finished]
        updates = self._add_text(updates)
        self.generation_tokens_total += len(result.tokens)
        if result.spec is not None:
            self._add_spec(result.spec)
        self.last_step_compute_seconds = result.compute_seconds
        return updates

    def _add_text(self, updates: list[SequenceUpdate]) -> list[SequenceUpdate]:
        """Postprocess: each token's text, and stop strings over it. A match finishes its sequence there; the
        sequence's later tokens of the same step (verified drafts) are dropped."""
        out = []
        stopped: set[int] = set()
        for u in updates:
            seq = u.seq
            if seq.seq_id in stopped:
                continue
            text = seq.text
            if u.error is None and text is not None:
                if u.text_hidden:  # EOS / stop token: its text is not output, text held back for stop strings is
                    u.new_text = text.finish()
                else:
                    u.new_text, matched = text.add(u.new_token_ids[0], u.num_output_tokens >= seq.params.min_tokens)
                    if matched is not None:
                        self.scheduler.stop_at_string(seq, matched)
                        seq.truncate_output(u.num_output_tokens)
                        u.finished = True
                        stopped.add(seq.seq_id)
                    elif u.finished:
                        u.new_text += text.finish()
            out.append(u)
        return out

    def _attach_grammar_masks(self, req: StepRequest) -> list[Sequence]:
        """Each sampling chunk of a constrained sequence carries its allowed-token bitmask. A grammar that fails
        to give one (a resource limit of the grammar engine) samples nothing this step: its sequences are
        returned, to be ended with that error after the step."""
        seqs = self.scheduler.seqs
        failed = []
        for i, ch in enumerate(req.chunks):
            seq = seqs.get(ch.seq_id)
            if ch.sample and seq is not None and seq.grammar is not None:
                mask = seq.grammar.bitmask()
                if mask is None:
                    failed.append(seq)
                    req.chunks[i] = msgspec.structs.replace(ch, sample=False)
                else:
                    req.chunks[i] = msgspec.structs.replace(ch, allowed_token_bitmask=mask)
        return failed

    def _add_spec(self, step: SpecDecodeStats) -> None:
        t = self.spec_totals
        t.num_drafts += step.num_drafts
        t.num_draft_tokens += step.num_draft_tokens
        t.num_accepted_tokens += step.num_accepted_tokens
        per_pos = list(t.accepted_per_position) + [0] * max(
            0, len(step.accepted_per_position) - len(t.accepted_per_position)
        )
        for i, n in enumerate(step.accepted_per_position):
            per_pos[i] += n
        t.accepted_per_position = per_pos

    def shutdown(self) -> None:
        self.stop_worker()
