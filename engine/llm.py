"""Offline batch API: ``LLM(model_dir).generate(prompts, params)`` with no server."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig, SchedulerConfig
from engine.core import EngineCore
from engine.sampling_params import SamplingParams
from npu.config import WorkerConfig


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class GenerateResult:
    prompt: str | list[int]
    prompt_token_ids: list[int]
    outputs: list[Completion] = field(default_factory=list)
    cached_tokens: int = 0


class LLM:
    """Runs the engine in the calling thread; the worker still runs in its own process."""

    def __init__(
        self,
        model: str,
        worker: WorkerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        tokenizer_impl: str = "auto",
        chat_template: str | None = None,
        **worker_kwargs,
    ):
        worker = worker or WorkerConfig(model_dir=str(model), **worker_kwargs)
        config = EngineConfig(
            worker=worker,
            scheduler=scheduler or SchedulerConfig(),
            tokenizer_impl=tokenizer_impl,
            chat_template=chat_template,
        )
        self.core = EngineCore(config)
        self.core.start()
        self.tokenizer = self.core.tokenizer
        self._next = 0

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[GenerateResult]:
        """Run every prompt to completion, batched by the scheduler; results in input order."""
        params = params or SamplingParams()
        results: list[GenerateResult] = []
        by_seq = {}
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            self._next += 1
            seqs = self.core.make_sequences(f"offline-{self._next}", ids, params)
            self.core.add(seqs)
            res = GenerateResult(prompt, ids, [Completion(s.index, "", [], None) for s in seqs])
            results.append(res)
            for s in seqs:
                by_seq[s.seq_id] = (res, s)
        pending = len(by_seq)
        while pending:
            for u in self.core.step():
                if u.error is not None:
                    raise RuntimeError(f"the worker could not run a sequence: {u.error}")
                res, seq = by_seq[u.seq.seq_id]
                out = res.outputs[seq.index]
                out.text += u.new_text
                out.token_ids.extend(u.new_token_ids)
                res.cached_tokens = max(res.cached_tokens, seq.num_cached_tokens)
                if u.finished:
                    out.finish_reason = seq.finish_reason.value
                    pending -= 1
        return results

    def close(self) -> None:
        self.core.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
