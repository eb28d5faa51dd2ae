"""Validation images while training: when a round is due, render it on every rank, save it on rank 0.

The trainer's model is used as it is (sharded); the EMA weights, when asked for, are swapped
in for the round and the training weights put back bit for bit. Randomness comes only from
the per-pair generators (sampler.initial_noise), so training's losses do not change.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sd35dist.config.loading import ConfigError
from sd35dist.config.recipe import Recipe
from sd35dist.data.validation_prompts import PromptEmbeddings, read_validation_prompts
from sd35dist.validation.grid import labelled_grid
from sd35dist.validation.guidance import GuidanceSettings
from sd35dist.validation.render import Pair, Renderer, validation_pairs
from sd35dist.validation.sampler import SampleSettings, latent_shape_of

VALIDATION_DIR = "validation"


def sample_settings(recipe: Recipe, kind: str | None = None) -> SampleSettings:
    """How the recipe's validation renders (`kind` overrides its guidance: a sweep's comparison)."""
    section = recipe.validation
    apg, slg = section.apg, section.skip_layer_guidance
    skip = {} if slg is None else {"skip_layers": tuple(slg.layers), "skip_scale": slg.scale,
                                   "skip_start": slg.start, "skip_stop": slg.stop}
    return SampleSettings(steps=section.num_inference_steps, guidance=GuidanceSettings(
        kind=kind or section.guidance, scale=section.guidance_scale, eta=apg.eta, momentum=apg.momentum,
        norm_threshold=apg.norm_threshold, **skip))


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / VALIDATION_DIR / f"step-{step:06d}"


def save_round(out: Path, images: dict[int, np.ndarray], pairs: list[Pair], prompts: tuple[str, ...],
               weights: list[str], title: str) -> Path:
    """Single images and one labelled grid (rows: prompts; columns: weights x seed x resolution)."""
    out.mkdir(parents=True, exist_ok=True)
    column_of = {label: i for i, label in enumerate(dict.fromkeys(p.column_label for p in pairs))}
    columns = [f"{name} {label}" if len(weights) > 1 else label for name in weights for label in column_of]
    cells: dict[tuple[int, int], np.ndarray] = {}
    for w, name in enumerate(weights):
        for i, pair in enumerate(pairs):
            image = images[w * len(pairs) + i]
            cells[pair.prompt, w * len(column_of) + column_of[pair.column_label]] = image
            Image.fromarray(image).save(out / f"{name}-{pair.file_stem}.png")
    grid = labelled_grid(cells, list(prompts), columns, title)
    grid.save(out / "grid.png")
    (out / "prompts.json").write_text(json.dumps({"prompts": list(prompts), "weights": weights}, indent=1) + "\n")
    return out / "grid.png"


@contextlib.contextmanager
def ema_weights(strategy: Any):
    """FSDP2: the EMA shadow (same sharding) in place of the weights, then the weights back exactly."""
    # A block left gathered by the last forward shows its full parameter: shard everything first,
    # and again after, so no gathered copy of the EMA weights outlives the round.
    _reshard(strategy.model)
    params = {name: _local(p) for name, p in strategy.model.named_parameters()}
    saved = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, shadow in strategy.ema.shadow.items():
            params[name].copy_(_local(shadow))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        _reshard(strategy.model)


def _reshard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard (a view: writing it writes the parameter)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class TrainingValidation:
    def __init__(self, recipe: Recipe, trainer: Any, run_dir: Path, recipe_file: str) -> None:
        from sd35dist.models.sd3_components import load_vae

        section = recipe.validation  # the schema ties weights: ema|both to an FSDP2 EMA (config/recipe.py)
        blocks = int(trainer.strategy.model.config.num_layers)
        if section.skip_layer_guidance is not None and max(section.skip_layer_guidance.layers) >= blocks:
            raise ConfigError(recipe_file, "validation.skip_layer_guidance.layers",
                              f"{section.skip_layer_guidance.layers}: the transformer has blocks 0–{blocks - 1}")
        self.recipe, self.trainer, self.run_dir = recipe, trainer, run_dir
        self.embeddings: PromptEmbeddings = read_validation_prompts(
            trainer.stream.store, trainer.stream.manifest, section, recipe_file)
        self.weights = {"model": ["model"], "ema": ["ema"], "both": ["model", "ema"]}[section.weights]
        model_dir = Path(recipe.model.pretrained)
        vae = load_vae(model_dir, trainer.device, torch.float32)
        scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
        world = trainer.world
        self.renderer = Renderer(forward=trainer.strategy.forward, vae=vae, scheduler_config=scheduler_config,
                                 latent_shape=latent_shape_of(trainer.strategy.model.config, vae),
                                 device=trainer.device, rank=world.rank, world_size=world.world_size)
        self.pairs = validation_pairs(len(self.embeddings.prompts), section.seeds, [tuple(r) for r in section.resolutions])
        self.settings = sample_settings(recipe)

    @classmethod
    def for_run(cls, recipe: Recipe, trainer: Any, run_dir: Path, recipe_file: str) -> TrainingValidation | None:
        return cls(recipe, trainer, run_dir, recipe_file) if recipe.validation.renders_during_training else None

    def due_at_start(self, step: int) -> bool:
        """`at_start`: the weights before the first optimizer step; a resumed run does not render again."""
        return self.recipe.validation.at_start and step == 0

    def due(self, step: int, total_steps: int) -> bool:
        every = self.recipe.validation.every_n_steps
        return every > 0 and (step % every == 0 or step == total_steps)

    def run_round(self, step: int, metrics: Any) -> None:
        """Render, save and log one round; a preemption during it is honoured at the next step boundary."""
        started = time.perf_counter()
        grid = self.render(step)
        if grid is not None:
            metrics.note(f"validation: step {step}, {len(self.pairs) * len(self.weights)} images in "
                         f"{time.perf_counter() - started:.1f} s: {grid}")
            metrics.image(step, "validation/grid", grid)

    def render(self, step: int) -> Path | None:
        """All ranks together; rank 0 returns the grid's path."""
        images: dict[int, np.ndarray] = {}
        for w, name in enumerate(self.weights):
            context = ema_weights(self.trainer.strategy) if name == "ema" else contextlib.nullcontext()
            with context:
                rendered = self.renderer.render(self.pairs, self.embeddings, self.settings)
            images.update({w * len(self.pairs) + i: image for i, image in rendered.items()})
        if not self.trainer.world.is_main:
            return None
        s = self.settings
        title = (f"step {step} · {s.guidance.kind} {s.guidance.scale:g} · {s.steps} steps")
        return save_round(step_dir(self.run_dir, step), images, self.pairs, self.embeddings.prompts, self.weights, title)


REPORT_MIN_INTERVAL_S = 60.0
"""A checkpoint rewrites report.html at most this often, counted from the run's start (a validation
round and the run's end always do)."""


def report_due(*, saved: bool, validated: bool, since_last_s: float,
               min_interval_s: float = REPORT_MIN_INTERVAL_S) -> bool:
    """Whether rank 0 rewrites the report after this step, `since_last_s` after the last drawing (or the
    run's start). Drawing it takes ~0.5–1 s of rank 0 that the other ranks wait for, so frequent
    checkpoints (short runs, small models) do not each redraw it; a new validation grid is always shown."""
    if validated:
        return True
    return saved and since_last_s >= min_interval_s


class RunReport:
    """Rank 0's report.html over a run: rewritten when `report_due` says, and at the end if stale."""

    def __init__(self, run_dir: Path, metrics: Any, is_main: bool, clock=time.monotonic) -> None:
        self.run_dir, self.metrics, self.is_main, self.clock = run_dir, metrics, is_main, clock
        self.written_at = clock()  # the run's start: the first checkpoint of a run shorter than a minute waits for the end
        self.stale = True

    def after_step(self, *, saved: bool, validated: bool) -> None:
        self.stale = True
        if report_due(saved=saved, validated=validated, since_last_s=self.clock() - self.written_at):
            self.write()

    def finish(self) -> None:
        if self.stale:
            self.write()

    def write(self) -> None:
        if self.is_main:
            write_run_report(self.run_dir, self.metrics)
        self.written_at, self.stale = self.clock(), False


def write_run_report(run_dir: Path, metrics: Any) -> bool:
    """Rank 0: rewrite report.html; a failure is a warning line, never the end of a long run."""
    from sd35dist.validation.report import write_report

    try:
        path = write_report(run_dir)
    except Exception as err:  # noqa: BLE001 — the report is a view of the run, not part of it
        metrics.note(f"warning: report not written: {type(err).__name__}: {err}")
        return False
    metrics.note(f"report {path}")
    return True
