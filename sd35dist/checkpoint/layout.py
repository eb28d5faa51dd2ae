"""Where checkpoints live and which one is current — atomic on any POSIX filesystem.

    <output>/checkpoints/step-00000400.partial/   being written by every rank
    <output>/checkpoints/step-00000400/           complete: renamed only after every rank
                                                  finished and COMPLETE was written inside
    <output>/checkpoints/latest                   the name of the newest complete checkpoint

A checkpoint becomes visible under its final name only when complete; `latest` moves
only after that; old checkpoints are removed only after the new one is complete. A crash
at any point (kill -9 of a rank mid-write included) leaves `latest` naming a complete
checkpoint or nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from sd35dist.runtime.atomic_files import write_text_atomically

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
PARTIAL_SUFFIX = ".partial"

# Inside one checkpoint directory: every name a checkpoint holds is defined here.
TRAINER_STATE = "trainer_state.json"
"""The step, the tracked parts' states (the stream's position), world size, strategy, save time."""
TRANSFORMER_CONFIG = "transformer_config.json"
"""The model's config, which export and sample build the diffusers model from."""
RECIPE_FILE = "recipe.yaml"
"""The resolved recipe that wrote the checkpoint (its sha256 is in COMPLETE)."""
DCP_DIR = "dcp"
"""FSDP2's part: the directory torch.distributed.checkpoint writes (fsdp2_files.py)."""
DEEPSPEED_TAG = "ds"
"""ZeRO's part: DeepSpeed's tag folder (zero_files.py)."""
ZERO_EMA_FILES = "ema-rank*.safetensors"
"""ZeRO's EMA: one file per rank with that rank's fragments (zero_files.py)."""
DEEPSPEED_CONFIG = "deepspeed_config.json"
"""Not in a checkpoint: the DeepSpeed config a ZeRO run used, in its output directory."""


def rng_file(rank: int) -> str:
    """Each rank's torch RNG state, restored only on the same world size."""
    return f"rng-rank{rank:05d}.bin"


def zero_ema_file(rank: int) -> str:
    return f"ema-rank{rank:05d}.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointNotFound(FileNotFoundError):
    """`resume:` names a checkpoint that is not there or not complete; the message says which."""


class CheckpointUnreadable(ValueError):
    """A checkpoint's weights cannot be read back (missing, damaged or of another kind); the message says why."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def names_to_remove(complete_steps: list[int], limit: int) -> list[str]:
    """Oldest complete checkpoints beyond `limit` (the newest `limit` stay)."""
    keep = sorted(complete_steps)[-limit:] if limit > 0 else []
    return [checkpoint_name(s) for s in sorted(complete_steps) if s not in keep]


class CheckpointDir:
    """The checkpoints of one output directory. Every method is called by ONE rank (rank 0)
    at a point where all ranks have passed a barrier; writing the payload is every rank's job."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.root = Path(output_dir) / CHECKPOINTS

    def partial_path(self, step: int) -> Path:
        return self.root / (checkpoint_name(step) + PARTIAL_SUFFIX)

    def path(self, step: int) -> Path:
        return self.root / checkpoint_name(step)

    def begin(self, step: int) -> Path:
        """A fresh `.partial` directory (a leftover from a crashed attempt is discarded)."""
        partial = self.partial_path(step)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        return partial

    def commit(self, step: int, info: dict[str, Any]) -> Path:
        """Mark complete, publish under the final name, then move `latest`."""
        partial = self.partial_path(step)
        write_text_atomically(partial / COMPLETE, json.dumps({"step": step, "time": time.time(), **info}, indent=1))
        final = self.path(step)
        if final.exists():  # the same step saved again (e.g. a resumed run re-reached it)
            shutil.rmtree(final)
        os.rename(partial, final)
        write_text_atomically(self.root / LATEST, final.name + "\n")
        return final

    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = []
        for entry in self.root.iterdir():
            step = step_of(entry.name)
            if step is not None and (entry / COMPLETE).is_file():
                steps.append(step)
        return sorted(steps)

    def rotate(self, limit: int) -> list[str]:
        """Remove complete checkpoints beyond `limit` and stale `.partial` directories of older steps."""
        steps = self.complete_steps()
        removed = names_to_remove(steps, limit)
        newest = steps[-1] if steps else -1
        for entry in self.root.iterdir() if self.root.is_dir() else []:
            if entry.name.endswith(PARTIAL_SUFFIX) and (step_of(entry.name[: -len(PARTIAL_SUFFIX)]) or 0) < newest:
                removed.append(entry.name)
        for name in removed:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return removed

    def latest(self) -> Path | None:
        """The newest complete checkpoint: what `latest` names, else the newest with COMPLETE."""
        pointer = self.root / LATEST
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / COMPLETE).is_file():
                return candidate
        steps = self.complete_steps()
        return self.path(steps[-1]) if steps else None

    def resolve(self, resume: str) -> Path | None:
        """`resume: latest | none | <path>` → a complete checkpoint directory, or None to start fresh."""
        if resume == "none":
            return None
        if resume == "latest":
            return self.latest()
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise CheckpointNotFound(f"train.resume: {resume} is not a complete checkpoint (no {COMPLETE} inside)")
        return path


def read_info(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / COMPLETE).read_text())


def saved_recipe(checkpoint: Path) -> dict[str, Any]:
    """The recipe the checkpoint was trained with, as plain data ({} when it holds none)."""
    import yaml

    path = checkpoint / RECIPE_FILE
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
