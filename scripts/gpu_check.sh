#!/usr/bin/env bash
# The CUDA backend's checks on a lent GPU machine, one stage per device-tool call, each stage's timeouts adding
# up to less than the tool's 10-minute command limit. A session has 15 minutes of device time, machine start
# included, so plan two calls (their timeouts are upper bounds): `kernels bench-small`, then `bench-14b`; `suite` needs a session of its own.
# Prepare here first (./scripts/gpu_wheels.sh), then run through the device tool with carry [".whl"]:
#     scripts/gpu_check.sh kernels bench-small   (kernel tests on the GPU; worker_bench on the 0.6B shape)
#     scripts/gpu_check.sh bench-14b             (writes a 14B-shaped W8A8 model, then worker_bench on it)
#     scripts/gpu_check.sh cpu-scaling           (the CPU backend on that host at 1, 2, 4, 8, 16 threads)
#     scripts/gpu_check.sh suite                 (the test suite with the GPU visible: --device auto = cuda)
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
  timeout 240 python3 -m pytest -q -rfE --durations=10 -p no:cacheprovider tests/integration/test_cuda_kernels.py 2>&1 | tee "$OUT/kernel-tests.log"
}

stage_bench-small() {  # decode at batch 1/16/64, prefill, HBM bandwidth and the INT8 roof on the 0.6B shape
  timeout 150 python3 benchmarks/worker_bench.py --device cuda --shape 0.6b --steps 32 \
    --out "$OUT/worker-0.6b.json" 2>&1 | tee "$OUT/worker-0.6b.log"
  timeout 90 python3 benchmarks/decode_profile.py --device cuda --shape 0.6b > "$OUT/decode-profile.txt" 2>&1
}

stage_bench-14b() {  # the same on a Qwen3-14B-shaped random W8A8 model (14.8 GB of INT8 linears)
  timeout 240 python3 benchmarks/make_bench_models.py --shape 14b --dir /tmp/bench-models 2>&1 | tail -2
  timeout 300 python3 benchmarks/worker_bench.py --device cuda --shape 14b --steps 32 \
    --model /tmp/bench-models/qwen3-14b-shaped-w8a8 --out "$OUT/worker-14b.json" 2>&1 | tee "$OUT/worker-14b.log"
}

stage_cpu-scaling() {  # the CPU backend on the lent machine's host: worker_bench at 1, 2, 4, 8 and 16 threads
  local dir=/tmp/cpu-scaling  # the device tool returns at most 8 files: the JSONs come back as one tar
  mkdir -p "$dir"
  lscpu > "$dir/lscpu.txt" 2>&1
  for t in 1 2 4 8 16; do
    timeout 90 python3 benchmarks/worker_bench.py --device cpu --shape 0.6b --steps 8 --prefill-tokens 512 \
      --num-threads "$t" --out "$dir/cpu-threads-$t.json" 2>&1 | tee -a "$OUT/cpu-scaling.log"
  done
  tar -C "$dir" -cf "$OUT/cpu-scaling.tar" .
}

stage_suite() {  # the README's suite minus what needs a browser, HAProxy or the deploy linters (not on that image)
  timeout 560 python3 -m pytest -q -x -p no:cacheprovider tests/unit tests/integration 2>&1 | tee "$OUT/suite.log"
}

for stage in "${@:-kernels}"; do
  "stage_$stage"
done
