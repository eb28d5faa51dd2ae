"""DeepSpeed ZeRO-2/3's part of a checkpoint: DeepSpeed's tag folder `ds/` and our EMA files.

DeepSpeed writes and reads its own format (`save`/`load` here only fix how: our tag, no
`latest` file of its own, frozen LoRA bases left out). The EMA follows DeepSpeed's master
weights fragment by fragment, so each rank writes its fragments to `ema-rankNNNNN.safetensors`
with their place in the full tensor as metadata; `ZeroTensors` reassembles them offline.
Offline reads (`ZeroTensors`, `read_full`) need no process group and no GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from sd35dist.checkpoint.layout import DEEPSPEED_TAG, ZERO_EMA_FILES, CheckpointUnreadable, zero_ema_file
from sd35dist.checkpoint.trusted_pickle import TrustedCheckpointReads, check_pickles

EMA_LAYOUT_KEY = "sd35dist.ema_layout"
"""Metadata key of an EMA file: name → [start, numel, full shape] of each fragment it holds."""


def import_deepspeed() -> ModuleType:
    """deepspeed, told to use the CPU accelerator where there is no GPU (it decides at import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def save(engine: Any, checkpoint: Path) -> None:
    """Every rank writes its ZeRO partition; a LoRA's frozen base stays out (it is the pretrained model's)."""
    engine.save_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)


def has_deepspeed_part(checkpoint: Path) -> bool:
    return (checkpoint / DEEPSPEED_TAG).is_dir()


def load(engine: Any, checkpoint: Path, strict: bool) -> None:
    """Load this rank's partition; `strict=False` when the checkpoint leaves a frozen base out.
    DeepSpeed reads with torch.load(weights_only=False): its reads go through the allow-list instead."""
    if not isinstance(engine.checkpoint_engine, TrustedCheckpointReads):
        engine.checkpoint_engine = TrustedCheckpointReads(engine.checkpoint_engine)
    path, _ = engine.load_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG, load_lr_scheduler_states=False,
                                     load_module_strict=strict)
    if path is None:
        raise FileNotFoundError(f"{checkpoint / DEEPSPEED_TAG}: DeepSpeed could not load this checkpoint")


def write_ema(checkpoint: Path, rank: int, fragments: dict[str, torch.Tensor],
              layout: dict[str, tuple[int, int, list[int]]]) -> None:
    """This rank's EMA fragments, with where each sits in its full tensor (start, numel, shape)."""
    from safetensors.torch import save_file

    save_file(fragments, str(checkpoint / zero_ema_file(rank)), metadata={EMA_LAYOUT_KEY: json.dumps(layout)})


def read_ema(checkpoint: Path, rank: int) -> dict[str, torch.Tensor] | None:
    """This rank's EMA fragments, or None when the checkpoint has none (a run without EMA wrote it)."""
    from safetensors.torch import load_file

    path = checkpoint / zero_ema_file(rank)
    return load_file(str(path)) if path.is_file() else None


def read_lazy(checkpoint: Path, use_ema: bool = False) -> ZeroTensors:
    return ZeroTensors(checkpoint, use_ema)


def read_full(checkpoint: Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Every master weight (or, with `use_ema`, the EMA over the buffers) as full tensors."""
    source = read_lazy(checkpoint, use_ema)
    return {name: source.get(name) for name in source.specs()}


@contextlib.contextmanager
def deepspeed_files_read(checkpoint: Path) -> Iterator[None]:
    """DeepSpeed reading a checkpoint whose files are missing or cut short fails in many ways (its own
    ValueError, torch.load's RuntimeError, an EOF): each is CheckpointUnreadable naming the checkpoint."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError) as err:
        raise CheckpointUnreadable(f"{checkpoint}: broken DeepSpeed checkpoint: {type(err).__name__}: "
                                   f"{' '.join(str(err).split())[:300]}") from None


class ZeroTensors:
    """The fp32 master weights (or, with `use_ema`, the EMA) of a DeepSpeed ZeRO-2/3 checkpoint, as
    a TensorSource: DeepSpeed's lazy reader (optimizer files memory-mapped; ZeRO-2's model-states
    file is read whole by DeepSpeed), and the EMA gathered per tensor from the per-rank files."""

    def __init__(self, checkpoint: Path, use_ema: bool) -> None:
        if not has_deepspeed_part(checkpoint):
            raise CheckpointUnreadable(f"{checkpoint}: no DeepSpeed checkpoint ({DEEPSPEED_TAG}/) in it")
        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        check_pickles(checkpoint)  # DeepSpeed's offline reader unpickles with weights_only=False
        # Buffers (pos_embed) are in it too; a LoRA checkpoint holds no frozen base.
        with deepspeed_files_read(checkpoint):
            self._lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG, lazy_mode=True)
        self._ema: dict[str, list[tuple[Path, int, int]]] = {}
        self._ema_shapes: dict[str, tuple[int, ...]] = {}
        if use_ema:
            from safetensors import safe_open

            files = sorted(checkpoint.glob(ZERO_EMA_FILES))
            if not files:
                raise CheckpointUnreadable(f"{checkpoint}: no EMA in this checkpoint (train.ema.enabled was false)")
            for path in files:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for name, (start, numel, shape) in json.loads(handle.metadata()[EMA_LAYOUT_KEY]).items():
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
