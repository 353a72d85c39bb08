"""The engine layer's configuration, in one place: what the engine, its scheduler, the grammar compiler and the
step watchdog are built from (the worker's own is npu/config.py, the server's server/config.py). No heavy
imports: the CLI reads the defaults for --help."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.tokenizer import TokenizerImpl
from loaders.config import GENERATION_CONFIG_AUTO
from npu.config import WorkerConfig


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # Prompt chunks longer than this are split (0: only the token budget limits a chunk).
    long_prefill_token_threshold: int = 512
    max_model_len: int | None = None  # None: the worker's (the model's, or --max-model-len)
    enable_prefix_caching: bool = True
    # Speculative decoding: KV slots reserved after a running sequence's sampling chunk, for the worker to
    # draft into (its num_speculative_tokens; 0: off). They count against the token budget.
    num_lookahead_tokens: int = 0
    lookahead_max_running: int | None = None  # no lookahead while this many sequences or more are running


@dataclass(frozen=True)
class GrammarLimits:
    """What one request's grammar may cost the server. A grammar is compiled on the server's CPU, from what a
    client sent; these bound it, so that no client's grammars can starve the others (tokenization and the
    engine never wait behind a compile: compiles have threads of their own)."""

    max_source_bytes: int = 256 * 1024  # the grammar engine's form of it (a JSON schema, a Lark grammar)
    max_compile_cpu_seconds: float = 2.0  # CPU time to compile it and walk its first steps (then: a 400)
    compile_threads: int = 1  # grammars compiled at once (each holds a core while it compiles)
    max_queued: int = 16  # compiles waiting beyond these are refused with a 429


@dataclass(frozen=True)
class StepDeadlines:
    """Explicit deadlines (seconds); None: learned as the module docstring says."""

    stall_seconds: float | None = None
    hang_seconds: float | None = None


@dataclass(frozen=True)
class EngineConfig:
    worker: WorkerConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tokenizer_impl: str = TokenizerImpl.AUTO.value
    # Waiting requests beyond this are refused (HTTP 429) instead of queued without limit.
    max_queued_requests: int = 1024
    # A worker that dies is restarted, at most this many times within the window; past that the engine
    # gives up (and the server exits non-zero, so that an orchestrator restarts the whole process).
    max_worker_restarts: int = 5
    worker_restart_window_seconds: float = 600.0
    # Request defaults (vLLM's flags): "auto" (the model's generation_config.json), "vllm" (none) or a
    # directory holding a generation_config.json; then single fields overridden.
    generation_config: str = GENERATION_CONFIG_AUTO
    override_generation_config: dict = field(default_factory=dict)
    # vLLM's --chat-template: a Jinja file (or the template itself) instead of the model's own
    chat_template: str | None = None
    # What one request's grammar may cost (structured output and forced tool calls)
    grammar_limits: GrammarLimits = field(default_factory=GrammarLimits)
    # How long one worker step may take before /health says stalled, and before the worker is restarted
    step_deadlines: StepDeadlines = field(default_factory=StepDeadlines)
