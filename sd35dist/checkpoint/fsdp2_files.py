"""FSDP2's part of a checkpoint: one torch.distributed.checkpoint (DCP) directory, `dcp/`.

Written by every rank (`save`, or `save_async` staging in host memory and writing in the
background), read back into a sharded state on any world size (`load`: DCP reshards), and
read offline, in one process without a process group, one transformer block at a time
(`DcpTensors`) — what export, inspect and the single-file export all use. The state holds
`model.*` (the trainable weights and buffers), `optim.*` and, with EMA, `ema.*`.

Every read (resume, export, inspect) goes through dcp_reader's allow-listed metadata unpickler, and
resume loads DCP's non-tensor entries with weights_only=True: a checkpoint may have come from elsewhere.
"""

from __future__ import annotations

import pickle
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from sd35dist.checkpoint.dcp_reader import MetadataCheckedReader, TrustedLoadPlanner, UnsafeMetadata, missing_storage
from sd35dist.checkpoint.layout import DCP_DIR, CheckpointUnreadable
from sd35dist.checkpoint.tensor_sources import block_group
from sd35dist.models.state_keys import plain_name


def save(state: dict[str, Any], checkpoint: Path) -> None:
    """Every rank writes its shards of `state` into the checkpoint's DCP directory."""
    dcp.save(state, checkpoint_id=str(checkpoint / DCP_DIR))


def save_async(state: dict[str, Any], checkpoint: Path, group: dist.ProcessGroup) -> Future:
    """Stage `state` in host memory now and write it in the background; the future says when.
    `group` carries the writer's collectives, apart from the training step's."""
    return dcp.async_save(state, checkpoint_id=str(checkpoint / DCP_DIR), process_group=group)


def load(state: dict[str, Any], checkpoint: Path) -> None:
    """Fill `state` (this rank's shards, any world size) from the checkpoint, in place. Its pickles
    (the metadata, the optimizer's non-tensor values) are read through allow-lists, never run."""
    dcp.load(state, storage_reader=MetadataCheckedReader(str(checkpoint / DCP_DIR)), planner=TrustedLoadPlanner())


def read_lazy(checkpoint: Path, use_ema: bool = False) -> DcpTensors:
    return DcpTensors(checkpoint / DCP_DIR, use_ema)


def read_full(checkpoint: Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Every weight (or, with `use_ema`, the EMA over the model's buffers) as full tensors."""
    source = read_lazy(checkpoint, use_ema)
    return {name: source.get(name) for name in source.specs()}


def read_part(checkpoint: Path, part: str) -> dict[str, torch.Tensor]:
    """Every tensor of one part of the state (`model`, `optim` or `ema`) as full tensors."""
    source = DcpTensors(checkpoint / DCP_DIR, use_ema=False, part=part)
    return {name: source.get(name) for name in source.specs()}


class DcpTensors:
    """The model (or, with `use_ema`, the EMA over the model's buffers) of an FSDP2 checkpoint,
    as a TensorSource: shapes from the metadata alone, tensors read a block at a time."""

    def __init__(self, directory: Path, use_ema: bool, part: str = "model") -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        if not (directory / ".metadata").is_file():
            raise CheckpointUnreadable(f"{directory.parent}: no {directory.name}/.metadata: the checkpoint's weights "
                                       f"are missing (copied without its {directory.name}/ directory?)")
        self.directory = directory
        try:
            metadata = MetadataCheckedReader(str(directory)).read_metadata()
        except (UnsafeMetadata, pickle.UnpicklingError, EOFError) as err:
            raise CheckpointUnreadable(f"{directory / '.metadata'}: not readable as DCP metadata ({err})") from None
        problem = missing_storage(directory, metadata)
        if problem:  # found before a tensor is read: `inspect` says so without --diff
            raise CheckpointUnreadable(f"{directory.parent}: broken checkpoint: {problem}")
        self._keys: dict[str, str] = {}
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for prefix in (part, "ema") if use_ema else (part,):
            for key, meta in metadata.state_dict_metadata.items():
                if key.startswith(prefix + ".") and isinstance(meta, TensorStorageMetadata):
                    name = plain_name(key[len(prefix) + 1:])
                    self._keys[name] = key  # the EMA's entries replace the model's
                    self._specs[name] = (tuple(meta.size), meta.properties.dtype)
        if not self._keys:
            raise CheckpointUnreadable(f"{directory}: no '{part}' tensors in this checkpoint")
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
        targets = {self._keys[name]: torch.empty(self._specs[name][0], dtype=self._specs[name][1]) for name in names}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process is the point
            try:
                dcp.load(targets, storage_reader=MetadataCheckedReader(str(self.directory)), no_dist=True)
            except CheckpointException as err:
                raise CheckpointUnreadable(f"{self.directory.parent}: weights unreadable: {_why(err)}") from None
        return {name: targets[self._keys[name]] for name in names}


def _why(err: CheckpointException) -> str:
    """DCP keeps (exception, traceback) per rank: the first cause, a missing file by its name."""
    errors = [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]
    causes = {type(e).__name__: e for e in errors}
    missing = causes.get("FileNotFoundError")
    return f"{missing.filename} is missing" if missing is not None else "; ".join(map(str, causes.values()))
