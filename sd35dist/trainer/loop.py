"""The training loop every rank runs (its entry point, `sd35dist train`, is jobs/train.py).

Read top to bottom: set up (stream, strategy, checkpoint manager, resume), then one optimizer
step after another — micro-batches from the stream, SD3 flow-matching loss, backward,
clip, step, EMA — with a checkpoint every `checkpointing_steps`, on preemption, and at the
end. All randomness comes from generators seeded by (seed, step, micro-step, rank), so a
resumed run repeats exactly what the uninterrupted one would have done.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sd35dist.checkpoint.finite import NonFiniteTraining, finite_non_negative, loss_message
from sd35dist.checkpoint.layout import RECIPE_FILE
from sd35dist.checkpoint.manager import CheckpointManager, resume_checkpoint
from sd35dist.config.input_checks import check_cache_buckets
from sd35dist.config.model_flops import mfu, mmdit_train_flops_per_sample, peak_bf16_flops
from sd35dist.config.recipe import Recipe
from sd35dist.data.latent_stream import Batch, LatentStream, StreamOptions
from sd35dist.data.shard_fetcher import RetryPolicy
from sd35dist.data.stream_order import optimizer_steps_per_epoch
from sd35dist.parallel.ema import ema_decay_at
from sd35dist.parallel.process_group import World
from sd35dist.parallel.strategy import TrainingStrategy, make_strategy
from sd35dist.runtime.save_budget import SaveBudget
from sd35dist.trainer.flow_matching import (
    FlowMatchSchedule,
    flow_matching_loss_sum_and_count,
    loss_weighting,
    noisy_input_and_target,
    sample_timestep_indices,
)
from sd35dist.trainer.lr_schedule import learning_rate_at
from sd35dist.trainer.metrics import MetricsLog
from sd35dist.trainer.preemption import PreemptionWatch, StopKind, save_fits
from sd35dist.validation.during_training import RunReport, TrainingValidation


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
        dataset_probability={d.id: d.probability for d in recipe.data.datasets},
        dataset_sampling=recipe.data.dataset_sampling,
    )


def training_schedule(recipe: Recipe) -> FlowMatchSchedule:
    """The σ/timestep table training draws from: the model's scheduler config, its shift replaced
    by train.flow_shift when the recipe sets one."""
    scheduler_config = Path(recipe.model.pretrained) / "scheduler" / "scheduler_config.json"
    return FlowMatchSchedule.from_scheduler_config(json.loads(scheduler_config.read_text()),
                                                   shift=recipe.train.flow_shift)


def recipe_learning_rate(train: Any, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` under the recipe's train section."""
    return learning_rate_at(step, base_lr=train.learning_rate, scheduler=train.lr_scheduler,
                            warmup_steps=train.lr_warmup_steps, total_steps=total_steps,
                            power=train.lr_power, lr_end=train.lr_end)


class Trainer:
    def __init__(self, recipe: Recipe, world: World, run_dir: Path, recipe_source: str = RECIPE_FILE) -> None:
        self.recipe, self.world, self.run_dir = recipe, world, run_dir
        # Before the stream and the model are built: a refused resume says so at once.
        resume_from = resume_checkpoint(recipe, recipe_source, run_dir)
        self.device = world.device
        self.stream = LatentStream(recipe.data.cache_url, rank=world.rank, world_size=world.world_size,
                                   options=stream_options(recipe), storage_options=recipe.data.storage_options)
        self.vae = self.stream.manifest.vae
        check_cache_buckets(list(self.stream.manifest.samples_per_bucket()), recipe, recipe_source)
        self.schedule = training_schedule(recipe)
        self.strategy: TrainingStrategy = make_strategy(recipe, world, recipe_source)
        self.checkpoints = CheckpointManager(recipe, world, self.strategy, {"stream": self.stream}, resume_from,
                                             run_dir)
        self.step = 0
        self.total_steps = self._total_steps()
        """The schedule's horizon: the learning rate reaches its end here."""
        self.last_step = min(self.total_steps, recipe.train.stop_at_step or self.total_steps)
        """Where this submission ends: total_steps, or train.stop_at_step when it comes first."""

    def _total_steps(self) -> int:
        train = self.recipe.train
        if train.max_train_steps:
            return train.max_train_steps
        per_epoch = optimizer_steps_per_epoch(self.stream.layouts, self.world.world_size, train.train_batch_size,
                                              self.recipe.seed, train.gradient_accumulation_steps)
        return per_epoch * (train.num_train_epochs or 1)

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
        totals = torch.stack([loss_sum, samples])
        dist.all_reduce(totals)  # before the step: a NaN loss stops the run before it reaches the weights
        loss = float(totals[0] / totals[1])
        self._stop_unless_finite(loss, "loss")
        lr = recipe_learning_rate(train, self.step, self.total_steps)
        grad_norm = self.strategy.step(lr, train.max_grad_norm)
        self._stop_unless_finite(grad_norm, "gradient norm")
        self.step += 1
        decay = ema_decay_at(self.step, decay=train.ema.decay, start_step=train.ema.start_step,
                             update_interval=train.ema.update_interval)
        if decay is not None:
            self.strategy.update_ema(decay)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "samples": float(totals[1]), "rank_flops": rank_flops}

    def _stop_unless_finite(self, value: float, what: str) -> None:
        """Every rank sees the same global loss and gradient norm, so all stop here together."""
        if not finite_non_negative(value):
            latest = self.checkpoints.latest()
            raise NonFiniteTraining(loss_message(self.step + 1, what, value, latest.name if latest else None))

    def resume(self) -> Path | None:
        """Continue from the checkpoint `train.resume` names, if any; returns it."""
        self.step = self.checkpoints.resume()
        return self.checkpoints.resume_from


def run(recipe: Recipe, world: World, run_dir: Path, recipe_source: str = RECIPE_FILE) -> int:
    trainer = Trainer(recipe, world, run_dir, recipe_source)
    resumed = trainer.resume()
    logging = recipe.logging
    wandb_settings = None
    if logging.report_to == "wandb":
        wandb_settings = {"mode": logging.wandb_mode, "project": logging.tracker_project_name,
                          "name": logging.tracker_run_name or run_dir.name, "resume": "allow"}
    metrics = MetricsLog(run_dir, world, total_steps=trainer.last_step, start_step=trainer.step,
                         wandb_settings=wandb_settings)
    restart = world.job.slurm_restart_count
    stops_early = ""
    if trainer.last_step < trainer.total_steps:
        stops_early = f" (stop_at_step: this submission ends at {trainer.last_step})"
    metrics.note(f"train: step {trainer.step}/{trainer.total_steps}{stops_early}, world {world.world_size}, "
                 f"{recipe.parallel.strategy}, resumed from {resumed or 'nothing'}, SLURM_RESTART_COUNT={restart}")
    checkpoints = trainer.checkpoints
    budget = SaveBudget.for_this_job(recipe.output.dir, checkpoints.last_save_s, world.job) if world.is_main else None
    for line in budget.warnings(step_s=None) if budget else []:
        metrics.note(f"warning: {line}")
    watch = PreemptionWatch(str(run_dir), world.job)
    validation = TrainingValidation.for_run(recipe, trainer, run_dir, recipe_source)
    if validation is not None and validation.due_at_start(trainer.step):
        validation.run_round(trainer.step, metrics)
    batches = iter(trainer.stream)
    peak = peak_bf16_flops(torch.cuda.get_device_name(trainer.device)) if trainer.device.type == "cuda" else None
    stop = StopKind.NONE
    report = RunReport(run_dir, metrics, world.is_main)
    reported_epochs = 0
    try:
        while trainer.step < trainer.last_step:
            started = time.perf_counter()
            wait_before = trainer.stream.stats().get("wait_seconds", 0.0)
            values = trainer.train_step(batches)
            values["data_wait_s"] = trainer.stream.stats().get("wait_seconds", 0.0) - wait_before
            seconds = time.perf_counter() - started
            rank_flops = values.pop("rank_flops")
            if peak is not None:
                # This rank's model FLOPs of the step at one step per `seconds`, over one GPU's peak.
                values["mfu"] = mfu(rank_flops, 1.0 / seconds, peak)
            finished = trainer.stream.finished_epochs[reported_epochs:]
            reported_epochs += len(finished)
            metrics.step(trainer.step, values, seconds, epoch_mixes=finished)
            stop = watch.agreed(trainer.device)
            if stop is not StopKind.NONE:
                metrics.note(stop_and_save(trainer, stop, watch, budget))
                return 0
            saved = checkpoints.due(trainer.step, trainer.last_step)
            if saved:
                path = checkpoints.save(trainer.step)
                metrics.note(f"checkpoint {path}")
                if budget is not None and budget.measured(checkpoints.last_save_s, seconds, trainer.step):
                    for line in budget.warnings(step_s=seconds):
                        metrics.note(f"warning: {line}")
            validated = validation is not None and validation.due(trainer.step, trainer.last_step)
            if validated:
                validation.run_round(trainer.step, metrics)
            report.after_step(saved=bool(saved), validated=validated)  # after the round: it shows the grid
        checkpoints.finish_save()
        report.finish()
        if trainer.step < trainer.total_steps:
            metrics.note(f"stopped at step {trainer.step} (train.stop_at_step), saved; the schedule runs to step "
                         f"{trainer.total_steps}: submit again and `resume: latest` continues")
        else:
            metrics.note(f"done: {trainer.step} steps")
        return 0
    finally:
        if stop in (StopKind.NONE, StopKind.TIME_LIMIT):
            watch.restore()  # after a SIGTERM the handlers stay: torchrun's own SIGTERM must not kill a rank now
        metrics.close()
        trainer.stream.close()


def stop_and_save(trainer: Trainer, stop: StopKind, watch: PreemptionWatch, budget: SaveBudget | None) -> str:
    """Save for the stop every rank agreed on; returns the line that says what happened."""
    checkpoints = trainer.checkpoints
    checkpoints.finish_save()
    if stop is StopKind.TIME_LIMIT:
        if checkpoints.saved_step != trainer.step:
            checkpoints.save(trainer.step)
            checkpoints.finish_save()
        if trainer.world.job.slurm is not None:
            return f"time limit: saved step {trainer.step}; the batch script requeues the job once every rank has exited"
        return f"stopped (PREEMPT file): saved step {trainer.step}; `resume: latest` continues"
    what = "requeued by Slurm" if stop is StopKind.REQUEUE else "cancelled"
    if checkpoints.saved_step == trainer.step:
        return f"{what} ({watch.received or 'signal'}): step {trainer.step} is saved"
    # A save must end before Slurm's SIGKILL; rank 0 knows KillWait and decides for all.
    decision = torch.ones(1, dtype=torch.int64, device=trainer.device)
    if budget is not None:
        decision.fill_(int(save_fits(elapsed_s=watch.seconds_since_terminate(), save_s=checkpoints.last_save_s,
                                     kill_wait_s=budget.kill_wait_s)))
    if trainer.world.world_size > 1:
        dist.broadcast(decision, src=0)
    if decision.item():
        checkpoints.save(trainer.step)
        checkpoints.finish_save()
        return f"{what} ({watch.received or 'signal'}): saved step {trainer.step}"
    latest = checkpoints.latest()
    kill_wait = f"{budget.kill_wait_s:g} s" if budget and budget.kill_wait_s is not None else "KillWait"
    return (f"{what} ({watch.received or 'signal'}): no final checkpoint: a save takes ~{checkpoints.last_save_s or 0:.0f} s "
            f"and Slurm kills the job {kill_wait} after its SIGTERM; latest is {latest.name if latest else 'none'}")
