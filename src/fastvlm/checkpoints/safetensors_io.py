"""Read tensors out of a .safetensors file one at a time with plain file reads.

This is why fastvlm reads weights itself (it uses ``safetensors`` only to write them): ``safe_open``
memory-maps the file, and every page a tensor touched stays resident and counted
against the process until the file is closed. When a tensor is kept as stored that
costs nothing extra, but the loader converts (dtype casts, training-form fusion in
float32), and then the mapped source and the converted copy are both resident:
converting a 384 MiB float32 file to bfloat16 peaked at 1128 MiB through ``safe_open``
against 832 MiB here (safetensors 0.8, VmHWM). Reading each tensor straight into its
own buffer keeps one copy. The header alone (``SafetensorsReader(path).entries``) is
what ``fastvlm info`` reads. The format is a little-endian u64 header length, a JSON
header with each tensor's dtype, shape and byte range, then the raw data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > 100_000_000:
                    raise ValueError("header too large")
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise CheckpointError(
                f"{self.path} is not a valid safetensors file ({exc}); re-download it"
            ) from exc
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.entries: dict[str, dict] = header
        self.size = self.path.stat().st_size

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if end - start != nbytes or self.data_start + end > self.size:
            raise CheckpointError(f"{self.path}: tensor {key!r} is truncated or corrupt; re-download")
        if nbytes:
            buffer = tensor.view(-1).view(torch.uint8).numpy()  # writable byte view of the tensor
            with open(self.path, "rb") as f:
                f.seek(self.data_start + start)
                if f.readinto(buffer) != nbytes:
                    raise CheckpointError(f"{self.path}: tensor {key!r} is truncated; re-download the file")
        return tensor
