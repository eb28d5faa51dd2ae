"""DeepSpeed ZeRO-2/3 behind the same `TrainingStrategy` interface as FSDP2.

The DeepSpeed config is a pure function of the recipe (`deepspeed_config`), written to
`<output.dir>/deepspeed_config.json` so a user reads exactly what ran. ZeRO-2 keeps the
bf16 (or fp32) weights whole on every rank and shards gradients and optimizer state;
ZeRO-3 also shards the weights: the model is built under `deepspeed.zero.Init`, so each
rank allocates only its partition, and each rank copies its slice of every pretrained
tensor straight from the safetensors files (no rank holds more than one full tensor).

Its part of a checkpoint (DeepSpeed's tag folder and the EMA fragments) is written and read by
sd35dist/checkpoint/zero_files.py.

The loop owns gradient accumulation (backward once per micro-step, step once per
optimizer step), which DeepSpeed supports as `managed_gradient_accumulation: false`.
The EMA follows DeepSpeed's master weights fragment by fragment, so it is sharded like
the optimizer state under both stages.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sd35dist.checkpoint import zero_files
from sd35dist.checkpoint.finite import all_finite
from sd35dist.checkpoint.layout import DEEPSPEED_CONFIG, read_info
from sd35dist.config.loading import ConfigError
from sd35dist.config.recipe import Recipe
from sd35dist.models.lora import inject_lora, trainable_parameters
from sd35dist.models.state_keys import key_mismatch
from sd35dist.models.transformer_build import (
    FP32_INPUTS,
    CheckpointMismatch,
    build_on_meta,
    checkpoint_key_files,
    iter_checkpoint_tensors,
    materialize_and_load,
    transformer_config,
)
from sd35dist.parallel.compute_path import compute_settings, prepare_blocks
from sd35dist.parallel.ema import ShardedEMA
from sd35dist.parallel.fsdp2_sharding import mesh_layout_for
from sd35dist.parallel.optimizer import make_optimizer, master_and_compute_dtypes
from sd35dist.parallel.process_group import World
from sd35dist.runtime.job_env import torchrun_variables_for

STAGES = {"zero2": 2, "zero3": 3}


def deepspeed_config(recipe: Recipe, world_size: int, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for `recipe` on `world_size` ranks.

    `hidden_size` (the transformer's width) sizes the ZeRO buckets and the ZeRO-3
    persistence threshold the way Hugging Face's "auto" values do; None keeps DeepSpeed's
    defaults. `parallel.offload_optimizer` / `offload_params` move optimizer state / parameters
    to CPU memory.
    """
    train = recipe.train
    stage = STAGES[recipe.parallel.strategy]
    _, compute = master_and_compute_dtypes(recipe)
    bf16 = compute == torch.bfloat16
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if hidden_size:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        if stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            # Tensors below this stay whole on every rank: no all-gather for biases and norms.
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    parallel = recipe.parallel
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    # fp32 master weights and moments always: the recipe refuses adamw_bf16 with ZeRO, since
    # DeepSpeed's bf16_master_weights_and_grads has no compensation and drops small updates.
    precision: dict[str, Any] = {"enabled": bf16}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.train_batch_size * train.gradient_accumulation_steps * world_size,
        # The loop calls backward once per micro-step and step once per optimizer step, and
        # already divides the loss by the accumulation steps: step() is the boundary.
        "managed_gradient_accumulation": False,
        # DeepSpeed clips by norm only; value clipping is applied to the reduced fp32 partitions (clamp_partitions).
        "gradient_clipping": train.max_grad_norm if train.grad_clip_method == "norm" else 0.0,
        "bf16": precision,
        "zero_optimization": zero,
        "steps_per_print": None,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["communication_data_type"] = "fp32"  # reduce gradients in fp32, as FSDP2's reduce_dtype does
    return config


def clamp_partitions(optimizer: Any, limit: float, stage: int) -> None:
    """Value clipping for a DeepSpeed ZeRO optimizer: clamp every element of the reduced fp32
    gradient partitions to ±limit just before the optimizer step.

    DeepSpeed passes each partition through `unscale_and_clip_grads` (its norm clipping, here
    off) right before stepping it, after the gradients are averaged over ranks: the one place
    where a clamp means what `clip_grad_value_` after an all-reduce means. Elementwise, so each
    rank clamping its own partition equals clamping the whole gradient.
    """
    unscale = optimizer.unscale_and_clip_grads

    if stage == 3:
        def unscale_and_clamp(sub_group_id: int, total_norm: Any) -> None:
            unscale(sub_group_id, total_norm)
            optimizer.fp32_partitioned_groups_flat[sub_group_id].grad.clamp_(-limit, limit)
    else:
        def unscale_and_clamp(grad_groups_flat: list, total_norm: Any) -> None:  # type: ignore[misc]
            unscale(grad_groups_flat, total_norm)
            for grad in grad_groups_flat:
                for part in grad if isinstance(grad, list) else [grad]:
                    part.data.clamp_(-limit, limit)

    optimizer.unscale_and_clip_grads = unscale_and_clamp


@dataclass(frozen=True)
class _Fragment:
    """The slice of one parameter's flattened master weights that this rank owns."""

    start: int
    numel: int


class ZeroStrategy:
    """deepspeed.initialize over the pretrained SD3 transformer; DeepSpeed's own checkpoint format."""

    supports_async = False  # DeepSpeed's save_checkpoint writes before it returns

    def __init__(self, recipe: Recipe, world: World, recipe_file: str = "recipe") -> None:
        deepspeed = zero_files.import_deepspeed()
        self.recipe, self.world = recipe, world
        self.stage = STAGES[recipe.parallel.strategy]
        model_dir = Path(recipe.model.pretrained)
        config = transformer_config(model_dir, recipe.model.transformer_subfolder)
        hidden_size = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        self.config = deepspeed_config(recipe, world.world_size, hidden_size)
        self.bf16 = bool(self.config["bf16"]["enabled"])
        if world.is_main:
            output = Path(recipe.output.dir)
            output.mkdir(parents=True, exist_ok=True)
            (output / DEEPSPEED_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")

        master, compute = master_and_compute_dtypes(recipe)
        with torchrun_variables_for(world.job.torchrun, world.rank, world.local_rank, world.world_size):
            # Adopt the process group the trainer already made (deepspeed.comm wraps it; no MPI discovery).
            deepspeed.init_distributed(dist_backend=world.backend, dist_init_required=False)
        model = self._build(deepspeed, model_dir, config, compute, master)
        layout = mesh_layout_for(recipe, world, recipe_file)
        self.compute = compute_settings(recipe, config, layout, world.device, recipe_file)
        # Checkpointing and compile as under FSDP2 (module names unchanged, so DeepSpeed's checkpoints keep them).
        prepare_blocks(model, policy=self.compute.policy, compile_blocks=self.compute.compile_blocks, fp8="none",
                       device=world.device, fsdp_all_gather=False, compile_backend=self.compute.compile_backend)
        if world.is_main:
            print(f"{recipe.parallel.strategy}: {self.compute.describe(len(model.transformer_blocks))}", flush=True)
        model.train()
        optimizer = self._optimizer(deepspeed, model)
        # DeepSpeed reads the torchrun variables itself; a plain one-process `python` start has them only here.
        with torchrun_variables_for(world.job.torchrun, world.rank, world.local_rank, world.world_size):
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=self.config, dist_init_required=False
            )
        if recipe.train.grad_clip_method == "value" and recipe.train.max_grad_norm > 0:
            clamp_partitions(self.optimizer, recipe.train.max_grad_norm, self.stage)
        self.model: nn.Module = self.engine.module
        self._fragments = self._local_fragments()
        self._frozen = len(trainable_parameters(self.model)) < len(list(self.model.parameters()))
        self.ema = ShardedEMA(self._named_master_fragments()) if recipe.train.ema.enabled else None

    def _optimizer(self, deepspeed: Any, model: nn.Module) -> torch.optim.Optimizer:
        params = [p for _, p in trainable_parameters(model)]
        if not self.recipe.parallel.offload_optimizer:
            return make_optimizer(params, self.recipe, self.world.device)
        # Offloaded state is updated on the CPU: DeepSpeed's vectorised Adam, not torch's.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        train = self.recipe.train
        return DeepSpeedCPUAdam(params, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                                eps=train.adam_epsilon, weight_decay=train.adam_weight_decay, adamw_mode=True)

    # ---- model build ------------------------------------------------------------------------

    def _build(self, deepspeed: Any, model_dir: Path, config: dict[str, Any], dtype: torch.dtype,
               master: torch.dtype) -> nn.Module:
        subfolder = self.recipe.model.transformer_subfolder
        if self.stage == 2:
            # ZeRO-2 keeps whole weights on every rank: build them in the compute dtype DeepSpeed trains in.
            # LoRA adapters start from master-dtype values; DeepSpeed keeps their fp32 masters.
            model = build_on_meta(config, dtype=dtype)
            initial = inject_lora(model, self.recipe.train.lora, dtype=master, seed=self.recipe.seed)
            return materialize_and_load(model, model_dir, subfolder, device=self.world.device, dtype=dtype,
                                        initial=initial)
        from diffusers import SD3Transformer2DModel

        # Parameters are partitioned as each submodule is constructed: no rank holds the whole model.
        # No dtype= here: zero.Init then takes it from the config's bf16 flag (an explicit dtype is
        # ignored on accelerators without fp16, the CPU included, which get bf16 regardless).
        with deepspeed.zero.Init(config_dict_or_path=self.config):
            model = SD3Transformer2DModel.from_config(config)
        _load_partitions(model, model_dir / subfolder)
        return model

    # ---- the interface ----------------------------------------------------------------------

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        if self.bf16:  # DeepSpeed casts the weights, not the inputs
            inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k not in FP32_INPUTS
                      else v for k, v in inputs.items()}
        return self.engine(**inputs, return_dict=False)[0]

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divided the loss by the accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, learning_rate: float, max_grad_norm: float) -> float:
        if max_grad_norm != self.recipe.train.max_grad_norm:
            raise ValueError(f"ZeRO clips at the recipe's max_grad_norm {self.recipe.train.max_grad_norm}, "
                             f"not {max_grad_norm}")
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def update_ema(self, decay: float) -> None:
        if self.ema is not None:
            self.ema.update(self._named_master_fragments(), decay)

    def weights_finite(self) -> bool:
        """Whether this rank's master-weight fragments (what a checkpoint saves) and their EMA are finite."""
        shadows = self.ema.shadow.values() if self.ema is not None else ()
        return all_finite([*(t for _, t in self._named_master_fragments()), *shadows])

    def save(self, directory: Path) -> None:
        """Every rank writes its ZeRO partition (DeepSpeed's format) and its EMA fragments."""
        zero_files.save(self.engine, directory)
        if self.ema is not None:
            shapes = {name: list(param.ds_shape if self.stage == 3 else param.shape)
                      for name, param in self.model.named_parameters()}
            # Where each slice sits in its full tensor, so export can reassemble the EMA offline.
            layout = {name: [f.start, f.numel, shapes[name]] for name, f in self._fragments.items()}
            zero_files.write_ema(directory, self.world.rank, self.ema.state_dict(), layout)

    def save_async(self, directory: Path) -> Future:
        raise NotImplementedError("ZeRO checkpoints are written synchronously (supports_async is False)")

    def load(self, directory: Path) -> None:
        info = read_info(directory)
        if not zero_files.has_deepspeed_part(directory):
            raise ConfigError(str(directory), "parallel.strategy", f"checkpoint written by {info.get('strategy')}, "
                              f"not DeepSpeed; resume it with that strategy or set train.resume: none")
        if info.get("world_size") != self.world.world_size:
            raise ConfigError(str(directory), "world_size", f"ZeRO checkpoint written by {info.get('world_size')} "
                              f"ranks cannot resume on {self.world.world_size}; run on the same number of ranks")
        zero_files.load(self.engine, directory, strict=not self._frozen)
        if self.ema is not None:
            fragments = zero_files.read_ema(directory, self.world.rank)
            if fragments is not None:  # a checkpoint from a run without EMA starts it from the weights
                self.ema.load_state_dict(fragments)

    def full_state_dict(self, use_ema: bool = False) -> dict[str, torch.Tensor]:
        """Full master-dtype tensors on rank 0 (empty elsewhere); every rank must call it."""
        from deepspeed.utils import safe_get_full_fp32_param

        state: dict[str, torch.Tensor] = {}
        shadow = self.ema.state_dict() if use_ema and self.ema is not None else None
        for name, param in trainable_parameters(self.model):
            if shadow is None:
                full = safe_get_full_fp32_param(param)
            else:
                full = self._gather_fragments(name, param, shadow)
            if self.world.is_main:
                state[name] = full.detach().cpu().clone()
        if self.world.is_main:
            for name, buffer in self.model.named_buffers():
                state[name] = buffer.detach().cpu().clone()
        return state

    # ---- master-weight fragments ------------------------------------------------------------

    def _local_fragments(self) -> dict[str, _Fragment]:
        """Which slice of each parameter's flattened master weights lives on this rank."""
        fragments = {}
        for name, param in self.model.named_parameters():
            if self.stage == 3:
                size = param.ds_tensor.numel()
                start = dist.get_rank(group=param.ds_process_group) * size
                numel = max(0, min(size, param.ds_numel - start))
            else:
                mapping = getattr(param, "_hp_mapping", None)
                if mapping is None:  # no element of this parameter is in this rank's partition
                    continue
                start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
            if numel:
                fragments[name] = _Fragment(start, numel)
        return fragments

    def _named_master_fragments(self) -> list[tuple[str, torch.Tensor]]:
        """(name, this rank's fp32 — or bf16 — master slice) as live views into DeepSpeed's optimizer."""
        from deepspeed.utils import safe_get_local_fp32_param

        params = dict(self.model.named_parameters())
        out = []
        for name, fragment in self._fragments.items():
            param = params[name]
            if self.stage == 3:
                tensor = safe_get_local_fp32_param(param)[: fragment.numel]
            else:
                tensor = param._hp_mapping.get_hp_fragment()
            out.append((name, tensor))
        return out

    def _gather_fragments(self, name: str, param: nn.Parameter, shadow: dict[str, torch.Tensor]) -> torch.Tensor:
        """The full tensor whose slices the ranks hold in `shadow`, summed onto rank 0."""
        shape = param.ds_shape if self.stage == 3 else param.shape
        full = torch.zeros(shape.numel(), dtype=torch.float32, device=self.world.device)
        fragment = self._fragments.get(name)
        if fragment is not None:
            full[fragment.start: fragment.start + fragment.numel] = shadow[name].to(full.device)
        dist.reduce(full, dst=0)  # each element has exactly one owner; the others add zeros
        return full.view(shape)


def _load_partitions(model: nn.Module, folder: Path) -> None:
    """Copy each rank's slice of every pretrained tensor into a zero.Init-partitioned model.

    A ZeRO-3 partition is the rank's contiguous slice of the flattened tensor (the last
    rank's slice padded), so every rank reads the file and keeps its slice: no scatter.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    key_files = checkpoint_key_files(folder)
    # Buffers (pos_embed) were computed at construction: the checkpoint may lack them.
    problem = key_mismatch([*params, *buffers], key_files, recomputable=buffers)
    if problem is not None:
        raise CheckpointMismatch(f"{folder}: checkpoint does not match the model built from its config.json: "
                                 f"{problem}; point model.pretrained at an unmodified SD3/SD3.5 diffusers directory")
    with torch.no_grad():
        for name, full in iter_checkpoint_tensors(folder, key_files):
            if name in buffers:
                buffers[name].copy_(full)
                continue
            param = params[name]
            if tuple(full.shape) != tuple(param.ds_shape):
                raise CheckpointMismatch(f"{folder}: {name} has shape {tuple(full.shape)} in the checkpoint but "
                                         f"{tuple(param.ds_shape)} in the model built from config.json")
            part = param.ds_tensor
            start = dist.get_rank(group=param.ds_process_group) * part.numel()
            piece = full.reshape(-1)[start: start + part.numel()]
            part.data[: piece.numel()].copy_(piece.to(part.dtype))
