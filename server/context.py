"""What every endpoint is handed: the engine (through its client interface), the metrics, the names the model
is served under, whether its template thinks, and the Responses API's store of responses."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.client import EngineClient
from server.errors import APIError
from server.metrics import ServerMetrics
from server.response_store import ResponseStore


@dataclass
class ServingContext:
    engine: EngineClient
    metrics: ServerMetrics
    served_model_names: list[str]
    reasoning: bool  # the model's template thinks in <think>...</think>
    responses: ResponseStore = field(default_factory=ResponseStore)  # /v1/responses with store (the default)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, name: str | None) -> str:
        if name is not None and name not in self.served_model_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        return self.model_name
