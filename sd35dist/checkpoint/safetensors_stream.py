"""A safetensors file written one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape
and byte range, plus `__metadata__` of str → str) and the tensors' bytes back to back. The
header needs only shapes and dtypes, so it is written first and the tensors follow as they are
made: the writer never holds more than the tensor it is writing. `safetensors.torch.save_file`
needs the whole dict in memory, which for SD3.5 Large is 16 GB in bf16.

The file appears complete or not at all: it is written under a hidden name beside the target
and renamed when every tensor is in.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sd35dist.runtime.atomic_files import temporary_name

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
HEADER_ALIGNMENT = 8


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


def header_bytes(specs: Iterable[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """The length prefix and JSON header for `specs` in order, padded so the data starts 8-aligned."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


def write_streaming(path: Path, specs: list[TensorSpec], make: Callable[[TensorSpec], torch.Tensor],
                    metadata: Mapping[str, str]) -> int:
    """Write `path` with `make(spec)` called once per spec, in order; returns the file's size.

    The tensor `make` returns must have the spec's shape and dtype (checked: a wrong one would
    shift every later tensor's bytes).
    """
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("a tensor name appears twice")
    temporary = temporary_name(path)
    try:
        with open(temporary, "wb") as handle:
            handle.write(header_bytes(specs, metadata))
            for spec in specs:
                tensor = make(spec)
                if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                    raise ValueError(f"{spec.name}: made {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"the header says {spec.shape} {spec.dtype}")
                handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del tensor
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return size
