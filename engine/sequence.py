"""A sequence being served: its tokens, progress, output text, finish state and timestamps."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

from engine.detokenizer import OutputText
from engine.sampling_params import SamplingParams
from engine.structured_output import GrammarMatcher
from npu.messages import SamplingOptions


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class Timestamps:
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None


@dataclass
class Sequence:
    """One generated sequence (a request with ``n`` > 1 has ``n`` of them)."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n choices
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int | None
    max_tokens: int
    priority: int
    eos_token_ids: tuple[int, ...]
    text: OutputText | None = None  # None: token ids only (the scheduler's tests), no text is produced
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    times: Timestamps = field(default_factory=Timestamps)
    admitted_once: bool = False
    grammar: GrammarMatcher | None = None  # constrained decoding (structured output, forced tool calls)

    def append_output(self, token_id: int) -> None:
        """A sampled token: appended, and the grammar (if any) advanced past it."""
        self.output_token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)

    def truncate_output(self, num_tokens: int) -> None:
        """Forget the output past its first ``num_tokens`` tokens (verified drafts after a stop string of the
        same step). Constrained sequences get no drafts, so no grammar state is rolled back."""
        del self.output_token_ids[num_tokens:]
        del self.logprobs[num_tokens:]
        del self.times.token_times[num_tokens:]

    @property
    def allows_drafts(self) -> bool:
        """Speculative drafts are verified without a grammar mask, so a constrained sequence gets none."""
        return self.grammar is None

    @cached_property
    def worker_options(self) -> SamplingOptions:
        """What the worker needs to sample this sequence (built once; sent at each admission)."""
        return self.params.worker_options(self.eos_token_ids, self.seed)

    @cached_property
    def stop_token_set(self) -> frozenset[int]:
        return frozenset(self.params.stop_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: priority (lower first), then arrival, then id."""
        return (self.priority, self.times.arrival, self.seq_id)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
