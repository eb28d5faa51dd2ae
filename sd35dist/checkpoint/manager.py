"""What a checkpoint holds, and when it is written, published, resumed and rotated.

One checkpoint (layout.py says where it lives and how it is published atomically) holds:

- the strategy's part: model, optimizer and EMA, in the strategy's own format (DCP for
  FSDP2, DeepSpeed's for ZeRO), written by every rank;
- `trainer_state.json`: the step, the state of every tracked part (the stream's position),
  the world size, the strategy, and how long the save took;
- `rng-rankNNNNN.bin`: each rank's torch RNG state, restored only on the same world size;
- `recipe.yaml`: the resolved recipe that wrote it (its sha256 in COMPLETE), compared with
  the resuming recipe before anything is built (recipe_match.py says which keys count);
- `transformer_config.json`: the model's config, which export builds the diffusers model from.

Weights that hold NaN or inf are never written (checkpoint/finite.py): `save` asks every rank's
strategy first and raises NonFiniteTraining, so `latest` keeps naming the last sound checkpoint.

Like torchtitan's CheckpointManager it holds the parts it saves; the training loop says only
"this step is done" and asks `due`, `save`, `finish_save` and `resume`. Every rank calls
every method at the same point; rank 0 alone publishes and rotates, after a barrier.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist

from sd35dist.checkpoint.finite import NonFiniteTraining, weights_message
from sd35dist.checkpoint.layout import (
    BRANCH,
    RECIPE_FILE,
    TRAINER_STATE,
    TRANSFORMER_CONFIG,
    BranchConflict,
    CheckpointDir,
    branch_record,
    names_checkpoint,
    read_info,
    rng_file,
    saved_recipe,
)
from sd35dist.checkpoint.recipe_match import as_current_schema, refused_changes, resume_refusal
from sd35dist.checkpoint.trusted_pickle import check_pickles
from sd35dist.config.loading import ConfigError
from sd35dist.config.recipe import Recipe, recipe_hash, recipe_yaml


class RankPlace(Protocol):
    """Where this rank sits (parallel.process_group.World is one)."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    @property
    def device(self) -> torch.device:
        """Where this rank's collectives run (the non-finite verdict is all-reduced there)."""
        ...


class CheckpointedStrategy(Protocol):
    """What the manager needs of a training strategy (parallel.strategy.TrainingStrategy is one):
    its part of a checkpoint, written by every rank through checkpoint/'s format modules."""

    model: Any
    supports_async: ClassVar[bool]

    def save(self, directory: Path) -> None: ...
    def save_async(self, directory: Path) -> Future: ...
    def load(self, directory: Path) -> None: ...
    def weights_finite(self) -> bool: ...


class Stateful(Protocol):
    """A part of the run whose state a checkpoint keeps as JSON (the stream's position, say)."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def resume_checkpoint(recipe: Recipe, recipe_source: str = RECIPE_FILE, run_dir: Path | None = None) -> Path | None:
    """The checkpoint `train.resume` names (`latest`, `none` or a path), or None to start fresh.

    A path older than the output directory's newest is refused (layout.CheckpointDir.branch_start),
    unless this run (`run_dir`) already trained on from it: a restart continues from its newest.
    Cheap and done before the stream and the model are built, so a refused resume says so at once.
    """
    layout = CheckpointDir(recipe.output.dir)
    checkpoint = layout.resolve(recipe.train.resume)
    if checkpoint is not None and names_checkpoint(recipe.train.resume):
        try:
            checkpoint = layout.branch_start(checkpoint, str(run_dir) if run_dir else None)
        except BranchConflict as err:
            raise ConfigError(recipe_source, "train.resume", str(err)) from None
    if checkpoint is not None:
        check_pickles(checkpoint)  # a crafted file is refused here, once: a mistake is never restarted
        check_recipe(checkpoint, recipe, recipe_source)
    return checkpoint


def check_recipe(checkpoint: Path, recipe: Recipe, recipe_source: str = RECIPE_FILE) -> None:
    """Refuse to resume a checkpoint trained with another model, data, optimizer or LoRA
    (recipe_match.py says which keys count), unless train.resume_allow_changes names them."""
    saved_data = saved_recipe(checkpoint)
    if not saved_data:
        return  # written before checkpoints held their recipe: nothing to compare
    saved = as_current_schema(saved_data, Recipe)
    refused = refused_changes(saved, recipe.model_dump(mode="json"), recipe.train.resume_allow_changes)
    if refused:
        raise resume_refusal(recipe_source, checkpoint.name, refused)


@dataclass
class _PendingSave:
    """A checkpoint every rank has written (or is writing in the background) but nobody has published."""

    step: int
    writing: Future | None
    trainer_state: dict[str, Any]
    started: float


class CheckpointManager:
    def __init__(self, recipe: Recipe, world: RankPlace, strategy: CheckpointedStrategy, parts: Mapping[str, Stateful],
                 resume_from: Path | None, run_dir: Path | None = None) -> None:
        """`parts` are saved under their names in trainer_state.json; `resume_from` comes from `resume_checkpoint`."""
        self.recipe, self.world, self.strategy, self.parts = recipe, world, strategy, dict(parts)
        self.layout = CheckpointDir(recipe.output.dir)
        self.resume_from = resume_from
        self.branch = (branch_record(Path(recipe.train.resume), str(run_dir))
                       if run_dir is not None and names_checkpoint(recipe.train.resume) else None)
        """Which named checkpoint this run started from, recorded in COMPLETE so a restart continues the branch."""
        self.last_save_s: float | None = None
        """Seconds the last synchronous save took (from the resumed checkpoint until this run saves)."""
        self.saved_step = -1
        """The step of the newest checkpoint this run published or resumed from."""
        self._pending: _PendingSave | None = None

    def due(self, step: int, total_steps: int) -> bool:
        """Whether optimizer step `step` ends with a checkpoint: every `checkpointing_steps`, and the last."""
        return step % self.recipe.train.checkpointing_steps == 0 or step == total_steps

    def latest(self) -> Path | None:
        return self.layout.latest()

    def save(self, step: int) -> Path:
        """Every rank writes its part; rank 0 alone publishes it (after a barrier) and rotates.

        With `async_checkpointing` and a strategy that supports it the state is staged now and
        written in the background; it is published by `finish_save`, at the next save or at the end.
        """
        self.finish_save()
        self._refuse_non_finite(step)
        started = time.monotonic()
        partial = self.layout.partial_path(step)
        if self.world.is_main:
            self.layout.begin(step)
        dist.barrier()
        (partial / rng_file(self.world.rank)).write_bytes(torch.get_rng_state().numpy().tobytes())
        trainer_state = {"step": step, **{name: part.state_dict() for name, part in self.parts.items()},
                         "world_size": self.world.world_size, "strategy": self.recipe.parallel.strategy}
        if self.recipe.train.async_checkpointing and self.strategy.supports_async:
            self._pending = _PendingSave(step, self.strategy.save_async(partial), trainer_state, started)
        else:
            self.strategy.save(partial)
            self._pending = _PendingSave(step, None, trainer_state, started)
            self.finish_save()
        return self.layout.path(step)

    def _refuse_non_finite(self, step: int) -> None:
        """Every rank asks its strategy; if any rank holds a NaN or inf weight, nothing is written."""
        finite = torch.tensor([int(self.strategy.weights_finite())], dtype=torch.int64, device=self.world.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            latest = self.latest()
            raise NonFiniteTraining(weights_message(step, latest.name if latest else None))

    def finish_save(self) -> None:
        """Wait for the checkpoint being written (if any), then publish it and rotate."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.writing is not None:
            pending.writing.result()
        dist.barrier()
        if pending.writing is None:  # a background write overlaps training: its wall time says nothing of a save's
            self.last_save_s = time.monotonic() - pending.started
            pending.trainer_state["save_seconds"] = round(self.last_save_s, 3)
        self.saved_step = pending.step
        if self.world.is_main:
            self._publish(pending)
        dist.barrier()

    def _publish(self, pending: _PendingSave) -> None:
        partial = self.layout.partial_path(pending.step)
        (partial / TRAINER_STATE).write_text(json.dumps(pending.trainer_state))
        (partial / TRANSFORMER_CONFIG).write_text(json.dumps(dict(self.strategy.model.config)))
        (partial / RECIPE_FILE).write_text(recipe_yaml(self.recipe))
        info = {"world_size": self.world.world_size, "strategy": self.recipe.parallel.strategy,
                "recipe_sha256": recipe_hash(self.recipe)}
        self.layout.commit(pending.step, {**info, BRANCH: self.branch} if self.branch else info)
        self.layout.rotate(self.recipe.train.checkpoints_total_limit)

    def resume(self) -> int:
        """Load `resume_from` into the strategy and the parts; the step to continue from (0 without one)."""
        checkpoint = self.resume_from
        if checkpoint is None:
            return 0
        self.strategy.load(checkpoint)
        trainer_state = json.loads((checkpoint / TRAINER_STATE).read_text())
        step = int(trainer_state["step"])
        self.saved_step = step
        self.last_save_s = trainer_state.get("save_seconds")
        for name, part in self.parts.items():
            part.load_state_dict(trainer_state[name])
        rng = checkpoint / rng_file(self.world.rank)
        if read_info(checkpoint)["world_size"] == self.world.world_size and rng.is_file():
            torch.set_rng_state(torch.frombuffer(bytearray(rng.read_bytes()), dtype=torch.uint8))
        return step
