"""The synchronous engine: requests in, schedule -> run (worker) -> postprocess, updates out."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from engine.block_manager import BlockManager
from engine.chat_template import ChatTemplate
from engine.detokenizer import IncrementalDetokenizer
from engine.request import FinishReason, Sequence
from engine.sampling_params import InvalidRequest, SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SequenceUpdate
from engine.stop import StopStringMatcher
from engine.tokenizer import Tokenizer, TokenizerImpl, load_tokenizer
from loaders.config import GenerationDefaults, load_generation_defaults, load_model_config
from npu.client import WorkerClient
from npu.messages import WorkerConfig


@dataclass(frozen=True)
class EngineConfig:
    worker: WorkerConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tokenizer_impl: str = TokenizerImpl.AUTO.value
    # Waiting requests beyond this are refused (HTTP 429) instead of queued without limit.
    max_queued_requests: int = 1024


def context_length_error(max_model_len: int, prompt_len: int, max_tokens: int | None) -> str | None:
    """vLLM's wording (clients match it), or None when the request fits."""
    if prompt_len >= max_model_len:
        return (
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_len} input tokens. Please reduce the length of the input messages."
        )
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        return (
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion."
        )
    return None


class EngineCore:
    """Owns the worker client, the block manager and the scheduler. Driven by one thread."""

    def __init__(self, config: EngineConfig):
        self.config = config
        model_dir = Path(config.worker.model_dir)
        self.model_config = load_model_config(model_dir)
        self.tokenizer: Tokenizer = load_tokenizer(model_dir, config.tokenizer_impl)
        self.chat_template = ChatTemplate.from_model_dir(model_dir)
        self.generation_defaults: GenerationDefaults = load_generation_defaults(model_dir)
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys(self.generation_defaults.eos_token_ids + self.model_config.eos_token_ids)
        )
        worker_cfg = config.worker
        if worker_cfg.sampleable_vocab_size is None:
            # Ids past the tokenizer's vocabulary are padding rows of the embedding: never sampled.
            vocab = min(self.tokenizer.vocab_size, self.model_config.vocab_size)
            worker_cfg = msgspec.structs.replace(worker_cfg, sampleable_vocab_size=vocab)
        self.worker = WorkerClient(worker_cfg)
        self.ready = None
        self.scheduler: Scheduler | None = None
        self._seq_ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.last_step_compute_seconds = 0.0

    def wait_ready(self) -> None:
        """Block until the worker has loaded the model, then size the block manager from its report."""
        self.ready = self.worker.wait_ready()
        max_len = min(self.ready.max_model_len, self.config.scheduler.max_model_len or self.ready.max_model_len)
        sched_cfg = dataclasses.replace(self.config.scheduler, max_model_len=max_len)
        bm = BlockManager(self.ready.num_blocks, self.ready.block_size, sched_cfg.enable_prefix_caching)
        self.scheduler = Scheduler(sched_cfg, bm)

    @property
    def max_model_len(self) -> int:
        assert self.scheduler is not None
        return self.scheduler.config.max_model_len

    def make_sequences(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       priority: int = 0) -> list[Sequence]:
        """Validate a request and build its ``n`` sequences (raises InvalidRequest)."""
        params.validate()
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is out of range [0, {self.model_config.vocab_size})", "prompt")
        err = context_length_error(self.max_model_len, len(prompt_token_ids), params.max_tokens)
        if err:
            raise InvalidRequest(err, "messages")
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
                    detokenizer=IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
                    stop_matcher=StopStringMatcher(params.stop, params.include_stop_str_in_output),
                    eos_token_ids=self.eos_token_ids,
                )
            )
        return seqs

    def add(self, seqs: list[Sequence]) -> None:
        assert self.scheduler is not None
        for seq in seqs:
            self.scheduler.add(seq)
        self.prompt_tokens_total += len(seqs[0].prompt_token_ids) if seqs else 0

    def abort(self, seqs: list[Sequence]) -> None:
        assert self.scheduler is not None
        for seq in seqs:
            if not seq.finished:
                self.scheduler.finish(seq, FinishReason.ABORT)

    def step(self) -> list[SequenceUpdate]:
        """One schedule -> run -> postprocess cycle."""
        assert self.scheduler is not None
        step = self.scheduler.schedule()
        req = step.request
        if not req.chunks and not req.finished_seq_ids and not req.new_seqs:
            return []
        result = self.worker.step(req)
        updates = self.scheduler.update(step, result.tokens)
        self.generation_tokens_total += len(result.tokens)
        self.last_step_compute_seconds = result.compute_seconds
        return updates

    def shutdown(self) -> None:
        self.worker.shutdown()

