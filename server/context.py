"""What every endpoint is handed: the engine (through its client interface), the metrics, the names the model
is served under and whether its template thinks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.client import EngineClient
from server.errors import APIError
from server.metrics import ServerMetrics


@dataclass
class ServingContext:
    engine: EngineClient
    metrics: ServerMetrics
    served_model_names: list[str]
    reasoning: bool  # the model's template thinks in <think>...</think>
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, name: str | None) -> str:
        if name is not None and name not in self.served_model_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        return self.model_name
