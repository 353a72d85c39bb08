"""A sequence's output text: incremental detokenization of its tokens, and stop strings over that text.

Stop strings live here, with the text (as in vLLM), not in the scheduler: the scheduler's stop checks are
token-level (EOS, stop token ids, lengths), so it never needs a tokenizer.
"""

from __future__ import annotations

from engine.stop import StopStringMatcher
from engine.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Emits only complete text: never half a UTF-8 character, never a lost or repeated character.

    The window ``ids[prefix_offset:]`` is decoded and compared with ``ids[prefix_offset:read_offset]``
    (the vLLM/TGI method): a delta is released once it does not end in U+FFFD, i.e. once the bytes of
    the last character are all there. :meth:`flush` releases whatever is held at the end.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        """Append token ids; return the newly completed text (possibly empty)."""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self.ids[self._prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            delta = full_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation: the text still held back (e.g. a truly invalid byte sequence)."""
        full = self._decode(self.ids)
        if full.startswith(self.text) and len(full) > len(self.text):
            delta = full[len(self.text) :]
            self.text = full
            return delta
        return ""


class OutputText:
    """Turns a sequence's sampled tokens into the text its client sees, ending it at a stop string."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ):
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop_matcher = StopStringMatcher(stop or [], include_stop_str_in_output)

    def add(self, token_id: int, match_stops: bool) -> tuple[str, str | None]:
        """A token whose text is shown: (the text released, the stop string it completed or None). Before
        ``min_tokens`` (``match_stops`` False) stop strings are not looked for."""
        delta = self.detokenizer.add([token_id])
        if not match_stops:
            return delta, None
        text, hit = self.stop_matcher.feed(delta)
        return text, self.stop_matcher.matched if hit else None

    def finish(self) -> str:
        """At a finish other than a stop string: the text still held back (partial characters, and a tail that
        could have begun a stop string)."""
        return self.stop_matcher.feed(self.detokenizer.flush())[0] + self.stop_matcher.flush()
