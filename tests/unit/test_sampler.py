"""Sampling in the worker: greedy, seeds, top-k/top-p/min-p, penalties, bias, min_tokens, padding, logprobs."""

from __future__ import annotations

import math

import torch

from npu.messages import SamplingOptions
from npu.sampler import Sampler, SequenceSamplingState, options_error

VOCAB, REAL = 50, 40  # rows 40..49 are padding


def _sample(opts: SamplingOptions, logits: torch.Tensor, prompt=(1, 2), outputs=(), n=1, sampler=None) -> list[int]:
    sampler = sampler or Sampler(REAL, seed=0)
    st = SequenceSamplingState(opts, list(prompt))
    for t in outputs:
        st.record(t)
    toks = []
    for _ in range(n):
        toks.append(sampler.sample(logits.clone()[None], [0], [st])[0][0].token_id)
    return toks


def test_greedy_and_padding_never_sampled():
    logits = torch.zeros(VOCAB)
    logits[45] = 100.0  # a padding row with the highest logit
    logits[7] = 1.0
    assert _sample(SamplingOptions(temperature=0), logits) == [7]
    toks = _sample(SamplingOptions(temperature=1.0), logits, n=300)
    assert max(toks) < REAL


def test_seed_reproducible_and_distinct():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0))
    a = _sample(SamplingOptions(temperature=1.0, seed=42), logits, n=20)
    b = _sample(SamplingOptions(temperature=1.0, seed=42), logits, n=20)
    c = _sample(SamplingOptions(temperature=1.0, seed=43), logits, n=20)
    assert a == b and a != c


def test_top_k_top_p_min_p_restrict_support():
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0] + [-10.0] * (VOCAB - 4))
    assert set(_sample(SamplingOptions(temperature=1.0, top_k=2, seed=1), logits, n=200)) == {0, 1}
    # probs ~ [.64, .24, .09, .03]: top_p 0.8 keeps the first two (cumulative before 2nd = .64 < .8)
    assert set(_sample(SamplingOptions(temperature=1.0, top_p=0.8, seed=2), logits, n=200)) == {0, 1}
    # min_p 0.2: keep tokens with p >= 0.2 * p_max = 0.128 -> 0 and 1
    assert set(_sample(SamplingOptions(temperature=1.0, min_p=0.2, seed=3), logits, n=200)) == {0, 1}


def _reference_probs(logits: torch.Tensor, o: SamplingOptions) -> torch.Tensor:
    """The filtered distribution written plainly (full sort): temperature, top-k, top-p, then min-p."""
    order = torch.argsort(logits, descending=True)
    p = torch.softmax(logits[order].double() / o.temperature, dim=-1)
    if o.top_k:
        p[o.top_k :] = 0
        p /= p.sum()
    if o.top_p < 1.0:
        # a token is in the nucleus when its strictly more likely tokens hold less than top_p (ties all in)
        first_of_value = torch.unique_consecutive(p, return_inverse=True)[1]
        starts = torch.zeros(int(first_of_value.max()) + 1, dtype=torch.long)
        starts.scatter_reduce_(0, first_of_value, torch.arange(p.numel()), "amin", include_self=False)
        above = (torch.cumsum(p, 0) - p)[starts[first_of_value]]
        p[above >= o.top_p] = 0
    if o.min_p:
        p[p < o.min_p * p[0]] = 0
    out = torch.zeros_like(p)
    out[order] = p / p.sum()
    return out


def test_draws_follow_the_filtered_distribution():
    """Frequencies of many seeded draws against the exact filtered probabilities, for each filter, and top-p over
    a flat vocabulary whose nucleus lies past the first NUCLEUS_CANDIDATES tokens (the whole row is sorted)."""
    from npu.sampler import NUCLEUS_CANDIDATES

    draws = 3000
    g = torch.Generator().manual_seed(7)
    peaked = torch.randn(REAL, generator=g) * 2
    flat = torch.randn(3 * NUCLEUS_CANDIDATES, generator=g) * 0.01
    cases = [
        (peaked, SamplingOptions(temperature=0.8)),
        (peaked, SamplingOptions(temperature=1.2, top_k=5)),
        (peaked, SamplingOptions(temperature=1.0, top_p=0.7)),
        (peaked, SamplingOptions(temperature=1.0, min_p=0.1)),
        (peaked, SamplingOptions(temperature=0.9, top_k=8, top_p=0.8, min_p=0.05)),
        (flat, SamplingOptions(temperature=1.0, top_p=0.5)),
        (flat, SamplingOptions(temperature=1.0, top_p=0.5, min_p=0.999)),
        # a nucleus of ~2 % of a flat row: most draws are rejected several times, some past
        # NUCLEUS_MAX_REJECTIONS (then what is left is sorted)
        (flat, SamplingOptions(temperature=1.0, top_p=0.02)),
        # equal probabilities at the nucleus's edge: all of them are in it
        (torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]), SamplingOptions(temperature=1.0, top_p=0.8)),
    ]
    for case, (logits, opts) in enumerate(cases):
        vocab = logits.numel()
        sampler = Sampler(vocab, seed=case)
        expected = _reference_probs(logits, opts)
        counts = torch.zeros(vocab, dtype=torch.float64)
        st = SequenceSamplingState(opts, [1])
        for _ in range(draws):
            counts[sampler.sample(logits.clone()[None], [0], [st])[0][0].token_id] += 1
        seen = counts.nonzero().flatten()
        assert bool((expected[seen] > 0).all()), (case, "a filtered-out token was drawn")
        freq = counts / draws
        # each frequency within 5 standard errors of its probability (plus the rounding of one draw)
        tolerance = 5 * torch.sqrt(expected * (1 - expected) / draws) + 1 / draws
        worst = float(((freq - expected).abs() - tolerance).max())
        assert worst <= 0, (case, worst)
        if (
            logits is flat and opts.top_p == 0.5 and not opts.min_p
        ):  # tokens past the NUCLEUS_CANDIDATES most likely ones were drawn, as they should be
            rank = torch.empty(vocab, dtype=torch.long)
            rank[torch.argsort(logits, descending=True)] = torch.arange(vocab)
            assert int((expected > 0).sum()) > NUCLEUS_CANDIDATES and int(rank[seen].max()) >= NUCLEUS_CANDIDATES


def test_penalties_and_logit_bias():
    logits = torch.zeros(VOCAB)
    logits[3], logits[4] = 2.0, 1.9
    assert _sample(SamplingOptions(temperature=0), logits) == [3]
    # presence penalty on an already generated token 3
    assert _sample(SamplingOptions(temperature=0, presence_penalty=0.5), logits, outputs=[3]) == [4]
    # frequency penalty scales with the count
    assert _sample(SamplingOptions(temperature=0, frequency_penalty=0.05), logits, outputs=[3, 3]) == [3]
    assert _sample(SamplingOptions(temperature=0, frequency_penalty=0.05), logits, outputs=[3, 3, 3]) == [4]
    # repetition penalty covers the prompt too: 2.0 / 1.1 < 1.9
    assert _sample(SamplingOptions(temperature=0, repetition_penalty=1.1), logits, prompt=[3]) == [4]
    assert _sample(SamplingOptions(temperature=0, logit_bias={9: 5.0}), logits) == [9]


def test_min_tokens_suppresses_stop_ids():
    logits = torch.zeros(VOCAB)
    logits[2] = 10.0  # "eos"
    opts = SamplingOptions(temperature=0, min_tokens=2, min_tokens_suppress_ids=[2])
    assert _sample(opts, logits, outputs=[5]) != [2]
    assert _sample(opts, logits, outputs=[5, 6]) == [2]


def _mask(*allowed: int) -> bytes:
    """A grammar bitmask (llguidance's layout: token i is bit i % 8 of byte i // 8) allowing ``allowed``."""
    bits = bytearray(-(-VOCAB // 32) * 4)
    for t in allowed:
        bits[t // 8] |= 1 << (t % 8)
    return bytes(bits)


def test_min_tokens_gives_way_to_a_grammar_that_allows_only_eos():
    """A complete grammar allows only end of sequence: sampling it is not a failure, whatever min_tokens says;
    where the grammar allows something else, min_tokens still holds."""
    sampler = Sampler(REAL, seed=0)
    logits = torch.zeros(VOCAB)
    for temperature in (0.0, 1.0):
        opts = SamplingOptions(temperature=temperature, min_tokens=5, min_tokens_suppress_ids=[2])
        for allowed, expected in (((2,), 2), ((2, 9), 9)):
            st = SequenceSamplingState(opts, [1])
            tokens, failed = sampler.sample(logits.clone()[None], [0], [st], masks=[_mask(*allowed)])
            assert not failed and [t.token_id for t in tokens] == [expected], (temperature, allowed)


def test_logprobs_of_chosen_and_top():
    logits = torch.tensor([2.0, 1.0, 0.0] + [-30.0] * (VOCAB - 3))
    st = SequenceSamplingState(SamplingOptions(temperature=0, logprobs=2), [1])
    out = Sampler(REAL).sample(logits[None].clone(), [0], [st])[0][0]
    ref = torch.log_softmax(torch.cat([logits[:REAL], torch.full((VOCAB - REAL,), float("-inf"))]), -1)
    assert out.token_id == 0 and math.isclose(out.logprob, ref[0].item(), rel_tol=1e-5)
    assert [t for t, _ in out.top_logprobs] == [0, 1]
    assert math.isclose(out.top_logprobs[1][1], ref[1].item(), rel_tol=1e-5)


def test_batch_rows_independent():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, VOCAB, generator=g)
    opts = [SamplingOptions(temperature=0), SamplingOptions(temperature=0.7, seed=9), SamplingOptions(temperature=0)]
    states = [SequenceSamplingState(o, [1]) for o in opts]
    batch, failed = Sampler(REAL).sample(logits.clone(), [0, 1, 2], states)
    assert failed == []
    alone = [
        Sampler(REAL).sample(logits[i : i + 1].clone(), [i], [SequenceSamplingState(o, [1])])[0][0]
        for i, o in enumerate(opts)
    ]
    assert [t.token_id for t in batch] == [t.token_id for t in alone]


def test_a_row_that_cannot_be_sampled_fails_alone():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, VOCAB, generator=g)
    logits[1] = float("nan")  # e.g. a numerically broken row: its probabilities do not sum to a number
    opts = [
        SamplingOptions(temperature=0.8, seed=1),
        SamplingOptions(temperature=0.8, seed=2),
        SamplingOptions(temperature=0),
    ]
    states = [SequenceSamplingState(o, [1]) for o in opts]
    tokens, failed = Sampler(REAL).sample(logits.clone(), [10, 11, 12], states)
    assert [f.seq_id for f in failed] == [11] and "sampling failed" in failed[0].message
    alone = [
        Sampler(REAL).sample(logits[i : i + 1].clone(), [i], [SequenceSamplingState(opts[i], [1])])[0][0].token_id
        for i in (0, 2)
    ]
    assert [t.seq_id for t in tokens] == [10, 12] and [t.token_id for t in tokens] == alone
    assert states[1].output_token_ids == []  # nothing recorded for the failed row


def test_options_error_names_what_the_worker_cannot_sample():
    assert options_error(SamplingOptions(), VOCAB) is None
    assert "outside the vocabulary" in options_error(SamplingOptions(logit_bias={VOCAB: 1.0}), VOCAB)
    assert "outside the vocabulary" in options_error(SamplingOptions(min_tokens_suppress_ids=[-1]), VOCAB)
    assert "temperature" in options_error(SamplingOptions(temperature=float("nan")), VOCAB)
    assert "top_p" in options_error(SamplingOptions(top_p=0.0), VOCAB)
    assert "top_k" in options_error(SamplingOptions(top_k=-3), VOCAB)
    assert "logit_bias" in options_error(SamplingOptions(logit_bias={3: float("inf")}), VOCAB)
