"""The server layer's configuration: the app's settings (what it serves and how it guards the API) and the HTTP
server's (where it listens, how it drains). No heavy imports: the CLI reads the defaults for --help."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from engine.config import EngineConfig
from server.response_store import DEFAULT_MAX_BYTES, DEFAULT_MAX_RESPONSES

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # generous for long prompts, small enough to refuse abuse
# Longest wait for the next piece of a request body before answering 408 (a stalled upload).
DEFAULT_BODY_TIMEOUT_SECONDS = 30.0
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 30.0
DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0


class ReasoningParserChoice(StrEnum):
    """``--reasoning-parser``: whether answers are split into reasoning and content at ``<think>...</think>``."""

    AUTO = "auto"  # when the chat template uses <think>
    QWEN3 = "qwen3"
    NONE = "none"


@dataclass
class ServerSettings:
    engine: EngineConfig
    served_model_names: list[str]
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT_SECONDS
    reasoning_parser: ReasoningParserChoice = ReasoningParserChoice.AUTO
    base_url: str | None = None  # where clients reach the server, for the startup summary
    web_ui: bool = True  # the chat page at / (server/web_ui.py); off behind a gateway that wants only the API
    # The Responses API's stored responses (server/response_store.py): at most this many, and this many bytes
    responses_store_max_count: int = DEFAULT_MAX_RESPONSES
    responses_store_max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class HTTPSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_SECONDS
