"""What one request's grammar may cost the server (no heavy imports: the CLI reads the defaults for --help)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GrammarLimits:
    """What one request's grammar may cost the server. A grammar is compiled on the server's CPU, from what a
    client sent; these bound it, so that no client's grammars can starve the others (tokenization and the
    engine never wait behind a compile: compiles have threads of their own)."""

    max_source_bytes: int = 256 * 1024  # the grammar engine's form of it (a JSON schema, a Lark grammar)
    max_compile_cpu_seconds: float = 2.0  # CPU time to compile it and walk its first steps (then: a 400)
    compile_threads: int = 1  # grammars compiled at once (each holds a core while it compiles)
    max_queued: int = 16  # compiles waiting beyond these are refused with a 429
