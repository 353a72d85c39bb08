"""Resident memory of a running server (API process + worker), to size a container's memory request.

    python benchmarks/serve_memory.py --model DIR [--kv-cache-memory 4GiB] [--out bench-results/serve_memory.json]

Starts ``a8w8-serve serve`` on the checkpoint, sends one chat request, then reads VmRSS and VmHWM (peak) of the
API process and of its worker from /proc. The KV pool is zeroed when the worker starts, so it is resident in
full from then on. Prints and writes JSON; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import free_port, wait_healthy, worker_pid  # noqa: E402

from a8w8_serve.flags import parse_size  # noqa: E402

MIB = 1 << 20


def proc_memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--kv-cache-memory", default="4GiB")
    ap.add_argument("--max-model-len", default="8192")
    ap.add_argument("--out", type=Path, default=Path("bench-results/serve_memory.json"))
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        *(sys.executable, "-m", "a8w8_serve", "serve", "--model", args.model, "--port", str(port)),
        *("--kv-cache-memory", args.kv_cache_memory, "--max-model-len", args.max_model_len),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(base, timeout=600, proc=proc)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        messages = [{"role": "user", "content": "Tell me about memory. " * 50}]
        r = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": model, "messages": messages, "max_tokens": 32},
            timeout=300,
        )
        r.raise_for_status()
        time.sleep(1.0)
        api, worker = proc_memory_mib(proc.pid), proc_memory_mib(worker_pid(proc.pid))
    finally:
        proc.terminate()
        proc.wait(60)
    weights = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors")) / MIB
    kv = parse_size(args.kv_cache_memory) / MIB
    total = api["VmRSS"] + worker["VmRSS"]
    result = {
        "model": args.model,
        "safetensors_mib": round(weights),
        "kv_cache_mib": round(kv),
        "api_rss_mib": round(api["VmRSS"]),
        "api_peak_mib": round(api["VmHWM"]),
        "worker_rss_mib": round(worker["VmRSS"]),
        "worker_peak_mib": round(worker["VmHWM"]),
        "total_rss_mib": round(total),
        "total_minus_weights_and_kv_mib": round(total - weights - kv),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
