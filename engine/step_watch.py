"""How long the worker may take over one step before it counts as stalled, then as hung.

A worker that stops answering (SIGSTOP, a stuck kernel, a swapping machine) used to leave ``/health`` at 200
while every request waited. Each step now has two deadlines, generous and learned from the steps before it: a
step is expected to take the slowest small (decode-sized) step seen lately, or its tokens times the slowest time
per token seen lately in prompt-sized steps, whichever is more (so a 2048-token prefill is not held to a decode step's time); until a
prompt-sized step has been seen, a token is taken to cost an eighth of the slowest step. Floors apply. Past the first, ``/health`` answers 503
``stalled``; past the second the worker is killed and restarted as after a crash (requests in flight get the
same error events). Both can be set instead (``--step-stall-timeout``, ``--step-timeout``).
"""

from __future__ import annotations

import time

from engine.config import StepDeadlines

# Auto deadlines: stalled after STALL_FACTOR x the expected step time (at least STALL_FLOOR_SECONDS), hung after
# HANG_FACTOR x that (at least HANG_FLOOR_SECONDS). What was measured decays by DECAY a step, so that one slow step
# on a busy machine does not loosen the deadlines for good.
STALL_FACTOR = 20.0
STALL_FLOOR_SECONDS = 10.0
HANG_FACTOR = 5.0
HANG_FLOOR_SECONDS = 60.0
STEP_OVERHEAD_SECONDS = 0.05
DECAY = 0.99
# Steps of at least this many tokens measure the time per token (smaller ones are mostly the weights' streaming).
PROMPT_SIZED_STEP_TOKENS = 32
# Before a prompt-sized step is measured, a token is taken to cost this fraction of the slowest step.
PRIOR_TOKEN_SHARE_OF_STEP = 1 / 8


class StepWatch:
    """The step the worker is computing: when it began and how long it may take."""

    def __init__(self, deadlines: StepDeadlines | None = None):
        self.deadlines = deadlines or StepDeadlines()
        self.began: float | None = None
        self.tokens = 0
        self.step_seconds = 0.0  # the slowest smaller-than-prompt step lately (decaying)
        self.seconds_per_token: float | None = None  # the slowest lately, over prompt-sized steps (decaying)

    def begin(self, tokens: int) -> None:
        self.began, self.tokens = time.monotonic(), max(tokens, 1)

    def end(self, compute_seconds: float) -> None:
        """The step's result came, ``compute_seconds`` as the worker measured it."""
        if self.began is not None:
            if self.tokens >= PROMPT_SIZED_STEP_TOKENS:
                self.seconds_per_token = max(compute_seconds / self.tokens, (self.seconds_per_token or 0.0) * DECAY)
            else:
                self.step_seconds = max(compute_seconds, self.step_seconds * DECAY)
        self.began = None

    def expected(self) -> float:
        """How long the step in flight is expected to take."""
        per_token = self.seconds_per_token
        if per_token is None:
            per_token = self.step_seconds * PRIOR_TOKEN_SHARE_OF_STEP
        return STEP_OVERHEAD_SECONDS + max(self.step_seconds, self.tokens * per_token)

    def reset(self) -> None:
        """A new worker: no step in flight (what was learned of the machine is kept)."""
        self.began = None

    def stall_after(self) -> float:
        if self.deadlines.stall_seconds is not None:
            return self.deadlines.stall_seconds
        return max(STALL_FLOOR_SECONDS, STALL_FACTOR * self.expected())

    def hang_after(self) -> float:
        if self.deadlines.hang_seconds is not None:
            return self.deadlines.hang_seconds
        return max(HANG_FLOOR_SECONDS, HANG_FACTOR * self.stall_after())

    def stalled(self) -> str | None:
        """Why the worker counts as stalled now, or None."""
        if self.began is None:
            return None
        waited = time.monotonic() - self.began
        if waited <= self.stall_after():
            return None
        return (
            f"the worker has been computing one step of {self.tokens} tokens for {waited:.0f} s, past its "
            f"deadline of {self.stall_after():.0f} s; it is restarted after {self.hang_after():.0f} s"
        )
