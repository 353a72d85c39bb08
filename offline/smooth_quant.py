"""SmoothQuant-style activation smoothing before A8W8 quantization.

Per-token INT8 activations lose precision when a few hidden channels carry outliers. Smoothing moves
part of that range into the weights with per-input-channel factors ``s`` that leave the float model's
function unchanged: ``x W^T = (x / s)(W * s)^T``. ``1/s`` is folded into what produces ``x``: the RMSNorm
weight before q/k/v and before gate/up, and the rows of up_proj before down_proj (its input is
``silu(gate) * up``). ``s_j = max|x_j|^alpha / max|W_{:,j}|^(1-alpha)`` from a calibration pass of the float
model over ``loaders/assets/eval/calibration.txt`` (disjoint from the evaluation text).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from loaders.checkpoint import CheckpointReader
from loaders.config import ConfigError, load_model_config, read_json
from loaders.writer import DEFAULT_MAX_SHARD_BYTES, copy_side_files, quantize_checkpoint, save_tensors
from npu.backends.base import UnfusedLinear
from npu.runner import ModelRunner
from offline.calibration import calibration_pass

# Migration strength: 0.5 is the SmoothQuant paper's default; on SmolLM2-135M 0.7 did better in a
# development comparison of the two (eval-quality reports the 0.7 result against unsmoothed A8W8).
DEFAULT_ALPHA = 0.7
MIN_FACTOR = 1e-5  # keeps factors of dead channels finite


class _Recorder:
    """Hooks a float linear op's GEMM (its input after any norm / gate prologue) and keeps the running
    per-input-channel max of |x|."""

    def __init__(self, op: UnfusedLinear):
        self.gemm = op.gemm
        self.absmax: torch.Tensor | None = None
        op.gemm = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.abs().amax(0).float()
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        return self.gemm(x)


def activation_ranges(model_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Per layer: max |x| per input channel of the qkv, gate_up and down projections (float model)."""
    recorders: list[dict[str, _Recorder]] = []

    def hook(runner: ModelRunner) -> None:
        for layer in runner.model.layers:
            recorders.append({name: _Recorder(getattr(layer, name)) for name in ("qkv", "gate_up", "down")})

    calibration_pass(model_dir, hook, "SmoothQuant calibration")
    return [{name: r.absmax for name, r in rec.items()} for rec in recorders]


def _factors(act: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    wmax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)
    s = act.clamp(min=MIN_FACTOR).pow(alpha) / wmax.clamp(min=MIN_FACTOR).pow(1 - alpha)
    return s.clamp(min=MIN_FACTOR)


def smooth_checkpoint(src: str | Path, dst: str | Path, alpha: float = DEFAULT_ALPHA) -> Path:
    """Write ``dst``: the float checkpoint ``src`` with smoothing folded in (same function in float)."""
    src, dst = Path(src), Path(dst)
    load_model_config(src)  # fail early, with the config's own message, on an unsupported model
    if (read_json(src / "config.json").get("quantization_config") or {}).get("transform_config"):
        # down_proj's smoothing factors fold into up_proj's rows, before the online rotation of its input
        raise ConfigError(
            f"{src / 'config.json'}: quantization_config.transform_config: this checkpoint is rotated; smooth "
            "before rotating (quantize --smooth-quant --rotate does both in that order)"
        )
    ranges = activation_ranges(src)
    reader = CheckpointReader(src)
    t = {name: reader.get(name) for name in reader.keys()}
    for i, r in enumerate(ranges):
        p = f"model.layers.{i}"
        qkv = [t[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv"]
        s = _factors(r["qkv"], qkv, alpha)
        t[f"{p}.input_layernorm.weight"] = (t[f"{p}.input_layernorm.weight"].float() / s).to(qkv[0].dtype)
        for x in "qkv":
            w = t[f"{p}.self_attn.{x}_proj.weight"]
            t[f"{p}.self_attn.{x}_proj.weight"] = (w.float() * s[None, :]).to(w.dtype)
        gu = [t[f"{p}.mlp.gate_proj.weight"], t[f"{p}.mlp.up_proj.weight"]]
        s = _factors(r["gate_up"], gu, alpha)
        t[f"{p}.post_attention_layernorm.weight"] = (t[f"{p}.post_attention_layernorm.weight"].float() / s).to(
            gu[0].dtype
        )
        for x in ("gate", "up"):
            w = t[f"{p}.mlp.{x}_proj.weight"]
            t[f"{p}.mlp.{x}_proj.weight"] = (w.float() * s[None, :]).to(w.dtype)
        down = t[f"{p}.mlp.down_proj.weight"]
        s = _factors(r["down"], [down], alpha)
        up = t[f"{p}.mlp.up_proj.weight"]
        t[f"{p}.mlp.up_proj.weight"] = (up.float() / s[:, None]).to(up.dtype)
        if f"{p}.mlp.up_proj.bias" in t:  # (Llama with mlp_bias) up's whole output is scaled by 1/s
            b = t[f"{p}.mlp.up_proj.bias"]
            t[f"{p}.mlp.up_proj.bias"] = (b.float() / s).to(b.dtype)
        t[f"{p}.mlp.down_proj.weight"] = (down.float() * s[None, :]).to(down.dtype)
    save_tensors(t, dst)
    raw = read_json(src / "config.json")
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    copy_side_files(src, dst)
    return dst


def smooth_and_quantize(
    src: str | Path,
    dst: str | Path,
    alpha: float = DEFAULT_ALPHA,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ignore: tuple[str, ...] = (),
    float_dtype: str = "auto",
) -> Path:
    """Smoothed, then written as compressed-tensors W8A8 (the smoothed float copy is removed); ``ignore`` and
    ``float_dtype`` as in :func:`loaders.writer.quantize_checkpoint`."""
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".smoothed")
    smooth_checkpoint(src, tmp, alpha)
    quantize_checkpoint(tmp, dst, max_shard_bytes, ignore, float_dtype)
    shutil.rmtree(tmp)
    return dst
