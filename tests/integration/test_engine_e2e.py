"""The async engine with the real worker process on a random small model."""

from __future__ import annotations

import asyncio
import random

import pytest

from engine.async_engine import AsyncEngine, EngineState, RequestFailed
from engine.config import EngineConfig, SchedulerConfig
from engine.llm import LLM
from engine.sampling_params import InvalidRequest, PromptTooLong, SamplingParams
from npu.config import WorkerConfig
from npu.messages import SamplingOptions

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _config(model_dir, **sched) -> EngineConfig:
    return EngineConfig(
        worker=WorkerConfig(model_dir=str(model_dir), kv_cache_memory_bytes=32 << 20, max_model_len=1024),
        scheduler=SchedulerConfig(**{"max_num_batched_tokens": 256, "long_prefill_token_threshold": 64, **sched}),
    )


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(10, 150000) for _ in range(rng.choice([3, 17, 40, 90, 150, 300]))] for _ in range(n)]


async def _collect(stream) -> list[int]:
    ids = []
    async for out in stream:
        ids.extend(out.new_token_ids)
    return ids


@pytest.fixture(scope="module")
def engine_factory(serve_model):
    def run(coro_fn, **sched):
        async def main():
            engine = AsyncEngine(_config(serve_model, **sched))
            await engine.start()
            try:
                return await coro_fn(engine)
            finally:
                await engine.stop()

        return asyncio.run(main())

    return run


def test_concurrent_requests_match_alone(engine_factory):
    prompts = _prompts(16)
    lens = [5 + i * 3 for i in range(16)]

    async def alone(engine):
        return [
            await _collect(engine.add_request(p, SamplingParams(max_tokens=n, **GREEDY))) for p, n in zip(prompts, lens)
        ]

    async def together(engine):
        streams = [engine.add_request(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(prompts, lens)]
        return await asyncio.gather(*(_collect(s) for s in streams))

    ref = engine_factory(alone)
    got = engine_factory(together)
    assert [len(x) for x in ref] == lens
    assert got == ref


def test_abort_half_midway_restores_block_pool(engine_factory):
    async def scenario(engine):
        await asyncio.sleep(0.2)
        free_before = engine.stats.num_free_blocks
        assert free_before == engine.stats.num_blocks
        streams = [engine.add_request(p, SamplingParams(max_tokens=200, **GREEDY)) for p in _prompts(16, 1)]
        results = []

        async def consume(i, s):
            n = 0
            async for out in s:
                n += len(out.new_token_ids)
                if i % 2 == 0 and n >= 5:
                    break  # closing the stream aborts the request
            return n

        results = await asyncio.gather(*(consume(i, s) for i, s in enumerate(streams)))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if engine.stats.num_free_blocks == free_before and engine.stats.num_running == 0:
                break
        return free_before, engine.stats, results

    free_before, stats, results = engine_factory(scenario)
    assert all(n >= 5 for n in results[::2]) and all(n == 200 for n in results[1::2])
    assert stats.num_free_blocks == free_before and stats.num_running == 0 and stats.num_waiting == 0


def test_shared_prefix_reports_cached_tokens_and_same_tokens(engine_factory):
    system = [random.Random(7).randint(10, 150000) for _ in range(150)]

    async def scenario(engine):
        outs = []
        for tail in ([11, 12, 13], [11, 12, 13]):
            cached, ids = 0, []
            async for out in engine.add_request(system + tail, SamplingParams(max_tokens=12, **GREEDY)):
                ids += out.new_token_ids
                cached = out.cached_tokens
            outs.append((cached, ids))
        return outs

    (c1, ids1), (c2, ids2) = engine_factory(scenario)
    assert c1 == 0 and c2 == 144  # 9 full blocks of 16
    assert ids1 == ids2
    # and the same tokens as with prefix caching off
    (c3, ids3), _ = engine_factory(scenario, enable_prefix_caching=False)
    assert c3 == 0 and ids3 == ids1


def test_too_long_prompt_refused_before_scheduling(engine_factory):
    async def scenario(engine):
        with pytest.raises(
            InvalidRequest, match="maximum context length is 1024 tokens. However, your request has 1024 input tokens"
        ):
            engine.add_request([5] * 1024, SamplingParams())
        with pytest.raises(
            PromptTooLong, match=r"you requested 1100 tokens \(100 in the prompt, 1000 in the completion\)"
        ) as e:
            engine.add_request([5] * 100, SamplingParams(max_tokens=1000))
        # the numbers, for the server to word for its endpoint
        assert (e.value.max_model_len, e.value.prompt_tokens, e.value.max_tokens) == (1024, 100, 1000)
        # max_tokens absent: up to the model's length
        ids = await _collect(engine.add_request([5] * 1000, SamplingParams(**GREEDY)))
        return len(ids)

    assert engine_factory(scenario) == 24


def test_offline_llm_generate(serve_model):
    with LLM(str(serve_model), kv_cache_memory_bytes=16 << 20, max_model_len=512) as llm:
        res = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=7, n=2, temperature=0.9, seed=3))
        assert [len(o.token_ids) for r in res for o in r.outputs] == [7, 7, 7, 7]
        assert res[0].outputs[0].token_ids != res[0].outputs[1].token_ids
        again = llm.generate(["Hello"], SamplingParams(max_tokens=7, n=2, temperature=0.9, seed=3))
        assert [o.token_ids for o in again[0].outputs] == [o.token_ids for o in res[0].outputs]
        assert again[0].cached_tokens == 0  # "Hello" is a single token: nothing to reuse


def test_request_the_worker_rejects_fails_alone(engine_factory):
    """Defence in depth: a request whose options slipped past validation fails on its own (RequestFailed); the
    request beside it gets exactly its tokens, the engine keeps serving, and the failed request's blocks
    (registered for prefix caching when scheduled, never written) are not reused."""
    good_prompt, poison_prompt = _prompts(2, 5)[0], list(range(1000, 1060))

    async def alone(engine):
        return await _collect(engine.add_request(good_prompt, SamplingParams(max_tokens=24, **GREEDY)))

    async def scenario(engine):
        make = engine._core.make_sequences

        def poisoned(request_id, *args, **kwargs):
            seqs = make(request_id, *args, **kwargs)
            if request_id == "poison":  # as if the boundary had missed it: a bias on a token past the vocabulary
                for seq in seqs:
                    seq.__dict__["worker_options"] = SamplingOptions(temperature=0, logit_bias={10**7: 1.0})
            return seqs

        engine._core.make_sequences = poisoned
        good = engine.add_request(good_prompt, SamplingParams(max_tokens=24, **GREEDY))
        bad = engine.add_request(poison_prompt, SamplingParams(max_tokens=24, **GREEDY), "poison")
        with pytest.raises(RequestFailed, match="outside the vocabulary"):
            await _collect(bad)
        good_ids = await _collect(good)
        engine._core.make_sequences = make
        cached = -1
        async for out in engine.add_request(poison_prompt, SamplingParams(max_tokens=4, **GREEDY)):
            cached = out.cached_tokens
        for _ in range(100):
            await asyncio.sleep(0.05)
            if engine.stats.num_free_blocks == engine.stats.num_blocks:
                break
        return good_ids, cached, engine.state, engine.stats

    ref = engine_factory(alone)
    good_ids, cached, state, stats = engine_factory(scenario)
    assert good_ids == ref
    assert cached == 0  # the failed request's prompt blocks were taken out of the prefix cache
    assert state is EngineState.READY and stats.worker_restarts == 0
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0


def test_validation_names_the_field(engine_factory):
    async def scenario(engine):
        vocab = engine._core.model_config.vocab_size
        cases = [
            (dict(stop_token_ids=[vocab]), "stop_token_ids"),
            (dict(logit_bias={vocab: 1.0}), "logit_bias"),
            (dict(logit_bias={-1: 1.0}), "logit_bias"),
            (dict(seed=2**63), "seed"),
            (dict(top_k=2**31), "top_k"),
            (dict(min_tokens=2000), "min_tokens"),
            (dict(max_tokens=10, min_tokens=11), "min_tokens"),
            (dict(stop=["a"] * 17), "stop"),
            (dict(stop=["a" * 1025]), "stop"),
            (dict(temperature=float("nan")), "temperature"),
            (dict(presence_penalty=float("inf")), "presence_penalty"),
        ]
        params = []
        for kw, param in cases:
            with pytest.raises(InvalidRequest) as e:
                engine.add_request([1, 2, 3], SamplingParams(**kw))
            params.append((e.value.param, param))
        with pytest.raises(InvalidRequest) as e:
            engine.add_request([1, 2, 3], SamplingParams(), priority=2**63)
        params.append((e.value.param, "priority"))
        # the limits themselves are accepted
        ok = SamplingParams(
            max_tokens=4,
            seed=2**63 - 1,
            top_k=2**31 - 1,
            stop=["a" * 1024] * 16,
            stop_token_ids=[vocab - 1],
            logit_bias={vocab - 1: -100.0},
            **GREEDY,
        )
        await _collect(engine.add_request([1, 2, 3], ok, priority=-(2**63)))
        return params

    for got, want in engine_factory(scenario):
        assert got == want
