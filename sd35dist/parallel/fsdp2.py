"""`FSDP2Strategy`: the training strategy on an FSDP2-sharded SD3 transformer (fsdp2_sharding.py).

It owns the sharded model, its optimizer and its EMA; its part of a checkpoint is a DCP
directory that sd35dist/checkpoint/fsdp2_files.py writes and reads (also on another world
size, and offline for export).
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from sd35dist.checkpoint import fsdp2_files
from sd35dist.checkpoint.finite import all_finite
from sd35dist.config.recipe import Recipe
from sd35dist.models.lora import trainable_parameters
from sd35dist.models.state_keys import plain_name
from sd35dist.models.transformer_build import transformer_config
from sd35dist.parallel.compute_path import ComputeSettings, compute_settings, refresh_fp8_scales
from sd35dist.parallel.ema import ShardedEMA
from sd35dist.parallel.fsdp2_sharding import fsdp_mesh, load_transformer, mesh_layout_for, parallelize_fsdp2
from sd35dist.parallel.optimizer import make_optimizer, master_and_compute_dtypes
from sd35dist.parallel.process_group import World

STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
"""Checkpoints hold what trains (everything, or LoRA's adapters) and the buffers."""
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)
"""Loading leaves the frozen base as it is; dcp.load has already checked every saved key is there."""


class FSDP2Strategy:
    """fully_shard per transformer block then the root; checkpoints through torch.distributed.checkpoint."""

    name = "fsdp2"
    supports_async = True
    compute: ComputeSettings

    def __init__(self, recipe: Recipe, world: World, recipe_file: str = "recipe") -> None:
        """The pretrained transformer of `recipe.model`, built on meta, sharded, then loaded shard by shard."""
        master, compute = master_and_compute_dtypes(recipe)
        layout = mesh_layout_for(recipe, world, recipe_file)
        replicas = layout.replicas
        config = transformer_config(Path(recipe.model.pretrained), recipe.model.transformer_subfolder)
        self.compute = compute_settings(recipe, config, layout, world.device, recipe_file)
        model = load_transformer(
            Path(recipe.model.pretrained),
            world=world,
            subfolder=recipe.model.transformer_subfolder,
            replicas=replicas,
            dtype=master,
            param_dtype=compute,
            reduce_dtype=torch.float32,
            activation_checkpointing=self.compute.policy,
            compile_blocks=self.compute.compile_blocks,
            compile_backend=self.compute.compile_backend,
            fp8=self.compute.fp8,
            lora=recipe.train.lora,
            seed=recipe.seed,
        )
        self._adopt(model, recipe, world)
        if world.is_main:
            print(f"{layout.describe()}; {recipe.train.optimizer}, compute {compute}, "
                  f"master weights {master}; {self.compute.describe(len(model.transformer_blocks))}", flush=True)

    @classmethod
    def from_model(cls, model: nn.Module, recipe: Recipe, world: World, recipe_file: str = "recipe") -> FSDP2Strategy:
        """The strategy around a model already in memory (a random init, say): sharded as the recipe says."""
        _, compute = master_and_compute_dtypes(recipe)
        layout = mesh_layout_for(recipe, world, recipe_file)
        settings = compute_settings(recipe, dict(model.config), layout, world.device, recipe_file)
        parallelize_fsdp2(
            model,
            mesh=fsdp_mesh(world.world_size, layout.replicas, world.device.type),
            param_dtype=compute,
            reduce_dtype=torch.float32,
            activation_checkpointing=settings.policy,
            compile_blocks=settings.compile_blocks,
            fp8=settings.fp8,
            compile_backend=settings.compile_backend,
        )
        strategy = cls.__new__(cls)
        strategy.compute = settings
        strategy._adopt(model, recipe, world)
        return strategy

    def _adopt(self, model: nn.Module, recipe: Recipe, world: World) -> None:
        self.recipe, self.world = recipe, world
        self.model = model
        self.model.train()
        self.mesh = next(p for p in self.model.parameters()).device_mesh
        self.trainable = trainable_parameters(self.model)
        self.optimizer = make_optimizer([p for _, p in self.trainable], recipe, world.device)
        self.ema = ShardedEMA(self.trainable) if recipe.train.ema.enabled else None
        self._checkpoint_group: dist.ProcessGroup | None = None

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs, return_dict=False)[0]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, learning_rate: float, max_grad_norm: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        params = [p for _, p in self.trainable]
        by_norm = self.recipe.train.grad_clip_method == "norm" and max_grad_norm > 0
        # The norm is reported either way (the metric); clip_grad_norm_ with an infinite limit only measures.
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if by_norm else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if self.recipe.train.grad_clip_method == "value" and max_grad_norm > 0:
            # Elementwise on each rank's shard of the reduced gradient: the same as on the whole gradient.
            for param in params:
                if param.grad is not None:
                    param.grad.clamp_(-max_grad_norm, max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        refresh_fp8_scales(self.model, self.compute)
        return float(norm)

    def update_ema(self, decay: float) -> None:
        if self.ema is not None:
            self.ema.update(self.trainable, decay)

    def weights_finite(self) -> bool:
        """Whether this rank's shards of the trained weights (and of their EMA) are all finite."""
        shadows = self.ema.shadow.values() if self.ema is not None else ()
        return all_finite([*(p for _, p in self.trainable), *shadows])

    # ---- checkpoints ----------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        # A LoRA checkpoint holds the adapters only: the frozen base is the pretrained model's.
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=STATE_OPTIONS)
        state: dict[str, Any] = {"model": model_state, "optim": optim_state}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save(self, directory: Path) -> None:
        """Every rank writes its shards (DCP); resharding on load handles another world size."""
        fsdp2_files.save(self._state(), directory)

    def save_async(self, directory: Path) -> Future:
        """Stage the state in host memory now and write it in the background; the future says when.

        The background writer's collectives run on a gloo group of their own, so they never
        interleave with the training step's collectives on the default group.
        """
        if self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")
        return fsdp2_files.save_async(self._state(), directory, self._checkpoint_group)

    def load(self, directory: Path) -> None:
        state = self._state()
        fsdp2_files.load(state, directory)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=LOAD_OPTIONS)
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])

    def full_state_dict(self, use_ema: bool = False) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if use_ema and self.ema is not None:
            for name, tensor in self.ema.state_dict().items():
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                if dist.get_rank() == 0:
                    state[plain_name(name)] = full.cpu()
        return state
