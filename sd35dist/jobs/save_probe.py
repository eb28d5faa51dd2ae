"""Preflight's estimate of how long one checkpoint of the recipe takes to write.

The bytes come from the model's config on the meta device (no weights are read) and what a
checkpoint holds per parameter; the speed is measured by every rank writing (and fsyncing)
a probe file into `output.dir` at once, as they do when they save. The slowest rank sets
the pace. The result goes to `<output.dir>/save_estimate.json` (sd35dist/runtime/save_budget.py),
where `submit` and the trainer compare it with the time Slurm gives a save.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sd35dist.config.model_size import transformer_size
from sd35dist.config.recipe import Recipe
from sd35dist.models.transformer_build import transformer_config
from sd35dist.parallel.process_group import World
from sd35dist.runtime.save_budget import SaveEstimate, write_save_estimate

PROBE_BYTES = 32 * 2**20


def checkpoint_bytes_per_parameter(optimizer: str, ema: bool) -> int:
    """Master weights and both Adam moments (fp32, or bf16 plus its Kahan buffer), and an fp32 EMA."""
    state = 2 + 2 + 2 + 2 if optimizer == "adamw_bf16" else 4 + 4 + 4
    return state + (4 if ema else 0)


def count_parameters(model_dir: Path, subfolder: str) -> int:
    """From the transformer's config.json by arithmetic (config/model_size.py, checked against the meta-built
    model in tests): preflight imports no diffusers, so its fork server needs none (jobs/warm_ranks.py)."""
    return transformer_size(transformer_config(model_dir, subfolder)).total


def write_mbps(directory: Path, rank: int, nbytes: int = PROBE_BYTES) -> float:
    """MB/s of one rank writing `nbytes` to `directory`, fsync included (then the file is removed)."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".save-probe.rank{rank:05d}"
    block = os.urandom(2**20)
    started = time.monotonic()
    try:
        with open(probe, "wb") as out:
            for _ in range(nbytes // len(block)):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        return nbytes / 1e6 / max(time.monotonic() - started, 1e-9)
    finally:
        probe.unlink(missing_ok=True)


def estimate_save(world: World, recipe: Recipe) -> dict:
    """Every rank takes part (the write probe runs concurrently); rank 0 records the result.

    Returns the report section: bytes per rank, the slowest rank's MB/s, and the estimate.
    """
    output = recipe.output.dir
    if "://" in output and not output.startswith("file://"):
        return {"estimated": False, "reason": "output.dir is not a local path"}
    try:
        parameters = count_parameters(Path(recipe.model.pretrained), recipe.model.transformer_subfolder)
    except Exception as exc:  # noqa: BLE001 — preflight reports what it could not check
        parameters, reason = 0, f"model config unreadable ({type(exc).__name__})"
    else:
        reason = ""
    mbps = torch.tensor([write_mbps(Path(output.removeprefix("file://")), world.rank)], device=world.device)
    if dist.is_initialized() and world.world_size > 1:
        dist.all_reduce(mbps, op=dist.ReduceOp.MIN)
    slowest = float(mbps.item())
    if not parameters:
        return {"estimated": False, "reason": reason, "write_mbps": round(slowest, 1)}
    per_rank = parameters * checkpoint_bytes_per_parameter(recipe.train.optimizer, recipe.train.ema.enabled)
    per_rank //= world.world_size
    save_s = per_rank / 1e6 / slowest
    section = {"estimated": True, "parameters": parameters, "bytes_per_rank": per_rank,
               "write_mbps": round(slowest, 1), "save_s": round(save_s, 3)}
    if world.is_main:
        source = f"preflight: {per_rank / 1e9:.2f} GB per rank at {slowest:.0f} MB/s"
        write_save_estimate(output, SaveEstimate(save_s=round(save_s, 3), step_s=None, source=source))
    return section
