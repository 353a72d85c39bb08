"""Constrained decoding: a grammar per sequence, and the bitmask of the tokens it allows at each step.

The grammar engine is llguidance (chosen over xgrammar by measurement: benchmarks/grammar_bench.py and the
README's "Structured output" section). The engine thread asks each constrained sequence's matcher for the
allowed-token bitmask of the step it schedules, sends it with the chunk, and the worker's sampler masks the
logits of that row only; the sampled token then advances the matcher. Rows without a grammar pay nothing.

A grammar is given as llguidance's serialized form: build it with :func:`json_schema_grammar`,
:func:`lark_grammar` (Lark syntax, with ``%json {...}`` for embedded JSON schemas and ``<[id]>`` for special
tokens) or :func:`regex_grammar`. :class:`GrammarCompiler` validates and caches them by source.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llguidance

log = logging.getLogger(__name__)

# How JSON is written under a grammar: the separators models are trained on (json.dumps' defaults), and no
# other whitespace. Free whitespace would let a weak model pad forever and never close the object.
JSON_FORMAT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Compiled grammars kept (by source): a client that repeats its schema compiles it once. Sources longer than
# the second bound are compiled every time instead of kept, so that clients cannot fill memory through the cache
# (256 x 64 KiB at most).
GRAMMAR_CACHE_SIZE = 256
GRAMMAR_CACHE_MAX_SOURCE_CHARS = 64 * 1024


class GrammarError(ValueError):
    """A grammar that cannot be compiled (an invalid JSON schema, a Lark syntax error); the message says why."""


@dataclass(frozen=True)
class Grammar:
    """A grammar in llguidance's serialized form."""

    source: str


def json_schema_grammar(schema: dict[str, Any]) -> Grammar:
    """Output that is one JSON value valid against ``schema``. Raises GrammarError if it is not an object."""
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        return Grammar(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_FORMAT))
    except (ValueError, TypeError) as e:
        raise GrammarError(str(e)) from None


def lark_grammar(lark: str) -> Grammar:
    return Grammar(llguidance.LLMatcher.grammar_from_lark(lark))


def regex_grammar(regex: str) -> Grammar:
    return Grammar(llguidance.LLMatcher.grammar_from_regex(regex))


def lark_json(schema: dict[str, Any]) -> str:
    """``schema`` embedded in a Lark rule, written with :data:`JSON_FORMAT`."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_FORMAT})


def lark_literal(text: str) -> str:
    """A Lark string literal for ``text``."""
    return json.dumps(text)


class CompiledGrammar:
    """A validated grammar; :meth:`matcher` starts a fresh matcher for one sequence."""

    def __init__(self, prototype: llguidance.LLMatcher):
        self._prototype = prototype

    def matcher(self, start_after_token_id: int | None = None) -> GrammarMatcher:
        return GrammarMatcher(self._prototype.deep_copy(), start_after_token_id)


class GrammarMatcher:
    """One sequence's place in its grammar. With ``start_after_token_id`` (a reasoning model's ``</think>``),
    the grammar applies only to what follows that token; before it, output is free."""

    def __init__(self, matcher: llguidance.LLMatcher, start_after_token_id: int | None = None):
        self._matcher = matcher
        self._waiting_for = start_after_token_id
        self.error: str | None = None

    @property
    def active(self) -> bool:
        return self._waiting_for is None and self.error is None

    def bitmask(self) -> bytes | None:
        """The allowed next tokens, one bit per token id (little-endian int32 words, llguidance's layout);
        None while the grammar does not apply yet (or after an error)."""
        if not self.active:
            return None
        return self._matcher.compute_bitmask()  # (releases the GIL while it computes)

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token."""
        if self._waiting_for is not None:
            if token_id == self._waiting_for:
                self._waiting_for = None
            return
        if self.error is None and not self._matcher.consume_token(token_id):
            # Only possible when something other than the mask chose the token: stop constraining, say why.
            self.error = self._matcher.get_error() or f"token {token_id} is not allowed by the grammar"
            log.warning("grammar matcher stopped: %s", self.error.splitlines()[0])

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (only end of sequence)."""
        return self._matcher.is_stopped()


class GrammarCompiler:
    """Compiles grammars against the model's vocabulary, with a cache by source.

    The tokenizer view takes about 2 s to build for a 150k vocabulary (measured: benchmarks/grammar_bench.py),
    so it is built on first use, not at start-up: a server that never sees a grammar never pays for it.
    Thread-safe; call :meth:`compile` off the event loop.
    """

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._unavailable: str | None = None  # why this model's vocabulary has no grammar view (kept: not rebuilt)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """The grammar engine's view of the vocabulary; GrammarError where it cannot be built for this model
        (a checkpoint whose vocab_size is smaller than its tokenizer's vocabulary), which then stays the answer."""
        with self._lock:
            if self._tokenizer is None and self._unavailable is None:
                try:
                    self._tokenizer = llguidance.LLTokenizer(
                        self._tokenizer_json(), n_vocab=self._vocab_size, eos_token=self._eos
                    )
                except ValueError as e:
                    self._unavailable = (
                        f"structured output is not available for this model: its tokenizer does not fit the "
                        f"model's vocabulary of {self._vocab_size} ids ({e})"
                    )
            if self._tokenizer is None:
                raise GrammarError(self._unavailable)
            return self._tokenizer

    def compile(self, grammar: Grammar) -> CompiledGrammar:
        """Raises GrammarError with the grammar engine's reason when the grammar is invalid."""
        with self._lock:
            hit = self._cache.get(grammar.source)
            if hit is not None:
                self._cache.move_to_end(grammar.source)
                return hit
        tokenizer = self._llg_tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar.source, tokenizer)
        if is_error:
            raise GrammarError(messages[0].splitlines()[0])
        matcher = llguidance.LLMatcher(tokenizer, grammar.source, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error().splitlines()[0])
        compiled = CompiledGrammar(matcher)
        if len(grammar.source) > GRAMMAR_CACHE_MAX_SOURCE_CHARS:
            return compiled
        with self._lock:
            self._cache[grammar.source] = compiled
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled
