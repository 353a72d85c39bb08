"""Stored responses of the Responses API (``store``: the default), for ``GET``/``DELETE /v1/responses/{id}`` and
``previous_response_id``: in memory, bounded in count and in bytes, the oldest evicted first. Nothing survives a
restart (a ``previous_response_id`` that is gone is a 404, as for one evicted)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_RESPONSES = 1000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class StoredResponse:
    body: str  # the Response object's JSON, as GET returns it
    conversation: list[dict[str, Any]]  # the chat messages up to and including this response's output


class ResponseStore:
    """At most ``max_responses`` responses and ``max_bytes`` of them (their JSON and their conversation's text,
    counted at put); the least recently stored go first. A response larger than ``max_bytes`` alone is not
    kept. Used on the event loop only."""

    def __init__(self, max_responses: int = DEFAULT_MAX_RESPONSES, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._items: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def _size(item: StoredResponse) -> int:
        text = sum(len(str(m.get("content") or "")) + len(str(m.get("tool_calls") or "")) for m in item.conversation)
        return len(item.body) + text

    def put(self, response_id: str, item: StoredResponse) -> None:
        size = self._size(item)
        if size > self.max_bytes or self.max_responses < 1:
            return
        self.delete(response_id)
        self._items[response_id] = (item, size)
        self.bytes += size
        while len(self._items) > self.max_responses or self.bytes > self.max_bytes:
            _, (_, evicted) = self._items.popitem(last=False)
            self.bytes -= evicted

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._items.get(response_id)
        return None if entry is None else entry[0]

    def delete(self, response_id: str) -> bool:
        entry = self._items.pop(response_id, None)
        if entry is None:
            return False
        self.bytes -= entry[1]
        return True
