"""Speculative decoding by prompt lookup: the drafter, the verification's distribution, and greedy output
identical to plain decoding through the real engine and worker."""

from __future__ import annotations

import pytest
import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from npu.config import SpeculativeConfig
from npu.messages import SamplingOptions
from npu.sampler import Sampler, SequenceSamplingState
from npu.spec_decode import MAX_BACKOFF_STEPS, NgramProposer

NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_max=3)


def test_proposer_continues_the_most_recent_longest_match():
    p = NgramProposer(NGRAM)
    #          0  1  2  3  4  5  6  7  8  9 10 11 12
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # suffix (2, 3) last occurred ending at 7 -> continue with 7, 8, 5, 2; the 3-gram (5, 2, 3) never occurred
    assert p.propose(tokens, 4) == [7, 8, 5, 2]
    assert p.propose(tokens, 2) == [7, 8]
    assert p.propose(tokens + [4], 4) == []  # (3, 4), (4,) never seen
    assert p.propose(tokens + [1, 2, 3], 4) == [7, 8, 5, 2]  # (1, 2, 3) ends at 7 too
    assert p.propose([5], 4) == [] and p.propose([], 4) == []


def test_proposer_backs_off_where_drafts_fail():
    p = NgramProposer(NGRAM)
    tokens = [1, 2, 1, 2, 1, 2]
    assert p.propose(tokens, 4)
    waits = []
    for _ in range(7):
        p.record(proposed=4, accepted=0)  # the last draft failed entirely
        skipped = 0
        while not p.propose(tokens, 4):
            skipped += 1
        waits.append(skipped)
    assert waits == [1, 2, 4, 8, 16, 32, MAX_BACKOFF_STEPS]
    p.record(proposed=4, accepted=2)  # a draft that helped resets the back-off
    p.record(proposed=4, accepted=0)
    assert not p.propose(tokens, 4) and p.propose(tokens, 4)  # waits one step again


VOCAB = 8


def _emitted_first(logits: torch.Tensor, options: SamplingOptions, draft: list[int], trials: int) -> torch.Tensor:
    """How often each token is the first one emitted after verifying ``draft`` against ``logits`` (every row
    the same distribution)."""
    sampler = Sampler(VOCAB, seed=123)
    counts = torch.zeros(VOCAB)
    rows = logits.expand(len(draft) + 1, VOCAB)
    for _ in range(trials):
        tokens, failed = sampler.sample(rows.clone(), [0], [SequenceSamplingState(options, [1])], [draft])
        assert not failed and 1 <= len(tokens) <= len(draft) + 1
        counts[tokens[0].token_id] += 1
    return counts / trials


@pytest.mark.parametrize("draft_token", [0, 3, 7])
def test_rejection_sampling_keeps_the_target_distribution(draft_token):
    """Whatever the draft, the emitted token is distributed as the target model's sampling distribution
    (temperature and top-p applied): a chi-square test at p < 0.001 over 6000 draws."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    options = SamplingOptions(temperature=0.8, top_p=0.95)
    ids, probs = Sampler._distribution(logits.clone(), options)
    target = torch.zeros(VOCAB)
    target[ids] = probs / probs.sum()
    trials = 6000
    freq = _emitted_first(logits, options, [draft_token, 2], trials)
    support = target > 0
    chi2 = float((trials * (freq[support] - target[support]) ** 2 / target[support]).sum())
    dof = int(support.sum()) - 1
    critical = {4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}[dof]  # chi-square 0.999 quantiles
    assert chi2 < critical, (freq, target)
    assert freq[~support].sum() == 0  # filtered-out tokens never appear, drafted or not


def test_greedy_verification_keeps_only_the_targets_choices():
    logits = torch.full((3, VOCAB), -5.0)
    logits[0, 4] = logits[1, 2] = logits[2, 6] = 5.0  # the target picks 4, then 2, then 6
    sampler = Sampler(VOCAB)
    greedy = SamplingOptions(temperature=0)
    for draft, expected in (([4, 2], [4, 2, 6]), ([4, 3], [4, 2]), ([1, 2], [4])):
        tokens, _ = sampler.sample(logits.clone(), [0], [SequenceSamplingState(greedy, [1])], [draft])
        assert [t.token_id for t in tokens] == expected


def _generate(model_dir, prompts, params, speculative):
    with LLM(str(model_dir), kv_cache_memory_bytes=16 << 20, max_model_len=512, speculative=speculative) as llm:
        results = llm.generate(prompts, params)
        return [[o.token_ids for o in r.outputs] for r in results], llm.core.spec_totals


def test_greedy_output_identical_with_and_without_speculation(serve_model):
    """Repetitive prompts (lookup drafts hit) and a plain one, batched together, with max_tokens ending inside a
    verified draft: the same tokens as without speculation, and drafts were accepted."""
    prompts = [[11, 12, 13, 14, 15] * 12, [200, 300, 400] * 20 + [200, 300], list(range(1000, 1040))]
    params = SamplingParams(max_tokens=61, temperature=0, ignore_eos=True)
    plain, _ = _generate(serve_model, prompts, params, None)
    spec_cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=5, prompt_lookup_max=4, prompt_lookup_min=2)
    spec, totals = _generate(serve_model, prompts, params, spec_cfg)
    assert spec == plain
    assert all(len(o[0]) == 61 for o in spec)
    assert totals.num_drafts > 0 and totals.num_accepted_tokens > 0
    assert sum(totals.accepted_per_position) == totals.num_accepted_tokens <= totals.num_draft_tokens


def test_sampled_output_with_speculation_is_seeded_and_valid(serve_model):
    params = SamplingParams(max_tokens=40, temperature=0.8, top_k=50, seed=7, ignore_eos=True)
    spec_cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_max=3)
    a, _ = _generate(serve_model, [[7, 8, 9] * 20], params, spec_cfg)
    b, _ = _generate(serve_model, [[7, 8, 9] * 20], params, spec_cfg)
    assert a == b and len(a[0][0]) == 40  # reproducible with a seed, exact length


def test_no_drafts_at_or_above_disable_by_batch_size(serve_model):
    prompts = [[11, 12, 13] * 10] * 3
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    capped = SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_max=3, disable_by_batch_size=3)
    _, totals = _generate(serve_model, prompts, params, capped)
    assert totals.num_drafts == 0  # three running: never drafted
    _, totals = _generate(serve_model, prompts[:2], params, capped)
    assert totals.num_drafts > 0


def test_a_stop_string_with_speculation_ends_the_output_where_plain_decoding_does(serve_model):
    """Drafts are accepted several tokens a step here, so the stop string is usually completed by a token inside
    a verified draft: the text, the tokens and the finish are those of plain decoding (the draft's later
    tokens of that step are dropped)."""
    prompt = [[11, 12, 13, 14, 15] * 12]
    spec_cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=5, prompt_lookup_max=4, prompt_lookup_min=2)
    with LLM(str(serve_model), kv_cache_memory_bytes=16 << 20, max_model_len=256) as llm:
        full = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0].outputs[0]
    stop = full.text[len(full.text) // 2 :][:4]
    assert stop.strip() and full.text.index(stop) > 0, full.text
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    outs = []
    for spec in (None, spec_cfg):
        with LLM(str(serve_model), kv_cache_memory_bytes=16 << 20, max_model_len=256, speculative=spec) as llm:
            o = llm.generate(prompt, params)[0].outputs[0]
            outs.append((o.text, o.token_ids, o.finish_reason))
            if spec is not None:
                assert llm.core.spec_totals.num_accepted_tokens > 0
    assert outs[0] == outs[1]
    assert outs[0][0] == full.text[: full.text.index(stop)] and outs[0][2] == "stop"
