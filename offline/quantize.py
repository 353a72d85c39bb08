"""``a8w8-serve quantize``'s pipeline: a float checkpoint to compressed-tensors W8A8, through the optional
offline steps, in the one order in which each keeps the float model's function: SmoothQuant smoothing
(its factors fold into the norms), Hadamard rotation (which folds the norms into the linears), then INT8
rounding of the weights, to nearest or by GPTQ (under Hessians of the model as the earlier steps left it).
Intermediate float copies are written next to ``dst`` and removed."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from loaders.writer import DEFAULT_MAX_SHARD_BYTES, quantize_checkpoint
from offline.rotate import RotationPlan, rotate_checkpoint


@dataclass(frozen=True)
class QuantizeRecipe:
    """What is done to the float weights before they are written as INT8."""

    smooth_alpha: float | None = None  # SmoothQuant's migration strength; None: no smoothing
    rotation: RotationPlan | None = None  # None: no rotation
    gptq: bool = False  # GPTQ rounding instead of round-to-nearest


def quantize_with_recipe(
    src: str | Path,
    dst: str | Path,
    recipe: QuantizeRecipe,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ignore: tuple[str, ...] = (),
    float_dtype: str = "auto",
) -> Path:
    """Write ``dst`` from the float checkpoint ``src`` per ``recipe``; ``ignore`` and ``float_dtype`` as in
    :func:`loaders.writer.quantize_checkpoint`."""
    from offline.smooth_quant import smooth_checkpoint

    dst = Path(dst)
    source, scratch = Path(src), []
    if recipe.smooth_alpha is not None:
        source = smooth_checkpoint(source, dst.with_name(dst.name + ".smoothed"), recipe.smooth_alpha)
        scratch.append(source)
    if recipe.rotation is not None:
        source = rotate_checkpoint(source, dst.with_name(dst.name + ".rotated"), recipe.rotation)
        scratch.append(source)
    rounding = None
    if recipe.gptq:
        from offline.gptq import gptq_rounding

        rounding = gptq_rounding(source)
    quantize_checkpoint(source, dst, max_shard_bytes, ignore, float_dtype, rounding)
    for path in scratch:
        shutil.rmtree(path)
    return dst
