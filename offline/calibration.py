"""The float model's pass over the calibration text (``loaders/assets/eval/calibration.txt``, self-written and
disjoint from the evaluation text), which SmoothQuant's activation ranges and GPTQ's Hessians are taken from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from engine.tokenizer import load_tokenizer
from loaders.assets import calibration_text_path
from npu.config import WorkerConfig
from npu.model import ForwardBatch, SeqSpan
from npu.runner import ModelRunner

CALIBRATION_CHUNK = 512  # tokens per calibration forward


def calibration_pass(model_dir: Path, hook: Callable[[ModelRunner], None], desc: str) -> None:
    """Load ``model_dir`` in float32 (the Python layer loop, whose linear ops ``hook`` may wrap before the pass),
    then run it over the calibration text in chunks of CALIBRATION_CHUNK tokens."""
    ids = load_tokenizer(model_dir).encode(calibration_text_path().read_text(encoding="utf-8"))
    runner = ModelRunner(
        WorkerConfig(
            model_dir=str(model_dir),
            quantization="none",
            kv_cache_dtype="fp32",
            dtype="float32",
            kv_cache_memory_bytes=256 << 20,
            max_model_len=max(CALIBRATION_CHUNK, 64) + 16,
        )
    )
    runner.model.decode_stack = None
    hook(runner)
    for start in tqdm(range(0, len(ids), CALIBRATION_CHUNK), desc=desc, unit="chunk", disable=None):
        chunk = ids[start : start + CALIBRATION_CHUNK]
        n = len(chunk)
        pos = torch.arange(n)
        batch = ForwardBatch(torch.tensor(chunk), pos, pos, [SeqSpan(0, n, pos)], torch.tensor([n - 1]))
        runner.model.forward(batch, runner.cache)
