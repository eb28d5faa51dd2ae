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

from sd35dist.runtime.atomic_files import give_umask_modes, write_text_atomically

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


class BranchConflict(ValueError):
    """`resume:` names a checkpoint whose training would overwrite or rotate away newer checkpoints
    of the output directory; the message says how to branch instead."""


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
        give_umask_modes(partial)  # others on the cluster read checkpoints; some writers leave 0600
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
        if not names_checkpoint(resume):
            return self.latest()
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise CheckpointNotFound(f"train.resume: {resume} is not a complete checkpoint (no {COMPLETE} inside)")
        return path


    def branch_start(self, named: Path, run_dir: str | None) -> Path:
        """Where a run told to resume from `named` (a path in `resume:`) starts, or BranchConflict.

        Its checkpoints land in this directory, so steps after `named`'s would replace newer ones
        here and rotation would then remove `named`. It starts from `named` when this directory
        holds nothing newer (it is empty, or `named` is its newest); from the newest when that
        was written by this same run (`run_dir`) after starting from `named` — a restart or a
        requeue; anything else is refused: a branch needs a directory of its own.
        """
        newest = self.latest()
        if newest is None or newest.resolve() == named.resolve():
            return named
        if run_dir and read_info(newest).get(BRANCH) == branch_record(named, run_dir):
            return newest
        step = read_info(named).get("step")
        newer = [checkpoint_name(s) for s in self.complete_steps() if step is None or s > step]
        if named.resolve().parent == self.root.resolve():
            harm = (f"training from it here would overwrite {', '.join(newer) or 'newer checkpoints'} and rotation "
                    f"would then remove {named.name}")
        else:
            harm = (f"output.dir {self.root.parent} already holds checkpoints up to {newest.name} of another run, "
                    "which training from it would mix with and rotate away")
        raise BranchConflict(f"{named} is not the newest checkpoint of its output directory: {harm}; to branch from "
                             "it, set output.dir to a new directory (the checkpoint is read from where it is), or "
                             "set train.resume: latest to continue the newest")


def names_checkpoint(resume: str) -> bool:
    """Whether `resume:` names a checkpoint (a path) rather than `latest` or `none`."""
    return resume not in ("latest", "none")


BRANCH = "branch"
"""COMPLETE's record of the checkpoint a run was told to resume from and the run (its run directory)."""


def branch_record(named: Path, run_dir: str) -> dict[str, str]:
    return {"from": str(named.resolve()), "run_dir": str(Path(run_dir).resolve())}


def read_info(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / COMPLETE).read_text())


def saved_recipe(checkpoint: Path) -> dict[str, Any]:
    """The recipe the checkpoint was trained with, as plain data ({} when it holds none)."""
    import yaml

    from sd35dist.config.yaml_reader import load_yaml

    path = checkpoint / RECIPE_FILE
    if not path.is_file():
        return {}
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointUnreadable(f"{path}: not a recipe sd35dist wrote ({' '.join(str(err).split())})") from None
    if data is not None and not isinstance(data, dict):
        raise CheckpointUnreadable(f"{path}: not a recipe sd35dist wrote (a {type(data).__name__}, not a mapping)")
    return data or {}
