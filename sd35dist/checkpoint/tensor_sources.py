"""Full tensors by name, read one at a time: what the single-file export and `inspect` stream from.

A `TensorSource` knows every tensor's shape and dtype from headers and metadata alone, and
reads a tensor only when asked, so a reader holds one tensor (plus what its format forces) at
a time, without a process group or a GPU:

- `SafetensorsFiles`: a diffusers folder (sharded or not), a single file, a LoRA file;
- `DcpTensors`: an FSDP2 checkpoint (torch.distributed.checkpoint), read item by item through
  the allow-listed metadata reader (dcp_reader.py): DCP reads only the requested byte ranges;
- `ZeroTensors`: a DeepSpeed ZeRO-2/3 checkpoint through DeepSpeed's lazy reader (optimizer
  files memory-mapped; ZeRO-2's model-states file is read whole by DeepSpeed), and the EMA
  from our per-rank EMA files, gathered per tensor.

Each strategy's `read_lazy` returns its reader; inspect.open_checkpoint picks the strategy.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from sd35dist.checkpoint.layout import CheckpointUnreadable
from sd35dist.checkpoint.safetensors_stream import DTYPE_NAMES
from sd35dist.models.state_keys import plain_name


class TensorSource(Protocol):
    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name → (shape, dtype) for every tensor, without reading any."""
        ...

    def get(self, name: str) -> torch.Tensor: ...


class SafetensorsFiles:
    """Tensors of one or more safetensors files (a diffusers folder's shards, or one file)."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

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
    def folder(cls, folder: Path) -> "SafetensorsFiles":
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


class DcpTensors:
    """The model (or, with `use_ema`, the EMA over the model's buffers) of an FSDP2 checkpoint."""

    def __init__(self, directory: Path, use_ema: bool) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from sd35dist.checkpoint.dcp_reader import MetadataCheckedReader, UnsafeMetadata, missing_storage

        if not (directory / ".metadata").is_file():
            raise CheckpointUnreadable(f"{directory.parent}: no {directory.name}/.metadata: the checkpoint's weights "
                                       f"are missing (copied without its {directory.name}/ directory?)")
        self.directory = directory
        try:
            metadata = MetadataCheckedReader(str(directory)).read_metadata()
        except (UnsafeMetadata, pickle.UnpicklingError, EOFError) as err:
            raise CheckpointUnreadable(f"{directory / '.metadata'}: not readable as DCP metadata ({err})") from None
        problem = missing_storage(directory, metadata)
        if problem:
            raise CheckpointUnreadable(f"{directory.parent}: broken checkpoint: {problem}")
        self._keys: dict[str, str] = {}
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for prefix in ("model", "ema") if use_ema else ("model",):
            for key, meta in metadata.state_dict_metadata.items():
                if key.startswith(prefix + ".") and isinstance(meta, TensorStorageMetadata):
                    name = plain_name(key[len(prefix) + 1:])
                    self._keys[name] = key  # the EMA's entries replace the model's
                    self._specs[name] = (tuple(meta.size), meta.properties.dtype)
        if not self._keys:
            raise CheckpointUnreadable(f"{directory}: no 'model' tensors in this checkpoint")
        self._group: str | None = None
        self._block: dict[str, torch.Tensor] = {}
        if use_ema and not any(key.startswith("ema.") for key in self._keys.values()):
            raise CheckpointUnreadable(f"{directory.parent}: no EMA in this checkpoint (train.ema.enabled was false)")

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return dict(self._specs)

    def get(self, name: str) -> torch.Tensor:
        # One dcp.load per transformer block, not per tensor: each call re-plans the whole read,
        # which made a tiny model's export take seconds per block. Memory: one block's tensors.
        group = block_group(name)
        if group != self._group:
            self._group, self._block = None, {}
            self._block = self._load([key for key in self._keys if block_group(key) == group])
            self._group = group
        return self._block[name]

    def _load(self, names: list[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        from sd35dist.checkpoint.dcp_reader import MetadataCheckedReader

        targets = {self._keys[name]: torch.empty(self._specs[name][0], dtype=self._specs[name][1]) for name in names}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process is the point
            try:
                dcp.load(targets, storage_reader=MetadataCheckedReader(str(self.directory)), no_dist=True)
            except CheckpointException as err:
                raise CheckpointUnreadable(f"{self.directory.parent}: weights unreadable: {err}") from None
        return {name: targets[self._keys[name]] for name in names}


class ZeroTensors:
    """The fp32 master weights (or, with `use_ema`, the EMA) of a DeepSpeed ZeRO-2/3 checkpoint."""

    def __init__(self, checkpoint: Path, use_ema: bool, *, tag: str, ema_files: str, ema_layout_key: str) -> None:
        """`tag`: DeepSpeed's folder in the checkpoint; `ema_files`: the glob of the per-rank EMA
        files, whose metadata under `ema_layout_key` says which slice of each tensor they hold."""
        if not (checkpoint / tag).is_dir():
            raise CheckpointUnreadable(f"{checkpoint}: no DeepSpeed checkpoint ({tag}/) in it")
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with zero_files_read(checkpoint):
            self._lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag, lazy_mode=True)
        self._ema: dict[str, list[tuple[Path, int, int]]] = {}
        self._ema_shapes: dict[str, tuple[int, ...]] = {}
        if use_ema:
            from safetensors import safe_open

            files = sorted(checkpoint.glob(ema_files))
            if not files:
                raise CheckpointUnreadable(f"{checkpoint}: no EMA in this checkpoint (train.ema.enabled was false)")
            for path in files:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for name, (start, numel, shape) in json.loads(handle.metadata()[ema_layout_key]).items():
                        self._ema.setdefault(name, []).append((path, start, numel))
                        self._ema_shapes[name] = tuple(shape)

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        specs = {name: (tuple(t.shape), t.dtype) for name, t in self._lazy.items()}
        specs.update({name: (shape, torch.float32) for name, shape in self._ema_shapes.items()})
        return specs

    def get(self, name: str) -> torch.Tensor:
        if name in self._ema:
            from safetensors import safe_open

            full = torch.zeros(self._ema_shapes[name], dtype=torch.float32)
            for path, start, numel in self._ema[name]:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    full.view(-1)[start: start + numel] = handle.get_tensor(name)[:numel]
            return full
        tensor = self._lazy[name]
        return tensor if isinstance(tensor, torch.Tensor) else tensor.contiguous()


@contextlib.contextmanager
def zero_files_read(checkpoint: Path) -> Iterator[None]:
    """DeepSpeed reading a ZeRO checkpoint whose files are missing or cut short fails in many ways
    (its own ValueError, torch.load's RuntimeError, EOF): each is CheckpointUnreadable naming the checkpoint."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError) as err:
        raise CheckpointUnreadable(f"{checkpoint}: broken DeepSpeed checkpoint: {type(err).__name__}: "
                                   f"{' '.join(str(err).split())[:300]}") from None


class OriginalLayoutView:
    """An original-layout file's MMDiT under diffusers' names (q, k, v split from qkv, adaLN halves
    swapped back), so it compares with a diffusers folder or a checkpoint; other keys (the VAE,
    text encoders) keep their own names."""

    def __init__(self, source: TensorSource) -> None:
        from sd35dist.checkpoint.original_layout import (TRANSFORMER_PREFIX, config_from_original_keys,
                                                         transformer_plan)

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


def iter_tensors(source: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in name order, one tensor in memory at a time."""
    for name in sorted(source.specs()):
        yield name, source.get(name)
