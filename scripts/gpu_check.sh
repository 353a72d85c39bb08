#!/usr/bin/env bash
# The CUDA backend's checks on a lent GPU machine, as one call per stage (each well inside the device tool's
# 10-minute command limit; about 15 minutes of GPU time in all). Prepare here first: ./scripts/gpu_wheels.sh,
# then run through the device tool with carry [".whl"], e.g.
#     scripts/gpu_check.sh kernels bench     (~6 min: kernel tests on the GPU, worker_bench 0.6B and 14B shapes)
#     scripts/gpu_check.sh suite             (~8 min: the test suite with the GPU visible: --device auto = cuda)
# Results (logs, JSON) go to $OUT (the device tool's folder) or ./gpu-results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1
python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"

stage_kernels() {  # every kernel and configuration on the GPU against the reference, the model, the server
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py 2>&1 | tee "$OUT/kernel-tests.log"
}

stage_bench() {  # decode at batch 1/16/64, prefill, HBM bandwidth and the INT8 roof, on 0.6B and 14B shapes
  timeout 200 python3 benchmarks/worker_bench.py --device cuda --shape 0.6b --steps 32 \
    --out "$OUT/worker-0.6b.json" 2>&1 | tee "$OUT/worker-0.6b.log"
  timeout 240 python3 benchmarks/make_bench_models.py --shape 14b --dir /tmp/bench-models 2>&1 | tail -2
  timeout 300 python3 benchmarks/worker_bench.py --device cuda --shape 14b --steps 32 \
    --model /tmp/bench-models/qwen3-14b-shaped-w8a8 --out "$OUT/worker-14b.json" 2>&1 | tee "$OUT/worker-14b.log"
}

stage_suite() {  # the README's suite minus what needs a browser, HAProxy or the deploy linters (not on that image)
  timeout 560 python3 -m pytest -q -x -p no:cacheprovider --ignore=tests/test_web_ui.py \
    --ignore=tests/test_router.py --ignore=tests/test_deploy.py 2>&1 | tee "$OUT/suite.log"
}

for stage in "${@:-kernels}"; do
  "stage_$stage"
done
