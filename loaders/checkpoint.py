"""Reading safetensors checkpoints (single file or sharded with an index), with errors that name things."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is broken: the message names the file, the tensor and what was expected."""


class CheckpointReader:
    """Memory-mapped access to the tensors of a checkpoint directory; each file is opened once."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._tensor_file: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self.read: set[str] = set()  # names get() has returned
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            for tensor, shard in weight_map.items():
                path = self.model_dir / shard
                if not path.is_file():
                    raise CheckpointError(f"{index}: tensor {tensor!r} is mapped to shard {shard!r}, which does not exist")
                self._tensor_file[tensor] = path
            for path in sorted(set(self._tensor_file.values())):
                self._open(path)
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.model_dir}: no *.safetensors files and no {INDEX_FILE}")
            for path in files:
                handle = self._open(path)
                for tensor in handle.keys():
                    self._tensor_file[tensor] = path

    def _open(self, path: Path):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError for truncated/corrupt headers
            raise CheckpointError(f"{path}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None
        self._handles[path] = handle
        return handle

    def keys(self) -> list[str]:
        return list(self._tensor_file)

    def check_all_read(self, ignorable: tuple[str, ...] = ()) -> None:
        """Refuse a checkpoint with tensors nobody read (e.g. biases its config does not announce): what the
        model would compute without them is not what the checkpoint means. ``ignorable``: regexes of
        tensors that are known to be redundant."""
        unread = sorted(n for n in self._tensor_file if n not in self.read
                        and not any(re.fullmatch(p, n) for p in ignorable))
        if unread:
            more = f" and {len(unread) - 1} more" if len(unread) > 1 else ""
            raise CheckpointError(f"{self._tensor_file[unread[0]]}: tensor {unread[0]!r}{more} is not part of the "
                                  "model config.json describes (a field the config lacks, or another architecture?)")

    def has(self, name: str) -> bool:
        return name in self._tensor_file

    def file_of(self, name: str) -> Path:
        return self._tensor_file[name]

    def get(
        self,
        name: str,
        shape: tuple[int, ...] | None = None,
        dtypes: tuple[torch.dtype, ...] | None = None,
    ) -> torch.Tensor:
        """Load one tensor, checking its shape and dtype; errors name file, tensor, expected and found."""
        path = self._tensor_file.get(name)
        if path is None:
            where = self.model_dir / INDEX_FILE if (self.model_dir / INDEX_FILE).is_file() else self.model_dir
            expected = f" (expected shape {list(shape)})" if shape is not None else ""
            raise CheckpointError(f"{where}: missing tensor {name!r}{expected}")
        handle = self._handles[path]
        self.read.add(name)
        try:
            tensor = handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e}); is the file truncated?") from None
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}"
            )
        if dtypes is not None and tensor.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected {allowed}"
            )
        return tensor
