"""The names of the load options (how linears run, the dtype of the float parts), without importing torch:
the CLI offers them as choices, and ``a8w8-serve --help`` should not pay for loading torch."""

from __future__ import annotations

from enum import StrEnum


class Quantization(StrEnum):
    """How linear layers are executed: ``auto`` = whatever the checkpoint is, A8W8 for float checkpoints."""

    AUTO = "auto"
    A8W8 = "a8w8"
    NONE = "none"


# dtypes the float parts (embedding, norms, float linears) can be converted to with --dtype.
FLOAT_DTYPE_NAMES = ("bfloat16", "float16", "float32")
