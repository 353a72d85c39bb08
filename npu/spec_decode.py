"""Speculative decoding by prompt lookup (vLLM's ``ngram`` method, llama.cpp's lookup decoding).

A sequence's next tokens are guessed from its own history: when its last n tokens (n from
``prompt_lookup_max`` down to ``prompt_lookup_min``) occurred before, the tokens that followed that occurrence
are the draft. The worker computes the last known token and the k drafted ones in one forward (a decode step
reads every weight once, for 1 or k + 1 positions alike) and keeps the drafts the target model agrees with
(:meth:`npu.sampler.Sampler.sample_with_drafts`), plus one token of its own: greedy output is exactly that of
plain decoding, sampled output keeps the target distribution.

Drafting stops for a while where it keeps failing (free text rarely repeats itself): after a draft of which
nothing was accepted, the sequence waits 1, 2, 4 ... up to ``MAX_BACKOFF_STEPS`` steps before it drafts again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from npu.config import SpeculativeConfig

# Longest pause (in steps) of a sequence whose drafts keep being rejected.
MAX_BACKOFF_STEPS = 32


@dataclass
class NgramProposer:
    """One sequence's n-gram index: for each n, every n-gram of the history (but the current suffix) mapped to
    where its most recent occurrence ends. Extended incrementally as tokens are appended."""

    config: SpeculativeConfig
    _index: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)
    _indexed: int = 0  # n-grams ending before this position are in the index
    _backoff: int = 0  # steps to wait before drafting again
    _wait: int = 0

    def _extend(self, tokens: list[int]) -> None:
        lo, hi = self.config.prompt_lookup_min, self.config.prompt_lookup_max
        # n-grams ending at positions _indexed .. len - 2: every one but the current suffix
        for end in range(self._indexed, len(tokens) - 1):
            for n in range(lo, hi + 1):
                if end - n + 1 >= 0:
                    self._index.setdefault(n, {})[tuple(tokens[end - n + 1 : end + 1])] = end
        self._indexed = max(self._indexed, len(tokens) - 1)

    def propose(self, tokens: list[int], max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` drafted tokens to follow ``tokens`` (empty when nothing matches or while backing off)."""
        if max_tokens <= 0:
            return []
        if self._wait > 0:
            self._wait -= 1
            return []
        self._extend(tokens)
        k = min(max_tokens, self.config.num_speculative_tokens)
        for n in range(min(self.config.prompt_lookup_max, len(tokens) - 1), self.config.prompt_lookup_min - 1, -1):
            end = self._index.get(n, {}).get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end + 1 : end + 1 + k]
        return []

    def record(self, proposed: int, accepted: int) -> None:
        """After a verification: back off where a draft failed entirely, reset where it helped."""
        if proposed == 0:
            return
        if accepted == 0:
            self._backoff = min(max(1, 2 * self._backoff), MAX_BACKOFF_STEPS)
            self._wait = self._backoff
        else:
            self._backoff = 0
