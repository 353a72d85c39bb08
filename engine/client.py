"""The one interface between the HTTP layer and the engine (vLLM v1's ``EngineClient``).

``server/`` holds an :class:`EngineClient` and nothing else of the engine: it never reaches into the
synchronous ``EngineCore``, its scheduler or its worker. :class:`~engine.async_engine.AsyncEngine` implements it.

Threading rule (checked by ``EngineCore``, which raises if broken): the scheduler, the block manager and the
worker belong to the engine thread. Of the methods below, :meth:`encode_prompt`, :meth:`prompt_from_ids` and
:meth:`compile_grammar` may be called from any thread (the server calls the first two from
``asyncio.to_thread``, since they take time in proportion to the input): they read only what is fixed once the
engine has started (the tokenizer, the model's config, its context length) or go through the grammar compiler's
own lock. Every other method is called on the event loop.
"""

from __future__ import annotations

import concurrent.futures
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.async_engine import EngineState, EngineStats, RequestStream
    from engine.chat_template import ChatTemplate
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams
    from engine.tokenizer import Tokenizer
    from loaders.config import GenerationDefaults, ModelConfig
    from npu.messages import Ready, SpecDecodeStats


class EngineClient(ABC):
    """What the server may ask of the engine: prompts encoded, grammars compiled, requests run and aborted,
    its state, statistics and the worker's report, and its life cycle (start, drain, stop)."""

    # fixed once constructed
    config: EngineConfig
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    generation_defaults: GenerationDefaults
    model_config: ModelConfig
    # the engine's state, for /health (read on the event loop)
    state: EngineState
    state_detail: str | None
    stats: EngineStats

    # ---- any thread -------------------------------------------------------------------------
    @abstractmethod
    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize a prompt; a text too long for the context by its size alone is refused first
        (PromptTooLong). Takes time in proportion to the text: call it off the event loop."""

    @abstractmethod
    def prompt_from_ids(self, ids: list[int]) -> str:
        """The text of a token-id prompt, after its length and vocabulary were checked (InvalidRequest)."""

    @abstractmethod
    def compile_grammar(self, grammar: str) -> concurrent.futures.Future:
        """Compile a grammar on the grammar compiler's threads (GrammarError, GrammarBusy when its queue is
        full); cancelling the future before the compile starts drops it."""

    # ---- the event loop ---------------------------------------------------------------------
    @property
    @abstractmethod
    def max_model_len(self) -> int | None:
        """The context length, known once the worker has started."""

    @property
    @abstractmethod
    def worker_info(self) -> Ready | None:
        """What the worker reported when it was ready (device, kernels, KV cache), or None before."""

    @property
    @abstractmethod
    def spec_totals(self) -> SpecDecodeStats:
        """Speculative decoding's counters, summed over all steps."""

    @property
    @abstractmethod
    def healthy(self) -> bool:
        """Ready, with a live worker that is not stalled."""

    @abstractmethod
    def stalled(self) -> str | None:
        """Why the worker counts as stalled (a step past its deadline), or None."""

    @abstractmethod
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0) -> None:
        """What :meth:`add_request` would refuse of this request, checked without queueing it."""

    @abstractmethod
    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None, priority: int = 0
    ) -> RequestStream:
        """Queue a request; its outputs come from the returned stream (closing it early aborts the request)."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Free everything the request holds, within one step."""

    # ---- life cycle -------------------------------------------------------------------------
    @abstractmethod
    async def start(self) -> None:
        """Load the model in a worker and start serving."""

    @abstractmethod
    async def drain(self, timeout: float) -> int:
        """Refuse new requests, let the open ones finish for up to ``timeout`` s, cut the rest; how many were cut."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the engine thread and the worker."""

    @abstractmethod
    def kill_worker(self) -> None:
        """Kill the worker process now (a second Ctrl-C); safe from a signal handler."""
