"""Stop strings over streamed text: never emit any part of a stop string that then completes."""

from __future__ import annotations


class StopStringMatcher:
    """Holds back the shortest tail of the text that could still become a stop string.

    ``feed(delta)`` returns ``(text_to_emit, stopped)``. When a stop string completes, the text up to
    it (plus the stop string itself if ``include_stop_str_in_output``) is emitted and ``stopped`` is
    set; the matched string is in :attr:`matched`.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False):
        self.stop = [s for s in stop if s]
        self.include = include_stop_str_in_output
        self._held = ""
        self.matched: str | None = None

    def _held_tail_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string.

        Only positions holding a stop string's first character can start such a suffix: the scan jumps
        between them with ``str.find``, and each candidate costs one C-level ``startswith``."""
        best = 0
        for s in self.stop:
            p = max(len(text) - len(s) + 1, 0)
            while len(text) - p > best:
                p = text.find(s[0], p)
                if p < 0 or len(text) - p <= best:
                    break
                if s.startswith(text[p:]):
                    best = len(text) - p
                    break
                p += 1
        return best

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stop:
            return delta, False
        text = self._held + delta
        # The stop string that completes first wins (ties: the longer one), so the result does not
        # depend on how the text was split into deltas.
        hits = [(text.find(s) + len(s), -len(s), s) for s in self.stop if s in text]
        if hits:
            end, neg_len, s = min(hits)
            pos = end + neg_len
            self.matched = s
            self._held = ""
            return text[: pos + (len(s) if self.include else 0)], True
        keep = self._held_tail_len(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """At a finish that is not a stop-string match: release the held text."""
        out, self._held = self._held, ""
        return out
