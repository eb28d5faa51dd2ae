"""Load the pickles in a checkpoint without running code they name.

DeepSpeed writes its ZeRO model and optimizer states with `torch.save` and reads them back with
`torch.load(weights_only=False)`: a crafted `*_optim_states.pt` runs whatever it names the moment
training resumes from it, or `inspect`, `export` or `sample` opens it. Here every such file is
read with `torch.load(weights_only=True)` — tensors, containers and numbers only — plus an
allow-list of exactly the three DeepSpeed classes its ZeRO-2/3 checkpoints hold. Anything else is
refused as one line naming the file and what it names (`UntrustedPickle`, a CheckpointUnreadable:
a mistake, exit status 2, never restarted).

- `load_trusted(path)`: one file, the way every reader here loads it;
- `TrustedCheckpointReads(engine)`: DeepSpeed's checkpoint engine with its reads through it
  (resume), writes unchanged;
- `check_pickles(checkpoint)`: every pickle of a checkpoint (ZeRO's `*.pt`, DCP's `.metadata`)
  checked before anything is built, so a crafted one is refused once, at start; also before
  DeepSpeed's own offline reader (zero_to_fp32, used by export, inspect and sample) opens them.

DCP's `.metadata` has its own allow-list (dcp_reader.py).
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from sd35dist.checkpoint.layout import CheckpointUnreadable

DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
"""(module, name) of every class DeepSpeed 0.19's ZeRO-2/3 checkpoints pickle beyond torch's own safe set
(found with torch.serialization.get_unsafe_globals_in_checkpoint on the tiny model's ZeRO-2 bf16 and
ZeRO-3 fp32 checkpoints). A class another DeepSpeed version or setting adds is refused in one line
naming it: it belongs here once checked to be plain data."""


class UntrustedPickle(CheckpointUnreadable):
    """A checkpoint file names code or classes no checkpoint of ours holds; the message names the file."""


def _allowed_classes() -> list[Any]:
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_GLOBALS]


def _foreign_globals(path: Path) -> list[str]:
    """What a zip-format torch file names beyond torch's own safe set and our allow-list (cheap: no tensor is read)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    allowed = {f"{module}.{name}" for module, name in DEEPSPEED_GLOBALS}
    try:
        named = get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 — not a zip-format torch file: the weights-only load below decides
        return []
    return [name for name in named if name not in allowed]


def load_trusted(path: str | Path, map_location: Any = None, *, mmap: bool = False) -> Any:
    """`torch.load` of a DeepSpeed checkpoint file that builds tensors, containers and the allow-listed
    classes only; UntrustedPickle (one line, naming the file) for anything else."""
    path = Path(path)
    foreign = _foreign_globals(path)
    if foreign:
        raise UntrustedPickle(f"{path}: refused: it names {', '.join(foreign[:3])}, which no DeepSpeed checkpoint "
                              "holds (a crafted or foreign file; loading it could run code)")
    try:
        with torch.serialization.safe_globals(_allowed_classes()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a foreign file: refused below
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise UntrustedPickle(f"{path}: refused: not a checkpoint file sd35dist can load safely "
                              f"({_why(err)}; a crafted, foreign or damaged file)") from None


def _why(err: BaseException) -> str:
    """The weights-only unpickler's reason (`Unsupported global: GLOBAL posix.system …`), on one line."""
    text = str(err)
    reason = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0] \
        if "WeightsUnpickler error:" in text else text
    return " ".join(reason.split())[:200] or type(err).__name__


class TrustedCheckpointReads:
    """DeepSpeed's checkpoint engine, its `load` going through `load_trusted`; everything else (saving) is its own."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_trusted(path, map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def check_pickles(checkpoint: Path) -> None:
    """Refuse a checkpoint with any pickle that names what ours never hold: ZeRO's `*.pt` files (tensors
    memory-mapped, not read) and DCP's `.metadata` (through dcp_reader's allow-list)."""
    for path in sorted(checkpoint.glob("*/*.pt")):
        load_trusted(path, map_location="cpu", mmap=zipfile.is_zipfile(path))
    for path in sorted(checkpoint.glob("*/.metadata")):
        from sd35dist.checkpoint.dcp_reader import MetadataCheckedReader

        try:
            MetadataCheckedReader(str(path.parent)).read_metadata()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
            raise UntrustedPickle(f"{path}: refused: not DCP metadata sd35dist can load safely ({err})") from None
