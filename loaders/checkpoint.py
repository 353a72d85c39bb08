"""Reading safetensors checkpoints (single file or sharded with an index), with errors that name things."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype names (the format's specification)
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
# Tensors at least this large have their page-cache pages dropped once read (see _SafetensorsFile.read).
PAGE_CACHE_DROP_MIN_BYTES = 64 * 1024**2
# The format caps its JSON header at 100 MB; a larger length is a corrupt file, not a reason to allocate.
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint is broken: the message names the file, the tensor and what was expected."""


class _SafetensorsFile:
    """One safetensors file: ``u64`` little-endian header length, JSON header (dtype, shape, data_offsets into the
    data section per tensor), data. Tensors are read with ``pread`` into memory of their own: nothing is
    memory-mapped, so what the process holds is what it keeps (a mapped file's pages count as resident
    memory for as long as the mapping lives, which doubles the footprint of a model being repacked)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = -1
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER_BYTES:
                    raise ValueError(f"header length {n} is not plausible")
                header = json.loads(f.read(n))
            size = path.stat().st_size
            self.data_start = 8 + n
            self.entries = {k: v for k, v in header.items() if k != "__metadata__"}
            for name, e in self.entries.items():
                if e["dtype"] not in SAFETENSORS_DTYPES:
                    raise ValueError(f"tensor {name!r} has unknown dtype {e['dtype']!r}")
                if e["data_offsets"][1] > size - self.data_start:
                    raise ValueError(
                        f"tensor {name!r} ends at byte {self.data_start + e['data_offsets'][1]} of a {size}-byte file"
                    )
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:  # json errors are ValueErrors
            raise CheckpointError(f"{path}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None
        self._fd = os.open(path, os.O_RDONLY)

    def keys(self) -> list[str]:
        return list(self.entries)

    def in_file_order(self) -> list[str]:
        return sorted(self.entries, key=lambda name: self.entries[name]["data_offsets"][0])

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        tensor = torch.empty(e["shape"], dtype=SAFETENSORS_DTYPES[e["dtype"]])
        start, end = e["data_offsets"]
        if tensor.numel() * tensor.element_size() != end - start:
            raise CheckpointError(
                f"{self.path}: tensor {name!r}: {end - start} bytes of data for shape {e['shape']} "
                f"and dtype {e['dtype']}"
            )
        if tensor.numel():
            buf = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            offset, done = self.data_start + start, 0
            while done < len(buf):
                n = os.preadv(self._fd, [buf[done:]], offset + done)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: cannot read tensor {name!r}; is the file truncated?")
                done += n
            if done >= PAGE_CACHE_DROP_MIN_BYTES:
                # The data is in our own memory now: its page-cache copy only crowds a large model's load (the
                # kernel reclaiming it while we allocate ran reads at a third of the disk's speed).
                os.posix_fadvise(self._fd, offset, done, os.POSIX_FADV_DONTNEED)
        return tensor

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class CheckpointReader:
    """Read access to the tensors of a checkpoint directory (single file or shards + index); each file is
    opened once, and a tensor is read (not mapped) when asked for."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._tensor_file: dict[str, Path] = {}
        self._handles: dict[Path, _SafetensorsFile] = {}
        self._preloaded: dict[str, torch.Tensor] = {}
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
                    raise CheckpointError(
                        f"{index}: tensor {tensor!r} is mapped to shard {shard!r}, which does not exist"
                    )
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

    def _open(self, path: Path) -> _SafetensorsFile:
        handle = _SafetensorsFile(path)
        self._handles[path] = handle
        return handle

    def keys(self) -> list[str]:
        return list(self._tensor_file)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._preloaded.clear()

    def preload(self) -> None:
        """Read every tensor now, file by file in the order of their data. safetensors lays tensors out sorted by
        dtype and name, so reading them in model order alternates between distant regions of a file (a weight,
        then its scale): three times slower from disk than one sequential pass, measured on a 9 GB checkpoint.
        :meth:`get` then hands each tensor out once."""
        for handle in self._handles.values():
            for name in handle.in_file_order():
                if self._tensor_file.get(name) == handle.path:
                    self._preloaded[name] = handle.read(name)

    def check_all_read(self, ignorable: tuple[str, ...] = ()) -> None:
        """Refuse a checkpoint with tensors nobody read (e.g. biases its config does not announce): what the
        model would compute without them is not what the checkpoint means. ``ignorable``: regexes of
        tensors that are known to be redundant."""
        unread = sorted(
            n for n in self._tensor_file if n not in self.read and not any(re.fullmatch(p, n) for p in ignorable)
        )
        if unread:
            more = f" and {len(unread) - 1} more" if len(unread) > 1 else ""
            raise CheckpointError(
                f"{self._tensor_file[unread[0]]}: tensor {unread[0]!r}{more} is not part of the "
                "model config.json describes (a field the config lacks, or another architecture?)"
            )

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
        if name not in handle.entries:
            raise CheckpointError(f"{path}: the index maps tensor {name!r} to this file, which does not hold it")
        tensor = self._preloaded.pop(name, None)
        if tensor is None:
            tensor = handle.read(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
        if dtypes is not None and tensor.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected {allowed}"
            )
        return tensor
