"""Read a torch.distributed.checkpoint directory's `.metadata` without running pickled code.

DCP stores its metadata as a pickle, and `FileSystemReader.read_metadata` unpickles it with
plain `pickle.load`: a crafted `.metadata` runs whatever it names. `export` reads checkpoints
that may have come from elsewhere, so it reads them through `MetadataCheckedReader`, whose
unpickler builds only what DCP's metadata is made of (its dataclasses, torch dtypes, sizes,
layouts, paths) and refuses anything else. Tensors are then read by DCP with
`torch.load(weights_only=True)`.

Resuming training reads through the same allow-listed reader, and `TrustedLoadPlanner` loads
DCP's non-tensor entries (the optimizer's param groups: numbers, strings, tuples) with
`torch.load(weights_only=True)` where DCP's default planner uses `weights_only=False`.
"""

from __future__ import annotations

import builtins
import collections
import io
import pathlib
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem


class UnsafeMetadata(pickle.UnpicklingError):
    """`.metadata` names something DCP metadata never holds: it was not written by DCP alone."""


ALLOWED_BUILTINS = frozenset({"set", "frozenset", "slice", "complex"})
ALLOWED_PATHS = frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"})
STORAGE_INFO = ("torch.distributed.checkpoint.filesystem", "_StorageInfo")


def allowed_global(module: str, name: str) -> Any:
    """The object a pickle may name in DCP metadata, or UnsafeMetadata."""
    if module == dcp_metadata.__name__:
        found = getattr(dcp_metadata, name, None)
        if isinstance(found, type):  # its dataclasses and enums; never its functions
            return found
    elif (module, name) == STORAGE_INFO:
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        return _StorageInfo
    elif module == "torch":
        found = getattr(torch, name, None)
        if found is torch.Size or isinstance(found, (torch.dtype, torch.layout, torch.memory_format)):
            return found
    elif (module, name) == ("torch.serialization", "_get_layout"):
        from torch.serialization import _get_layout

        return _get_layout
    elif module == "pathlib" and name in ALLOWED_PATHS:
        return getattr(pathlib, name)
    elif (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    elif module == "builtins" and name in ALLOWED_BUILTINS:
        return getattr(builtins, name)
    raise UnsafeMetadata(f"refusing {module}.{name}: DCP metadata does not hold it")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return allowed_global(module, name)


class MetadataCheckedReader(dcp.FileSystemReader):
    """DCP's file reader with `.metadata` unpickled through the allow-list above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise UnsafeMetadata(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def missing_storage(directory: pathlib.Path, metadata: dcp_metadata.Metadata) -> str | None:
    """Why the files `metadata` points into cannot hold its tensors (one missing or cut short), or None.

    Only sizes are compared: a checkpoint copied without a shard, or cut off by a full disk, is
    found at once (`inspect` without reading a tensor) instead of when that tensor is read."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), int(info.offset) + int(info.length))
    for name, end in sorted(needed.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size < end:
            return f"{name} is truncated ({size} bytes; the metadata needs {end})"
    return None


class TrustedLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner with non-tensor entries unpickled by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
