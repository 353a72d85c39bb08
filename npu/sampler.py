"""Per-sequence sampling inside the worker, for one batch of logits."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from npu.messages import SampledToken, SamplingOptions, SequenceFailure

# Temperatures below this are treated as greedy (argmax), as vLLM does.
GREEDY_TEMPERATURE = 1e-5
# Mixes a request's seed with the output index so each token's draw depends only on (seed, index):
# reproducible across batching and preemption. A large odd constant spreads nearby seeds apart.
SEED_STRIDE = 0x9E3779B97F4A7C15
SEED_MASK = (1 << 63) - 1
# The nucleus (top-p) is the set of tokens whose more likely tokens hold less than top_p of the mass (tokens of
# equal probability at its edge are all in it). Drawn without sorting: draw from the row, keep the draw if it is
# in the nucleus, else drop it and every token not more likely than it and draw again (rejection sampling,
# FlashInfer's method: the draws that are kept follow the nucleus's distribution exactly). After this many
# rejections the few tokens left are sorted instead, which bounds the cost.
NUCLEUS_MAX_REJECTIONS = 8
# Where a distribution must be listed (a drafted token's probability, speculative decoding), top-p without
# top-k sorts this many of the most likely tokens first; their mass nearly always reaches top_p, else the
# whole row is sorted (same result, only slower).
NUCLEUS_CANDIDATES = 1024
# Block size of the two-level inverse CDF that draws a token (see Sampler._categorical).
CATEGORICAL_BLOCK = 1024


def options_error(o: SamplingOptions, vocab_size: int) -> str | None:
    """Why the worker cannot sample with ``o`` over ``vocab_size`` logits, or None. The engine validates
    requests before they get here; this is the worker's own check, so that a value that slipped past
    fails its sequence alone instead of a whole batch's step."""
    if not (math.isfinite(o.temperature) and o.temperature >= 0.0):
        return f"temperature {o.temperature} is not a finite non-negative number"
    if not 0.0 < o.top_p <= 1.0:
        return f"top_p {o.top_p} is outside (0, 1]"
    if o.top_k < 0:
        return f"top_k {o.top_k} is negative"
    if not 0.0 <= o.min_p <= 1.0:
        return f"min_p {o.min_p} is outside [0, 1]"
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        if not math.isfinite(getattr(o, name)):
            return f"{name} is not finite"
    if o.repetition_penalty <= 0.0:
        return f"repetition_penalty {o.repetition_penalty} is not positive"
    bad = [t for t in list(o.logit_bias) + o.min_tokens_suppress_ids if not 0 <= t < vocab_size]
    if bad:
        return f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
    if not all(math.isfinite(v) for v in o.logit_bias.values()):
        return "a logit_bias value is not finite"
    if o.logprobs is not None and not 0 <= o.logprobs <= vocab_size:
        return f"logprobs {o.logprobs} is outside [0, {vocab_size}]"
    return None


@dataclass
class SequenceSamplingState:
    """What the sampler remembers about one sequence."""

    options: SamplingOptions
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    output_counts: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Built once: a request may bias many tokens, and this runs every step.
        self.bias_ids = torch.tensor(list(self.options.logit_bias), dtype=torch.long)
        self.bias_values = torch.tensor(list(self.options.logit_bias.values()), dtype=torch.float32)
        self.suppress_ids = torch.tensor(self.options.min_tokens_suppress_ids, dtype=torch.long)

    def record(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1


def _nucleus_edge(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest probability in the top-p nucleus of ``sorted_probs`` (most likely first): the last token
    whose more likely tokens hold less than ``top_p``. Every token at least this likely is in the nucleus
    (equal probabilities at the edge included), none less likely."""
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    last = int((before < top_p).sum()) - 1  # (a prefix; the first token always: nothing is before it)
    return sorted_probs[max(last, 0)]


def _is_plain_greedy(o: SamplingOptions, st: SequenceSamplingState) -> bool:
    """Greedy with nothing that changes the logits first (see ``_apply_penalties``): one batched argmax
    serves it. Logprobs do not matter: they are of the raw distribution either way."""
    return (
        o.temperature < GREEDY_TEMPERATURE
        and o.repetition_penalty == 1.0
        and not o.presence_penalty
        and not o.frequency_penalty
        and not o.logit_bias
        and not (len(st.output_token_ids) < o.min_tokens and o.min_tokens_suppress_ids)
    )


def allowed_tokens(bitmasks: list[bytes], vocab_size: int) -> torch.Tensor:
    """[len(bitmasks), vocab_size] bools: the token ids each bitmask allows. A bitmask packs token ``i`` into
    bit ``i % 32`` of little-endian int32 word ``i // 32``, which is bit ``i % 8`` of byte ``i // 8``: numpy's
    little-endian ``unpackbits`` reads it in token order. Ids past a mask's end are not allowed (so a mask of
    any length means one thing, and never fails the other rows of a step)."""
    allowed = np.zeros((len(bitmasks), vocab_size), dtype=np.bool_)
    for row, mask in enumerate(bitmasks):
        bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")[:vocab_size]
        allowed[row, : bits.size] = bits
    return torch.from_numpy(allowed)


def apply_grammar_masks(logits: torch.Tensor, rows: list[int], masks: list[bytes | None]) -> None:
    """Forbidden tokens' logits become -inf in the rows that have a mask (all unpacked at once); other rows
    are not touched."""
    picked = [(row, mask) for row, mask in zip(rows, masks) if mask is not None]
    if not picked:
        return
    forbidden = ~allowed_tokens([mask for _, mask in picked], logits.shape[-1])
    if len(picked) == logits.shape[0]:
        logits.masked_fill_(forbidden, float("-inf"))
        return
    index = torch.tensor([row for row, _ in picked], dtype=torch.long)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(forbidden, float("-inf")))


class Sampler:
    def __init__(
        self,
        sampleable_vocab_size: int,
        seed: int = 0,
        argmax_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """``argmax_rows`` (the backend's) returns each row's first maximum; default ``torch.argmax``."""
        self.sampleable_vocab_size = sampleable_vocab_size
        self._unseeded = torch.Generator().manual_seed(seed)
        self._argmax_rows = argmax_rows or (lambda logits: logits.argmax(-1))

    def _apply_penalties(self, row: torch.Tensor, st: SequenceSamplingState) -> None:
        o = st.options
        if o.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(st.prompt_token_ids) | set(st.output_counts)), dtype=torch.long)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / o.repetition_penalty, vals * o.repetition_penalty)
        if (o.presence_penalty or o.frequency_penalty) and st.output_counts:
            ids = torch.tensor(list(st.output_counts), dtype=torch.long)
            counts = torch.tensor(list(st.output_counts.values()), dtype=row.dtype)
            row[ids] -= o.frequency_penalty * counts + o.presence_penalty
        if o.logit_bias:
            row.index_add_(0, st.bias_ids, st.bias_values.to(row.dtype))
        if len(st.output_token_ids) < o.min_tokens and o.min_tokens_suppress_ids:
            before = row[st.suppress_ids]
            row[st.suppress_ids] = float("-inf")
            if not bool(torch.isfinite(row).any()):
                # Nothing else is allowed: a grammar that is complete allows only end of sequence. The grammar
                # wins (the output is whole and valid; it could not reach min_tokens anyway).
                row[st.suppress_ids] = before

    def _generator(self, st: SequenceSamplingState) -> torch.Generator:
        if st.options.seed is None:
            return self._unseeded
        mixed = (st.options.seed * SEED_STRIDE + len(st.output_token_ids)) & SEED_MASK
        return torch.Generator().manual_seed(mixed)

    @staticmethod
    def _distribution(row: torch.Tensor, o: SamplingOptions) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The sampling distribution of a (penalized) logit row after temperature, top-k, top-p and min-p:
        (token ids, their probabilities, unnormalized: filtered ones are 0). ``ids`` None means the whole
        vocabulary in id order. Only what a filter needs is sorted: top-k takes its k best; top-p sorts the
        ``NUCLEUS_CANDIDATES`` best and the whole row only when their mass falls short of ``top_p``; temperature
        and min-p alone sort nothing (a whole-row sort of a 152k vocabulary costs more than a decode step on CPU:
        ``python benchmarks/sampler_bench.py`` measures this path beside the sorting one)."""
        ids: torch.Tensor | None = None
        values = row
        if 0 < o.top_k < row.numel():
            values, ids = torch.topk(row, o.top_k)  # sorted, most likely first
        probs = torch.softmax(values / o.temperature, dim=-1)
        if o.top_p < 1.0:
            if ids is None:
                # the nucleus is almost always among the best few hundred tokens: sort those, and the whole row
                # only when their mass falls short (the result is the same either way)
                best, at = torch.topk(probs, min(NUCLEUS_CANDIDATES, probs.numel()))
                if float(best.sum()) < o.top_p:
                    best, at = torch.sort(probs, descending=True)
                probs, ids = best, at
            probs = probs.masked_fill(probs < _nucleus_edge(probs, o.top_p), 0.0)
        if o.min_p > 0.0:
            probs = probs.masked_fill(probs < o.min_p * probs.max(), 0.0)  # (keeps the max)
        return ids, probs

    def _draw_nucleus(self, row: torch.Tensor, o: SamplingOptions, generator: torch.Generator) -> int:
        """A token of the top-p nucleus of ``row`` (after temperature, and min-p), drawn by rejection: no sort
        of the row (see :data:`NUCLEUS_MAX_REJECTIONS`)."""
        probs = torch.softmax(row / o.temperature, dim=-1)
        candidates = probs
        if o.min_p > 0.0:  # (a token min-p keeps has only min-p-kept tokens above it: the masses below agree)
            candidates = probs.masked_fill(probs < o.min_p * probs.max(), 0.0)
        for _ in range(NUCLEUS_MAX_REJECTIONS):
            token = self._categorical(candidates, generator)
            p_token = float(probs[token])
            # (F.threshold keeps what is above p_token, in one pass)
            if float(F.threshold(probs, p_token, 0.0).sum()) < o.top_p:
                return token
            # not in the nucleus, and nor is any token not more likely: draw among the more likely ones
            candidates = F.threshold(candidates, p_token, 0.0)
        ids = torch.nonzero(candidates).flatten()
        values, order = torch.sort(candidates[ids], descending=True)
        kept = values.masked_fill(values < _nucleus_edge(values, o.top_p), 0.0)
        return int(ids[order[self._categorical(kept, generator)]])

    @staticmethod
    def _categorical(probs: torch.Tensor, generator: torch.Generator) -> int:
        """An index drawn with probability ``probs[i] / probs.sum()``: one uniform number against the running
        sum (inverse CDF, in float64), in two levels: the sums of blocks of :data:`CATEGORICAL_BLOCK`, then the
        running sum inside the block the number falls in. One pass over the row, where a float64 running sum
        of all of it costs twice as much and torch.multinomial several passes."""
        n = probs.numel()
        cut = n - n % CATEGORICAL_BLOCK
        sums = probs[:cut].view(-1, CATEGORICAL_BLOCK).sum(dim=1, dtype=torch.float64)
        if cut < n:
            sums = torch.cat([sums, probs[cut:].sum(dtype=torch.float64).view(1)])
        cdf = torch.cumsum(sums, dim=0)
        total = float(cdf[-1])
        if not (math.isfinite(total) and total > 0.0):  # NaN/inf logits, or nothing left to sample
            raise ValueError(f"the probabilities sum to {total}: nothing can be sampled")
        u = torch.rand(1, generator=generator, dtype=torch.float64) * total
        block = min(int(torch.searchsorted(cdf, u, right=True)), cdf.numel() - 1)
        while float(sums[block]) <= 0.0:  # u rounded up to the total: back to the last block with any mass
            block -= 1
        start = block * CATEGORICAL_BLOCK
        inside = probs[start : start + CATEGORICAL_BLOCK]
        rest = u - (cdf[block - 1] if block else 0.0)
        index = int(torch.searchsorted(torch.cumsum(inside, dim=0, dtype=torch.float64), rest, right=True))
        if index >= inside.numel():  # (the same rounding inside the block)
            index = int(torch.nonzero(inside).max())
        return start + index

    def _draw(self, row: torch.Tensor, st: SequenceSamplingState) -> int:
        o = st.options
        if o.temperature < GREEDY_TEMPERATURE:
            return int(torch.argmax(row))
        if o.top_p < 1.0 and not 0 < o.top_k < row.numel():
            return self._draw_nucleus(row, o, self._generator(st))
        ids, probs = self._distribution(row, o)
        choice = self._categorical(probs, self._generator(st))
        return choice if ids is None else int(ids[choice])

    def _verify(self, row: torch.Tensor, st: SequenceSamplingState, draft: int | None) -> tuple[int, bool]:
        """The token at one drafted position and whether it is the draft. Greedy: the draft is kept when it is
        the target's choice. Sampled: rejection sampling against a draft distribution that is all on ``draft``:
        kept with probability p(draft), else a token drawn from p with the draft removed; so the token is
        distributed as p either way. ``draft`` None (after the last draft): a plain draw."""
        o = st.options
        if draft is None:
            return self._draw(row, st), False
        if o.temperature < GREEDY_TEMPERATURE:
            target = int(torch.argmax(row))
            return target, target == draft
        ids, probs = self._distribution(row, o)
        probs = probs / probs.sum()
        if ids is None:
            at = draft if 0 <= draft < probs.numel() else None
        else:
            hit = (ids == draft).nonzero()
            at = int(hit[0, 0]) if hit.numel() else None
        p_draft = float(probs[at]) if at is not None else 0.0
        generator = self._generator(st)
        if float(torch.rand(1, generator=generator)) < p_draft:
            return draft, True
        if at is not None:
            probs[at] = 0.0
        choice = self._categorical(probs, generator)
        return choice if ids is None else int(ids[choice]), False

    @torch.inference_mode()
    def sample(
        self,
        logits: torch.Tensor,
        seq_ids: list[int],
        states: list[SequenceSamplingState],
        drafts: list[list[int]] | None = None,
        masks: list[bytes | None] | None = None,
    ) -> tuple[list[SampledToken], list[SequenceFailure]]:
        """Sample one token per sequence and record it in each state. A sequence with a draft (speculative
        decoding) has ``len(draft) + 1`` consecutive rows of ``logits`` (the positions of its last known token
        and of each drafted one) and gets the accepted drafts and one more token, in order. A sequence with a
        mask (constrained decoding; never drafted) samples among the tokens it allows. Logprobs are those of
        the model's distribution, before penalties and masks (vLLM's default). A sequence that cannot be
        sampled (e.g. non-finite probabilities) fails alone."""
        if drafts is not None and any(drafts):
            return self._sample_drafted(logits, seq_ids, states, drafts, masks)
        logits, logprobs = self._prepare(logits, states, masks, list(range(len(states))))
        plain = [i for i, st in enumerate(states) if _is_plain_greedy(st.options, st)]
        greedy: dict[int, int] = {}
        if plain:
            rows = logits if len(plain) == len(states) else logits[plain].contiguous()
            greedy = dict(zip(plain, self._argmax_rows(rows).tolist()))
        out: list[SampledToken] = []
        failed: list[SequenceFailure] = []
        for i, (seq_id, st) in enumerate(zip(seq_ids, states)):
            try:
                out.append(self._sample_row(logits, logprobs, i, seq_id, st, greedy.get(i)))
            except (RuntimeError, ValueError, IndexError) as e:
                failed.append(SequenceFailure(seq_id, f"sampling failed: {type(e).__name__}: {e}"))
        return out, failed

    def _prepare(
        self,
        logits: torch.Tensor,
        states: list[SequenceSamplingState],
        masks: list[bytes | None] | None,
        mask_rows: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What both sampling paths start with: the logits in float32 with the padding rows of the vocabulary
        never sampled, the model's logprobs (before masks and penalties) if any sequence wants them, and each
        constrained sequence's grammar mask applied to its row ``mask_rows[i]``."""
        logits = logits.float()
        logits[:, self.sampleable_vocab_size :] = float("-inf")  # padding rows are never sampled
        want_logprobs = any(st.options.logprobs is not None for st in states)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        if masks is not None and any(m is not None for m in masks):
            apply_grammar_masks(logits, mask_rows, masks)
        return logits, logprobs

    def _sample_drafted(
        self,
        logits: torch.Tensor,
        seq_ids: list[int],
        states: list[SequenceSamplingState],
        drafts: list[list[int]],
        masks: list[bytes | None] | None,
    ) -> tuple[list[SampledToken], list[SequenceFailure]]:
        # (a constrained sequence has no draft: its one row is its first)
        first_rows = [sum(len(d) + 1 for d in drafts[:i]) for i in range(len(drafts))]
        logits, logprobs = self._prepare(logits, states, masks, first_rows)
        out: list[SampledToken] = []
        failed: list[SequenceFailure] = []
        r = 0
        for seq_id, st, draft in zip(seq_ids, states, drafts):
            rows = range(r, r + len(draft) + 1)
            r += len(draft) + 1
            try:
                for i, j in enumerate(rows):
                    row = logits[j].clone()
                    self._apply_penalties(row, st)  # (penalties see the drafts accepted so far)
                    token, kept = self._verify(row, st, draft[i] if i < len(draft) else None)
                    out.append(self._token(logprobs, j, seq_id, st, token))
                    if not kept:
                        break
            except (RuntimeError, ValueError, IndexError) as e:
                out = [t for t in out if t.seq_id != seq_id]
                failed.append(SequenceFailure(seq_id, f"sampling failed: {type(e).__name__}: {e}"))
        return out, failed

    def _token(
        self, logprobs: torch.Tensor | None, row: int, seq_id: int, st: SequenceSamplingState, token: int
    ) -> SampledToken:
        """Record ``token`` in the sequence's state, with its logprobs from ``row`` if asked for."""
        lp, top = None, None
        if logprobs is not None and st.options.logprobs is not None:
            lp = float(logprobs[row, token])
            if st.options.logprobs > 0:
                v, idx = torch.topk(logprobs[row], st.options.logprobs)
                top = [(int(a), float(b)) for a, b in zip(idx, v)]
        st.record(token)
        return SampledToken(seq_id=seq_id, token_id=token, logprob=lp, top_logprobs=top)

    def _sample_row(
        self,
        logits: torch.Tensor,
        logprobs: torch.Tensor | None,
        i: int,
        seq_id: int,
        st: SequenceSamplingState,
        greedy_token: int | None,
    ) -> SampledToken:
        if greedy_token is not None:
            token = greedy_token
        else:
            row = logits[i].clone()
            self._apply_penalties(row, st)
            token = self._draw(row, st)
        return self._token(logprobs, i, seq_id, st, token)
