"""Full tensors by name, read one at a time: what the single-file export and `inspect` stream from.

A `TensorSource` knows every tensor's shape and dtype from headers and metadata alone, and
reads a tensor only when asked, so a reader holds one tensor (plus what its format forces) at
a time, without a process group or a GPU:

- `SafetensorsFiles`: a diffusers folder (sharded or not), a single file, a LoRA file;
- `OriginalLayoutView`: an original-layout (SD3.5 single-file) MMDiT under diffusers' names;
- a checkpoint's readers live with its format: fsdp2_files.DcpTensors, zero_files.ZeroTensors
  (weights.open_weights picks the one COMPLETE names).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from sd35dist.checkpoint.layout import CheckpointUnreadable
from sd35dist.checkpoint.safetensors_stream import DTYPE_NAMES


class TensorSource(Protocol):
    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name → (shape, dtype) for every tensor, without reading any."""
        ...

    def get(self, name: str) -> torch.Tensor: ...


class SafetensorsFiles:
    """Tensors of one or more safetensors files (a diffusers folder's shards, or one file)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self._where: dict[str, Path] = {}
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.metadata: dict[str, str] = {}
        for path in files:
            with _opened(path) as handle:
                self.metadata.update(handle.metadata() or {})
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    self._where[key] = path
                    self._specs[key] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES[piece.get_dtype()])

    @classmethod
    def folder(cls, folder: Path) -> SafetensorsFiles:
        """A diffusers model folder: its index's shards, or its one `*.safetensors`."""
        index = sorted(folder.glob("*.safetensors.index.json"))
        if index:
            try:
                names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise CheckpointUnreadable(f"{index[0]}: not a readable safetensors index") from None
            return cls([folder / name for name in names])
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointUnreadable(f"{folder}: no .safetensors weights in it")
        return cls(files)

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return dict(self._specs)

    def get(self, name: str) -> torch.Tensor:
        with _opened(self._where[name]) as handle:
            return handle.get_tensor(name)


_SAFETENSORS_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """safe_open, with a file that is missing, empty, cut short or not safetensors at all as CheckpointUnreadable."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointUnreadable(f"{path}: missing (a shard of this model is not there)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield handle
    except (SafetensorError, OSError) as err:
        size = path.stat().st_size
        raise CheckpointUnreadable(f"{path}: not a readable safetensors file ({size} bytes: "
                                   f"{' '.join(str(err).split())})") from None


def block_group(name: str) -> str:
    """`transformer_blocks.N.` for a block's tensor, "" for the embedders and the final layer."""
    match = re.match(r"transformer_blocks\.\d+\.", name)
    return match.group(0) if match else ""


class OriginalLayoutView:
    """An original-layout file's MMDiT under diffusers' names (q, k, v split from qkv, adaLN halves
    swapped back), so it compares with a diffusers folder or a checkpoint; other keys (the VAE,
    text encoders) keep their own names."""

    def __init__(self, source: TensorSource) -> None:
        from sd35dist.checkpoint.original_layout import TRANSFORMER_PREFIX, config_from_original_keys, transformer_plan

        self.source = source
        original = source.specs()
        ours = [key for key in original if key.startswith(TRANSFORMER_PREFIX)]
        plan = transformer_plan(config_from_original_keys(ours), None)
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._origin: dict[str, tuple[str, str, int]] = {}
        for tensor in plan:
            if tensor.name not in original:
                raise CheckpointUnreadable(f"{tensor.name}: missing from the file (not a complete SD3 MMDiT)")
            shape, dtype = original[tensor.name]
            for index, name in enumerate(tensor.sources):
                part_shape = (shape[0] // len(tensor.sources), *shape[1:]) if tensor.op == "qkv" else shape
                self._specs[name] = (tuple(part_shape), dtype)
                self._origin[name] = (tensor.name, tensor.op, index)
        planned = {tensor.name for tensor in plan}
        self._specs.update({key: spec for key, spec in original.items() if key not in planned})

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return dict(self._specs)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._origin:
            return self.source.get(name)
        original, op, index = self._origin[name]
        tensor = self.source.get(original)
        if op == "qkv":
            return tensor.chunk(3, dim=0)[index].clone()
        if op == "swap_halves":
            first, second = tensor.chunk(2, dim=0)
            return torch.cat([second, first], dim=0)
        return tensor
