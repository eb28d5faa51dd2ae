"""`sd35dist train --recipe R --run-dir D`: what every rank runs.

Read top to bottom: set up (process group, stream, strategy, resume), then one optimizer
step after another — micro-batches from the stream, SD3 flow-matching loss, backward,
clip, step, EMA — with a checkpoint every `checkpointing_steps`, on preemption, and at the
end. All randomness comes from generators seeded by (seed, step, micro-step, rank), so a
resumed run repeats exactly what the uninterrupted one would have done.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from sd35dist.checkpoint.export import TRANSFORMER_CONFIG
from sd35dist.checkpoint.layout import CheckpointDir, read_info
from sd35dist.checkpoint.recipe_match import RECIPE_FILE, as_current_schema, refused_changes, resume_refusal
from sd35dist.config.loading import ConfigError
from sd35dist.config.recipe import Recipe, recipe_hash, recipe_yaml
from sd35dist.config.save_budget import SaveBudget
from sd35dist.data.latent_stream import Batch, LatentStream, StreamOptions
from sd35dist.data.shard_fetcher import RetryPolicy
from sd35dist.jobs.rank_failure import rank_from_env, report_before_group, report_failure
from sd35dist.jobs.rank_inputs import check_pretrained, load_rank_recipe, train_model_parts
from sd35dist.parallel.process_group import World, destroy, init_process_group_from_env
from sd35dist.parallel.strategy import TrainingStrategy, make_strategy
from sd35dist.train.ema import ema_decay_at
from sd35dist.train.flow_matching import (
    FlowMatchSchedule,
    flow_matching_loss_sum_and_count,
    loss_weighting,
    noisy_input_and_target,
    sample_timestep_indices,
)
from sd35dist.train.lr_schedule import learning_rate_at
from sd35dist.train.metrics import MetricsLog
from sd35dist.train.mfu import mfu, mmdit_train_flops_per_sample, peak_bf16_flops
from sd35dist.train.preemption import PreemptionWatch, StopKind, save_fits

TRAINER_STATE = "trainer_state.json"
COLLECTIVE_TIMEOUT_S = 1800


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    digest = hashlib.sha256(f"train\0{seed}\0{step}\0{micro}\0{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


def stream_options(recipe: Recipe) -> StreamOptions:
    stream = recipe.data.stream
    return StreamOptions(
        batch_size=recipe.train.train_batch_size,
        seed=recipe.seed,
        block_shards=stream.block_shards,
        prefetch_shards=stream.prefetch_shards,
        fetch_threads=stream.fetch_threads,
        disk_cache_dir=stream.disk_cache_dir,
        disk_cache_bytes=int(stream.disk_cache_gb * 2**30),
        on_corrupt=stream.on_corrupt,
        caption_dropout=recipe.train.caption_dropout_probability,
        retry=RetryPolicy(budget_s=stream.retry_budget_s),
    )


class Trainer:
    def __init__(self, recipe: Recipe, world: World, run_dir: Path, recipe_source: str = RECIPE_FILE) -> None:
        self.recipe, self.world, self.run_dir = recipe, world, run_dir
        self.recipe_source = recipe_source
        """The recipe file's name, for messages about its keys."""
        self.checkpoints = CheckpointDir(recipe.output.dir)
        # Before the stream and the model are built: a refused resume says so at once.
        self.resume_from = self.checkpoints.resolve(recipe.train.resume)
        if self.resume_from is not None:
            self.check_recipe(self.resume_from)
        self.device = world.device
        self.stream = LatentStream(recipe.data.cache_url, rank=world.rank, world_size=world.world_size,
                                   options=stream_options(recipe), storage_options=recipe.data.storage_options)
        self.vae = self.stream.manifest.vae
        scheduler_config = Path(recipe.model.pretrained) / "scheduler" / "scheduler_config.json"
        self.schedule = FlowMatchSchedule.from_scheduler_config(json.loads(scheduler_config.read_text()))
        self.strategy: TrainingStrategy = make_strategy(recipe, world, recipe_source)
        self.step = 0
        self.total_steps = self._total_steps()
        self._pending: tuple[int, Any, dict[str, Any], float] | None = None
        self.last_save_s: float | None = None
        """Seconds the last synchronous save took (from the resumed checkpoint until this run saves)."""
        self.saved_step = -1

    def _total_steps(self) -> int:
        train = self.recipe.train
        if train.max_train_steps:
            return train.max_train_steps
        from sd35dist.data.stream_order import full_epoch, plan_segment

        micro = len(plan_segment(full_epoch(self.stream.layouts), self.world.world_size, train.train_batch_size,
                                 self.recipe.seed, 0).steps)
        return math.ceil(micro / train.gradient_accumulation_steps) * (train.num_train_epochs or 1)

    # ---- one optimizer step ------------------------------------------------------------

    def _placeholder(self, bucket: str) -> dict[str, torch.Tensor]:
        """One zero sample of `bucket` for a rank whose remainder batch is empty: it still runs
        forward and backward (FSDP's collectives need every rank) with its loss weighted 0."""
        config = self.strategy.model.config
        width, height = (int(v) for v in bucket.split("x"))
        tokens = 77 + self.stream.manifest.max_sequence_length
        return {
            "latents": torch.zeros((1, config.in_channels, height // 8, width // 8)),
            "prompt_embeds": torch.zeros((1, tokens, config.joint_attention_dim)),
            "pooled_prompt_embeds": torch.zeros((1, config.pooled_projection_dim)),
        }

    def _inputs(self, batch: Batch, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        train = self.recipe.train
        tensors = batch.tensors if batch.size else self._placeholder(batch.bucket)
        latents = tensors["latents"].to(torch.float32)
        x0 = (latents - self.vae.get("shift_factor", 0.0)) * self.vae.get("scaling_factor", 1.0)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        indices = sample_timestep_indices(train.weighting_scheme, x0.shape[0], generator, logit_mean=train.logit_mean,
                                          logit_std=train.logit_std, mode_scale=train.mode_scale,
                                          num_train_timesteps=self.schedule.num_train_timesteps)
        sigmas = self.schedule.sigmas_at(indices, ndim=x0.ndim)
        noisy, target = noisy_input_and_target(x0, noise, sigmas)
        inputs = {
            "hidden_states": noisy.to(self.device),
            "timestep": self.schedule.timesteps_at(indices).to(self.device),
            "encoder_hidden_states": tensors["prompt_embeds"].to(self.device, torch.float32),
            "pooled_projections": tensors["pooled_prompt_embeds"].to(self.device, torch.float32),
        }
        weighting = loss_weighting(train.weighting_scheme, sigmas) * (1.0 if batch.size else 0.0)
        return inputs, target.to(self.device), weighting.to(self.device)

    def train_step(self, batches: Any) -> dict[str, float]:
        train = self.recipe.train
        loss_sum = torch.zeros((), device=self.device)
        samples = torch.zeros((), device=self.device)
        rank_flops = 0.0
        for micro in range(train.gradient_accumulation_steps):
            batch = next(batches)
            inputs, target, weighting = self._inputs(batch, step_generator(self.recipe.seed, self.step, micro, self.world.rank))
            count = torch.tensor(float(batch.size), device=self.device)
            dist.all_reduce(count)  # samples in this micro-step on all ranks: the loss is their mean
            pred = self.strategy.forward(**inputs)
            part_sum, _ = flow_matching_loss_sum_and_count(pred.float(), target, weighting)
            # Gradients are averaged over ranks, so scale by world size to get the global mean.
            local = part_sum * self.world.world_size / (count * train.gradient_accumulation_steps)
            self.strategy.backward(local)
            loss_sum += part_sum.detach()
            samples += batch.size
            width, height = (int(v) for v in batch.bucket.split("x"))
            rank_flops += batch.size * mmdit_train_flops_per_sample(
                self.strategy.model.config, height, width, inputs["encoder_hidden_states"].shape[1])
        lr = learning_rate_at(self.step, base_lr=train.learning_rate, scheduler=train.lr_scheduler,
                              warmup_steps=train.lr_warmup_steps, total_steps=self.total_steps)
        grad_norm = self.strategy.step(lr, train.max_grad_norm)
        self.step += 1
        decay = ema_decay_at(self.step, decay=train.ema.decay, start_step=train.ema.start_step,
                             update_interval=train.ema.update_interval)
        if decay is not None:
            self.strategy.update_ema(decay)
        totals = torch.stack([loss_sum, samples])
        dist.all_reduce(totals)
        return {"loss": float(totals[0] / totals[1]), "lr": lr, "grad_norm": grad_norm, "samples": float(totals[1]),
                "rank_flops": rank_flops}

    # ---- checkpoints --------------------------------------------------------------------

    def save(self) -> Path:
        """Every rank writes its part; rank 0 alone publishes it (after a barrier) and rotates.

        With `async_checkpointing` (FSDP2) the state is staged now and written in the
        background; it is published by `finish_save`, at the next save or at the end.
        """
        self.finish_save()
        started = time.monotonic()
        partial = self.checkpoints.partial_path(self.step)
        if self.world.is_main:
            self.checkpoints.begin(self.step)
        dist.barrier()
        rng = torch.get_rng_state()
        (partial / f"rng-rank{self.world.rank:05d}.bin").write_bytes(rng.numpy().tobytes())
        state = {"step": self.step, "stream": self.stream.state_dict(), "world_size": self.world.world_size,
                 "strategy": self.recipe.parallel.strategy}
        if self.recipe.train.async_checkpointing and hasattr(self.strategy, "save_async"):
            self._pending = (self.step, self.strategy.save_async(partial), state, started)
        else:
            self.strategy.save(partial)
            self._pending = (self.step, None, state, started)
            self.finish_save()
        return self.checkpoints.path(self.step)

    def finish_save(self) -> None:
        """Wait for the checkpoint being written (if any), then publish it and rotate."""
        if self._pending is None:
            return
        step, writing, state, started = self._pending
        self._pending = None
        if writing is not None:
            writing.result()
        dist.barrier()
        if writing is None:  # a background write overlaps training: its wall time says nothing of a save's
            self.last_save_s = time.monotonic() - started
            state["save_seconds"] = round(self.last_save_s, 3)
        self.saved_step = step
        if self.world.is_main:
            partial = self.checkpoints.partial_path(step)
            (partial / TRAINER_STATE).write_text(json.dumps(state))
            (partial / TRANSFORMER_CONFIG).write_text(json.dumps(dict(self.strategy.model.config)))
            (partial / RECIPE_FILE).write_text(recipe_yaml(self.recipe))
            self.checkpoints.commit(step, {"world_size": self.world.world_size,
                                           "strategy": self.recipe.parallel.strategy,
                                           "recipe_sha256": recipe_hash(self.recipe)})
            self.checkpoints.rotate(self.recipe.train.checkpoints_total_limit)
        dist.barrier()

    def resume(self) -> Path | None:
        checkpoint = self.resume_from
        if checkpoint is None:
            return None
        self.strategy.load(checkpoint)
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        self.step = int(state["step"])
        self.saved_step = self.step
        self.last_save_s = state.get("save_seconds")
        self.stream.load_state_dict(state["stream"])
        rng_file = checkpoint / f"rng-rank{self.world.rank:05d}.bin"
        if read_info(checkpoint)["world_size"] == self.world.world_size and rng_file.is_file():
            torch.set_rng_state(torch.frombuffer(bytearray(rng_file.read_bytes()), dtype=torch.uint8))
        return checkpoint

    def check_recipe(self, checkpoint: Path) -> None:
        """Refuse to resume a checkpoint trained with another model, data, optimizer or LoRA
        (recipe_match.py says which keys count), unless train.resume_allow_changes names them."""
        saved_file = checkpoint / RECIPE_FILE
        if not saved_file.is_file():
            return  # written before checkpoints held their recipe: nothing to compare
        saved = as_current_schema(yaml.safe_load(saved_file.read_text()) or {}, Recipe)
        current = self.recipe.model_dump(mode="json")
        refused = refused_changes(saved, current, self.recipe.train.resume_allow_changes)
        if refused:
            raise resume_refusal(self.recipe_source, checkpoint.name, refused)


def run(recipe: Recipe, world: World, run_dir: Path, recipe_source: str = RECIPE_FILE) -> int:
    trainer = Trainer(recipe, world, run_dir, recipe_source)
    resumed = trainer.resume()
    logging = recipe.logging
    wandb_settings = None
    if logging.report_to == "wandb":
        wandb_settings = {"mode": logging.wandb_mode, "project": logging.tracker_project_name,
                          "name": logging.tracker_run_name or run_dir.name, "resume": "allow"}
    metrics = MetricsLog(run_dir, world, total_steps=trainer.total_steps, start_step=trainer.step,
                         wandb_settings=wandb_settings)
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    metrics.note(f"train: step {trainer.step}/{trainer.total_steps}, world {world.world_size}, "
                 f"{recipe.parallel.strategy}, resumed from {resumed or 'nothing'}, SLURM_RESTART_COUNT={restart}")
    budget = SaveBudget.for_this_job(recipe.output.dir, trainer.last_save_s) if world.is_main else None
    for line in budget.warnings(step_s=None) if budget else []:
        metrics.note(f"warning: {line}")
    watch = PreemptionWatch(str(run_dir))
    batches = iter(trainer.stream)
    peak = peak_bf16_flops(torch.cuda.get_device_name(trainer.device)) if trainer.device.type == "cuda" else None
    stop = StopKind.NONE
    try:
        while trainer.step < trainer.total_steps:
            started = time.perf_counter()
            wait_before = trainer.stream.stats().get("wait_seconds", 0.0)
            values = trainer.train_step(batches)
            values["data_wait_s"] = trainer.stream.stats().get("wait_seconds", 0.0) - wait_before
            seconds = time.perf_counter() - started
            rank_flops = values.pop("rank_flops")
            if peak is not None:
                # This rank's model FLOPs of the step at one step per `seconds`, over one GPU's peak.
                values["mfu"] = mfu(rank_flops, 1.0 / seconds, peak)
            metrics.step(trainer.step, values, seconds)
            stop = watch.agreed(trainer.device)
            if stop is not StopKind.NONE:
                metrics.note(stop_and_save(trainer, stop, watch, budget))
                return 0
            if trainer.step % recipe.train.checkpointing_steps == 0 or trainer.step == trainer.total_steps:
                path = trainer.save()
                metrics.note(f"checkpoint {path}")
                if budget is not None and budget.measured(trainer.last_save_s, seconds, trainer.step):
                    for line in budget.warnings(step_s=seconds):
                        metrics.note(f"warning: {line}")
        trainer.finish_save()
        metrics.note(f"done: {trainer.step} steps")
        return 0
    finally:
        if stop in (StopKind.NONE, StopKind.TIME_LIMIT):
            watch.restore()  # after a SIGTERM the handlers stay: torchrun's own SIGTERM must not kill a rank now
        metrics.close()
        trainer.stream.close()


def stop_and_save(trainer: Trainer, stop: StopKind, watch: PreemptionWatch, budget: SaveBudget | None) -> str:
    """Save for the stop every rank agreed on; returns the line that says what happened."""
    trainer.finish_save()
    if stop is StopKind.TIME_LIMIT:
        if trainer.saved_step != trainer.step:
            trainer.save()
            trainer.finish_save()
        if os.environ.get("SLURM_JOB_ID"):
            return f"time limit: saved step {trainer.step}; the batch script requeues the job once every rank has exited"
        return f"stopped (PREEMPT file): saved step {trainer.step}; `resume: latest` continues"
    what = "requeued by Slurm" if stop is StopKind.REQUEUE else "cancelled"
    if trainer.saved_step == trainer.step:
        return f"{what} ({watch.received or 'signal'}): step {trainer.step} is saved"
    # A save must end before Slurm's SIGKILL; rank 0 knows KillWait and decides for all.
    decision = torch.ones(1, dtype=torch.int64, device=trainer.device)
    if budget is not None:
        decision.fill_(int(save_fits(elapsed_s=watch.seconds_since_terminate(), save_s=trainer.last_save_s,
                                     kill_wait_s=budget.kill_wait_s)))
    if trainer.world.world_size > 1:
        dist.broadcast(decision, src=0)
    if decision.item():
        trainer.save()
        trainer.finish_save()
        return f"{what} ({watch.received or 'signal'}): saved step {trainer.step}"
    latest = trainer.checkpoints.latest()
    kill_wait = f"{budget.kill_wait_s:g} s" if budget and budget.kill_wait_s is not None else "KillWait"
    return (f"{what} ({watch.received or 'signal'}): no final checkpoint: a save takes ~{trainer.last_save_s or 0:.0f} s "
            f"and Slurm kills the job {kill_wait} after its SIGTERM; latest is {latest.name if latest else 'none'}")


def main(args: Any) -> int:
    recipe_file = Path(args.recipe)
    try:
        recipe = load_rank_recipe(recipe_file)
        check_pretrained(recipe, recipe_file.name, train_model_parts(recipe.model))
    except ConfigError as err:
        return report_before_group(err, rank_from_env())
    run_dir = Path(args.run_dir or recipe.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    world = init_process_group_from_env(COLLECTIVE_TIMEOUT_S)
    try:
        code = run(recipe, world, run_dir, recipe_file.name)
        # Leave together: gloo can abort a rank that destroys its group while a peer still works.
        dist.barrier()
        return code
    except Exception as err:  # noqa: BLE001 — one line once for a mistake; a bug is re-raised
        return report_failure(err, world.rank, run_dir)
    finally:
        destroy()
