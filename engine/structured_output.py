"""Constrained decoding: a grammar per sequence, and the bitmask of the tokens it allows at each step.

The grammar engine is llguidance (chosen over xgrammar by measurement: benchmarks/grammar_bench.py and the
README's "Structured output" section). The engine thread asks each constrained sequence's matcher for the
allowed-token bitmask of the step it schedules, sends it with the chunk, and the worker's sampler masks the
logits of that row only; the sampled token then advances the matcher. Rows without a grammar pay nothing.

A grammar is given as llguidance's serialized form: build it with :func:`json_schema_grammar`,
:func:`lark_grammar` (Lark syntax, with ``%json {...}`` for embedded JSON schemas and ``<[id]>`` for special
tokens) or :func:`regex_grammar`. :class:`GrammarCompiler` validates and caches them.

Two things the grammar engine does not do are added here:

- **A thinking model** (Qwen3) may think first: :func:`optional_think` puts an optional ``<think>...</think>``
  block before a grammar, so a model that does not think is constrained from its first token and one that
  thinks is free until it closes the block.
- **JSON numbers are bounded.** llguidance's JSON number is unbounded (``[0-9]+`` fraction digits), and a weak
  model can write ``1.528888...`` until ``max_tokens``. In a grammar marked ``json_numbers``, each part of a
  number (integer, fraction, exponent) gets at most :data:`MAX_NUMBER_PART_DIGITS` digits, as in llama.cpp's
  JSON grammars: :class:`JsonNumberGuard` follows the JSON written outside strings and removes the tokens that
  would add more digits from the step's mask (a number can always end after a digit, so the grammar still has
  a way on; if a schema leaves no other way, the mask is left as the grammar made it).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np

from engine.config import GrammarLimits

log = logging.getLogger(__name__)

# How JSON is written under a grammar: the separators models are trained on (json.dumps' defaults), and no
# other whitespace. Free whitespace would let a weak model pad forever and never close the object.
JSON_FORMAT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Compiled grammars kept (by source): a client that repeats its schema compiles it once. Sources longer than
# the second bound are compiled every time instead of kept, so that clients cannot fill memory through the cache
# (256 x 64 KiB at most).
GRAMMAR_CACHE_SIZE = 256
GRAMMAR_CACHE_MAX_SOURCE_CHARS = 64 * 1024
# Digits in each part of a JSON number (integer, fraction, exponent) under a JSON grammar: llama.cpp's bound
# (16 significant digits is what a double holds).
MAX_NUMBER_PART_DIGITS = 16
# The compile-time probe of a grammar's first steps (see _probe): walks, and tokens per walk.
PROBE_WALKS = 8
PROBE_DEPTH = 3
# Whitespace allowed between "</think>" and the constrained answer (models write a blank line there).
AFTER_THINK_GAP = r"/[ \n]{0,4}/"


class GrammarError(ValueError):
    """A grammar that cannot be compiled (an invalid JSON schema, a Lark syntax error, over its budget); the
    message says why."""


class GrammarBusy(RuntimeError):
    """Too many grammars are waiting to be compiled: the request should be retried later (HTTP 429)."""


@dataclass(frozen=True)
class ThinkTokens:
    """A reasoning model's ``<think>`` and ``</think>`` token ids."""

    open_id: int
    close_id: int


@dataclass(frozen=True)
class Grammar:
    """A grammar in llguidance's serialized form. ``json_numbers``: its JSON parts get bounded numbers (see the
    module's docstring); ``think``: it starts with :func:`optional_think`'s block (whose text is not JSON)."""

    source: str
    json_numbers: bool = False
    think: ThinkTokens | None = None


def check_enforceable(schema: Any, path: str = "") -> None:
    """GrammarError naming the first place of ``schema`` that the grammar engine would not enforce exactly:
    a ``number`` whose ``exclusiveMinimum`` is a whole number L >= 0 and whose upper bound lies below L + 1
    (llguidance 1.9 admits L itself there; found by testing every such pair of bounds). Everything else it
    cannot enforce it refuses by itself."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            check_enforceable(item, f"{path}/{i}")
        return
    if not isinstance(schema, dict):
        return
    types = schema.get("type")
    low = schema.get("exclusiveMinimum")
    if (types == "number" or (isinstance(types, list) and "number" in types)) and _is_number(low):
        for key in ("maximum", "exclusiveMaximum"):
            high = schema.get(key)
            if _is_number(high) and low >= 0 and float(low).is_integer() and low < high < low + 1:
                raise GrammarError(
                    f"at {path or '/'}: exclusiveMinimum {low} with {key} {high} is not enforced exactly by the "
                    f"grammar engine (it would admit {low:g}); give minimum instead, or bounds that span a whole number"
                )
    for key, value in schema.items():
        if isinstance(value, (dict, list)):
            check_enforceable(value, f"{path}/{key}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def json_schema_grammar(schema: dict[str, Any]) -> Grammar:
    """Output that is one JSON value valid against ``schema``. Raises GrammarError if it is not an object."""
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    check_enforceable(schema)
    try:
        return Grammar(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_FORMAT), json_numbers=True)
    except (ValueError, TypeError) as e:
        raise GrammarError(str(e)) from None


def lark_grammar(lark: str, json_numbers: bool = False, think: ThinkTokens | None = None) -> Grammar:
    """A Lark grammar (``json_numbers``: its ``%json`` parts are JSON answers; ``think``: it was made by
    :func:`optional_think`)."""
    return Grammar(llguidance.LLMatcher.grammar_from_lark(lark), json_numbers, think)


def regex_grammar(regex: str) -> Grammar:
    return Grammar(llguidance.LLMatcher.grammar_from_regex(regex))


def optional_think(lark: str, think: ThinkTokens) -> str:
    """``lark`` (whose first rule is ``start``) behind an optional ``<think>...</think>`` block and the blank
    line after it: the grammar applies from the first token, and a model that opens the block writes freely
    until it closes it."""
    if not lark.startswith("start:"):
        raise ValueError("the grammar's first rule must be start")
    return (
        f"start: (<[{think.open_id}]> /(.|\\n)*/ <[{think.close_id}]> {AFTER_THINK_GAP})? answer_start\n"
        f"answer_start:{lark[len('start:') :]}"
    )


def lark_regex(pattern: str) -> str:
    """A Lark regex literal (``/.../``) for the regular expression ``pattern``: a ``/`` that ``pattern`` does not
    escape already is escaped (an escaped one, ``\\/``, stays as it is)."""
    return "/" + re.sub(r"(?<!\\)((?:\\\\)*)/", r"\1\\/", pattern) + "/"


def lark_json(schema: dict[str, Any]) -> str:
    """``schema`` embedded in a Lark rule, written with :data:`JSON_FORMAT` (GrammarError where the grammar
    engine would not enforce it exactly: :func:`check_enforceable`)."""
    check_enforceable(schema)
    return "%json " + json.dumps({**schema, "x-guidance": JSON_FORMAT})


def lark_literal(text: str) -> str:
    """A Lark string literal for ``text``."""
    return json.dumps(text)


class VocabularyDigits:
    """What :class:`JsonNumberGuard` needs of the vocabulary: each token's text (to follow the JSON written),
    and for each count ``r`` of digits still allowed, the packed set of tokens that begin with more than ``r``
    digits (in the bitmask's layout). Built once per vocabulary (about a second for 150k tokens)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, vocab_size: int):
        n = min(tokenizer.vocab_size, vocab_size)
        # a special token is never part of a JSON value: a space stands for it (it ends a number)
        self.texts = [
            " " if tokenizer.is_special_token(i) else tokenizer.decode_bytes([i]).decode("utf-8", "replace")
            for i in range(n)
        ]
        leading = np.zeros((vocab_size + 31) // 32 * 32, dtype=np.int32)
        for i, text in enumerate(self.texts):
            if text[:1].isdigit():
                leading[i] = len(text) - len(text.lstrip("0123456789"))
        self.too_many = [
            np.packbits(leading > r, bitorder="little").view(np.uint32) for r in range(MAX_NUMBER_PART_DIGITS + 1)
        ]

    def text(self, token_id: int) -> str:
        return self.texts[token_id] if token_id < len(self.texts) else " "


class JsonNumberGuard:
    """Follows the JSON a sequence writes (outside its optional think block) and, inside a number, bounds each
    part to :data:`MAX_NUMBER_PART_DIGITS` digits by removing longer continuations from the grammar's mask."""

    def __init__(self, vocabulary: VocabularyDigits, think: ThinkTokens | None):
        self.vocabulary, self.think = vocabulary, think
        self._thinking: bool | None = None if think is not None else False  # None: not known before token one
        self._in_string = self._escaped = False
        self._part: str | None = None  # "int" | "frac" | "exp" inside a number
        self._digits = 0

    def accept(self, token_id: int) -> None:
        if self._thinking is None:
            self._thinking = token_id == self.think.open_id
            if self._thinking:
                return
        if self._thinking:
            self._thinking = token_id != self.think.close_id
            return
        for ch in self.vocabulary.text(token_id):
            self._step(ch)

    def _step(self, ch: str) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
            return
        if ch.isdigit():
            if self._part is None:
                self._part, self._digits = "int", 0
            self._digits += 1
        elif ch == "-" and self._part is None:
            self._part, self._digits = "int", 0
        elif ch == "." and self._part == "int":
            self._part, self._digits = "frac", 0
        elif ch in "eE" and self._part in ("int", "frac"):
            self._part, self._digits = "exp", 0
        elif ch in "+-" and self._part == "exp" and self._digits == 0:
            pass
        else:
            self._part = None
            self._in_string = ch == '"'

    def digits_left(self) -> int | None:
        """How many more digits the current number part may take (None inside a string or a think block)."""
        if self._thinking is not False or self._in_string:
            return None
        return MAX_NUMBER_PART_DIGITS - (self._digits if self._part is not None else 0)

    def restrict(self, bitmask: bytes) -> bytes:
        """``bitmask`` without the tokens that would write too many digits (unchanged if that leaves none)."""
        left = self.digits_left()
        if left is None:
            return bitmask
        allowed = np.frombuffer(bitmask, dtype=np.uint32)
        too_many = self.vocabulary.too_many[max(left, 0)]
        n = min(allowed.size, too_many.size)
        kept = allowed.copy()
        kept[:n] &= ~too_many[:n]
        return kept.tobytes() if kept.any() else bitmask


class CompiledGrammar:
    """A validated grammar; :meth:`matcher` starts a fresh matcher for one sequence."""

    def __init__(self, prototype: llguidance.LLMatcher, grammar: Grammar, vocabulary: VocabularyDigits | None):
        self._prototype, self.grammar, self._vocabulary = prototype, grammar, vocabulary

    def matcher(self) -> GrammarMatcher:
        guard = JsonNumberGuard(self._vocabulary, self.grammar.think) if self._vocabulary is not None else None
        return GrammarMatcher(self._prototype.deep_copy(), guard)


class GrammarMatcher:
    """One sequence's place in its grammar (from its first output token), and the number guard of a JSON one."""

    def __init__(self, matcher: llguidance.LLMatcher, guard: JsonNumberGuard | None = None):
        self._matcher = matcher
        self._guard = guard
        self.error: str | None = None

    @property
    def active(self) -> bool:
        return self.error is None

    def bitmask(self) -> bytes | None:
        """The allowed next tokens, one bit per token id (little-endian int32 words, llguidance's layout);
        None once the grammar has failed (:attr:`error`): the sequence must then end with that error, never
        go on unconstrained."""
        if not self.active:
            return None
        mask = self._matcher.compute_bitmask()  # (releases the GIL while it computes)
        if self._matcher.is_error():  # a resource limit of the grammar engine, met in this step
            self._failed(None)
            return None
        return mask if self._guard is None else self._guard.restrict(mask)

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token. A token the grammar engine cannot take (a resource limit it meets,
        or a token something other than the mask chose) sets :attr:`error`."""
        if self.error is None and not self._matcher.consume_token(token_id):
            self._failed(token_id)
        if self._guard is not None:
            self._guard.accept(token_id)

    def _failed(self, token_id: int | None) -> None:
        reason = self._matcher.get_error() or f"token {token_id} is not allowed by the grammar"
        self.error = reason.splitlines()[0]
        log.warning("grammar matcher failed: %s", self.error)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (only end of sequence)."""
        return self._matcher.is_stopped()


def _digest(grammar: Grammar) -> str:
    return hashlib.sha256(grammar.source.encode("utf-8", "surrogatepass")).hexdigest()


def _allowed_ids(bitmask: bytes) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little"))


def _probe(matcher: llguidance.LLMatcher) -> str | None:
    """Walk the first steps of a fresh matcher: its first mask, then :data:`PROBE_WALKS` short walks of
    :data:`PROBE_DEPTH` tokens from first tokens spread over the allowed ones. The grammar engine meets its
    limits (an Earley row past 2000 items, a lexer past its expression count) as it runs, not when it
    compiles; most grammars that meet them do so at once (a choice of 2000 strings, an object of 550
    optional properties, 2001 alternatives), and are refused here instead of failing mid-answer. Returns the
    engine's error, or None."""
    first = matcher.deep_copy()
    mask = first.compute_bitmask()
    if first.is_error():
        error = first.get_error()
        if error.startswith("NoExtensionBias"):  # nothing can be written that the grammar could ever finish
            return "it allows no output that can be finished (a schema that refers to itself with no end?)"
        return error
    allowed = _allowed_ids(mask)
    if allowed.size == 0:
        return "the grammar allows no first token"
    for start in allowed[np.linspace(0, allowed.size - 1, min(PROBE_WALKS, allowed.size)).astype(int)]:
        walker, token = matcher.deep_copy(), int(start)
        for _ in range(PROBE_DEPTH):
            if not walker.consume_token(token) or walker.is_error():
                return walker.get_error()
            if walker.is_stopped():
                break
            mask = walker.compute_bitmask()
            if walker.is_error():
                return walker.get_error()
            ids = _allowed_ids(mask)
            if ids.size == 0:
                break
            token = int(ids[ids.size // 2])
    return None


class GrammarCompiler:
    """Compiles grammars against the model's vocabulary, with a cache by source.

    The tokenizer view takes about 1-2 s to build for a 150k vocabulary (benchmarks/grammar_bench.py), so the
    engine builds it at start-up (:meth:`warm_up`, in a thread while the worker loads the model) rather than
    in the first constrained request. Thread-safe; call :meth:`compile` off the event loop.
    """

    def __init__(
        self,
        tokenizer_json: Callable[[], str],
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        limits: GrammarLimits | None = None,
    ):
        self.limits = limits = limits or GrammarLimits()
        self._pool = concurrent.futures.ThreadPoolExecutor(limits.compile_threads, thread_name_prefix="a8w8-grammar")
        self.waiting = 0  # compiles submitted and not started
        self.compiling = 0  # compiles running on the compile threads
        self._refused: OrderedDict[str, str] = OrderedDict()  # source digest -> why it was refused (over budget)
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._unavailable: str | None = None  # why this model's vocabulary has no grammar view (kept: not rebuilt)
        self._lock = threading.Lock()
        self._cache: OrderedDict[Grammar, CompiledGrammar] = OrderedDict()
        self._vocabulary: VocabularyDigits | None = None  # built with the first JSON grammar

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

    def _vocabulary_digits(self, tokenizer: llguidance.LLTokenizer) -> VocabularyDigits:
        with self._lock:
            if self._vocabulary is None:
                self._vocabulary = VocabularyDigits(tokenizer, self._vocab_size)
            return self._vocabulary

    def warm_up(self) -> None:
        """Build the vocabulary's views and compile one JSON grammar now, so that the first constrained request
        does not wait for them (about 1 s for a 150k vocabulary). Nothing happens for a model whose vocabulary
        has no grammar view: its requests are refused as they come."""
        try:
            self.compile(json_schema_grammar({"type": "object"})).matcher().bitmask()
        except GrammarError:
            pass

    def submit(self, grammar: Grammar) -> concurrent.futures.Future[CompiledGrammar]:
        """Compile ``grammar`` on the compile threads (a future; cancelling it before it starts drops it). A
        grammar cached, refused before, or over the size budget is answered at once (GrammarError); past
        :attr:`GrammarLimits.max_queued` waiting compiles, GrammarBusy."""
        done: concurrent.futures.Future[CompiledGrammar] = concurrent.futures.Future()
        hit = self._known(grammar)
        if hit is not None:
            done.set_result(hit)
            return done
        with self._lock:
            if self.waiting >= self.limits.max_queued:
                raise GrammarBusy(
                    f"{self.waiting} grammars are waiting to be compiled (the limit is {self.limits.max_queued})"
                )
            self.waiting += 1

        def run() -> CompiledGrammar:
            with self._lock:
                self.waiting -= 1
                self.compiling += 1
            try:
                return self.compile(grammar)
            finally:
                with self._lock:
                    self.compiling -= 1

        future = self._pool.submit(run)
        future.add_done_callback(lambda f: self._unqueue_cancelled(f))
        return future

    def _unqueue_cancelled(self, future: concurrent.futures.Future) -> None:
        if future.cancelled():  # never started: it no longer waits
            with self._lock:
                self.waiting -= 1

    def _known(self, grammar: Grammar) -> CompiledGrammar | None:
        """The cached compile of ``grammar``; GrammarError for one over the size budget or refused before."""
        size = len(grammar.source.encode("utf-8", "surrogatepass"))
        if size > self.limits.max_source_bytes:
            raise GrammarError(
                f"the grammar is {size} bytes in the grammar engine's form, over the server's limit of "
                f"{self.limits.max_source_bytes} (--max-grammar-bytes)"
            )
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                return hit
            refused = self._refused.get(_digest(grammar))
        if refused is not None:
            raise GrammarError(refused)
        return None

    def compile(self, grammar: Grammar) -> CompiledGrammar:
        """Compile in this thread. Raises GrammarError with the grammar engine's reason when the grammar is
        invalid, or when it is over a budget of :attr:`limits`."""
        hit = self._known(grammar)
        if hit is not None:
            return hit
        tokenizer = self._llg_tokenizer()
        started = time.thread_time()  # (llguidance computes in this thread, with the GIL released)
        compiled = self._compile(grammar, tokenizer)
        spent = time.thread_time() - started
        if spent > self.limits.max_compile_cpu_seconds:
            reason = (
                f"compiling the grammar took {spent:.1f} s of CPU, over the server's budget of "
                f"{self.limits.max_compile_cpu_seconds:g} s per grammar (--grammar-compile-budget)"
            )
            with self._lock:  # a repeat is refused at once
                self._refused[_digest(grammar)] = reason
                while len(self._refused) > GRAMMAR_CACHE_SIZE:
                    self._refused.popitem(last=False)
            raise GrammarError(reason)
        if len(grammar.source) <= GRAMMAR_CACHE_MAX_SOURCE_CHARS:
            with self._lock:
                self._cache[grammar] = compiled
                while len(self._cache) > GRAMMAR_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return compiled

    def _compile(self, grammar: Grammar, tokenizer: llguidance.LLTokenizer) -> CompiledGrammar:
        matcher = llguidance.LLMatcher(tokenizer, grammar.source, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error().splitlines()[0])
        failure = _probe(matcher)
        if failure is not None:
            raise GrammarError(f"the grammar engine cannot follow this grammar: {failure.splitlines()[0]}")
        vocabulary = self._vocabulary_digits(tokenizer) if grammar.json_numbers else None
        return CompiledGrammar(matcher, grammar, vocabulary)
