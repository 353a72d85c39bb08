#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before scripts/gpu_check.sh goes to a lent GPU machine that cannot reach
# PyPI: downloads into .whl/ the CPython 3.12 wheels of what the server and its tests import and that GPU
# image lacks (it has torch, triton, transformers, tokenizers, safetensors, numpy, httpx, pytest, jinja2,
# prometheus-client), at the versions this checkout's .venv runs. .whl/ is git-ignored; carry it with the run.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(fastapi starlette sse-starlette uvicorn msgspec llguidance openai pydantic pydantic_core typing-inspection
      annotated-types annotated-doc gguf jiter httpx2 httpcore2 truststore opentelemetry-api sniffio)
spec=()
for p in "${pkgs[@]}"; do
  v=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")
  spec+=("$p==$v")
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform any -d .whl "${spec[@]}"
du -sh .whl && ls .whl
