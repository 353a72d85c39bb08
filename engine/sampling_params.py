"""Per-request sampling and stopping parameters, validated once at the door."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.structured_output import CompiledGrammar
from npu.messages import SamplingOptions

# Upper bound of top_logprobs, as OpenAI's API allows.
MAX_TOP_LOGPROBS = 20
MAX_N = 16
# Seeds are 64-bit signed integers, as in vLLM (they cross the worker pipe as msgpack integers).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# top_k above the vocabulary size keeps every token; anything past 32 bits is refused, not wrapped.
MAX_TOP_K = 2**31 - 1
# Stop strings are matched against every generated token's text in the engine thread, which serves all
# requests: their number and length are bounded so one request's stop list cannot slow every step.
# (OpenAI accepts 4 stop strings; vLLM any number.)
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024


class InvalidRequest(ValueError):
    """A request the engine will not run; the message is shown to the client (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLong(InvalidRequest):
    """The prompt, or the prompt and the completion asked for, do not fit ``max_model_len``. The engine states
    the numbers; how to say it to a client (which input to shorten) is the endpoint's business: see
    :meth:`describe`. ``at_least`` marks a prompt refused by its byte size before tokenization, whose token
    count is then a lower bound."""

    def __init__(
        self,
        max_model_len: int,
        prompt_tokens: int,
        max_tokens: int | None = None,
        at_least: bool = False,
        num_bytes: int | None = None,
    ):
        self.max_model_len, self.prompt_tokens, self.max_tokens = max_model_len, prompt_tokens, max_tokens
        self.at_least, self.num_bytes = at_least, num_bytes
        super().__init__(self.describe("prompt"), "prompt")

    def describe(self, input_name: str) -> str:
        """vLLM's sentences (clients match them), naming ``input_name`` ("messages" or "prompt")."""
        head = f"This model's maximum context length is {self.max_model_len} tokens. However, "
        if self.at_least:
            return (
                f"{head}your request has at least {self.prompt_tokens} input tokens ({self.num_bytes} bytes of "
                f"text). Please reduce the length of the input {input_name}."
            )
        if self.prompt_tokens >= self.max_model_len:
            return (
                f"{head}your request has {self.prompt_tokens} input tokens. Please reduce the length of the "
                f"input {input_name}."
            )
        return (
            f"{head}you requested {self.prompt_tokens + self.max_tokens} tokens ({self.prompt_tokens} in the "
            f"{input_name}, {self.max_tokens} in the completion). Please reduce the length of the "
            f"{input_name} or completion."
        )


@dataclass(frozen=True)
class StructuredOutput:
    """Constrained decoding for a request: its compiled grammar, applied from the first output token (a
    thinking model's optional think block is part of the grammar)."""

    grammar: CompiledGrammar


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = None  # None: up to the model's maximum length
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None

    def validate(self, vocab_size: int, max_model_len: int) -> None:
        """Range-check every field; token ids against ``vocab_size``. Raises InvalidRequest naming the field."""

        def bad(param: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"{param} {why}", param)

        if not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be between 1 and {MAX_N}, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0 or self.min_tokens > (self.max_tokens if self.max_tokens is not None else max_model_len):
            raise bad("min_tokens", f"must be between 0 and max_tokens (or max_model_len), got {self.min_tokens}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise bad("seed", f"must be a 64-bit signed integer, got {self.seed}")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", f"must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not -1 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", f"must be -1 (off), 0 (off) or a positive count up to {MAX_TOP_K}, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be between 0 and 1, got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise bad(name, f"must be between -2 and 2, got {value}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}")
        for token_id, bias in self.logit_bias.items():
            if not 0 <= token_id < vocab_size:
                raise bad("logit_bias", f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
            if not -100.0 <= bias <= 100.0:
                raise bad("logit_bias", f"values must be between -100 and 100, got {bias} for token {token_id}")
        for token_id in self.stop_token_ids:
            if not 0 <= token_id < vocab_size:
                raise bad("stop_token_ids", f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"accepts at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for text in self.stop:
            if len(text) > MAX_STOP_STRING_CHARS:
                raise bad("stop", f"strings must be at most {MAX_STOP_STRING_CHARS} characters, got {len(text)}")

    def worker_options(self, eos_token_ids: tuple[int, ...], seed: int | None) -> SamplingOptions:
        """What the worker needs to sample; ``seed`` is this sequence's (n > 1 gives each its own)."""
        return SamplingOptions(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            seed=seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=dict(self.logit_bias),
            min_tokens=self.min_tokens,
            min_tokens_suppress_ids=sorted(set(() if self.ignore_eos else eos_token_ids) | set(self.stop_token_ids)),
            logprobs=self.logprobs,
        )
