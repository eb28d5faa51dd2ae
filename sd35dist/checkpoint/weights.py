"""A checkpoint's weights, read offline by the format its strategy wrote them in.

COMPLETE records the strategy that wrote a checkpoint; each strategy's part has one reader
module (fsdp2_files.py for DCP, zero_files.py for DeepSpeed). Export, inspect, the single-file
export and sample all come through here, in one process, without a process group or a GPU.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from sd35dist.checkpoint import fsdp2_files, zero_files
from sd35dist.checkpoint.layout import CheckpointUnreadable, read_info
from sd35dist.checkpoint.tensor_sources import TensorSource

FORMATS: dict[str, ModuleType] = {"fsdp2": fsdp2_files, "zero2": zero_files, "zero3": zero_files}
"""The strategy a checkpoint records → the module that reads its part."""


def format_of(checkpoint: Path) -> ModuleType:
    strategy = read_info(checkpoint).get("strategy", "fsdp2")
    if strategy not in FORMATS:
        raise CheckpointUnreadable(f"{checkpoint}: written by strategy {strategy}, which this sd35dist does not "
                                   f"know ({', '.join(FORMATS)})")
    return FORMATS[strategy]


def open_weights(checkpoint: Path, use_ema: bool = False) -> TensorSource:
    """The weights (or EMA) of a complete checkpoint, read one tensor — one block for DCP — at a time."""
    return format_of(checkpoint).read_lazy(checkpoint, use_ema)


def read_weights(checkpoint: Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Every weight (or the EMA over the buffers) of a complete checkpoint, as full tensors."""
    return format_of(checkpoint).read_full(checkpoint, use_ema)
