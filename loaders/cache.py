"""Where a8w8-serve keeps what it builds on first use (converted models, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "A8W8_SERVE_CACHE"  # documented override of the cache directory


def cache_dir() -> Path:
    """``$A8W8_SERVE_CACHE``, else ``$XDG_CACHE_HOME/a8w8-serve``, else ``~/.cache/a8w8-serve``."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "a8w8-serve"
    )
    return Path(base)
