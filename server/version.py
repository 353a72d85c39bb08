"""The installed package's version (``a8w8-serve --version``, ``/version``, the OpenAPI document)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

PACKAGE_NAME = "a8w8-serve"


def package_version() -> str:
    try:
        return version(PACKAGE_NAME)
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+local"
