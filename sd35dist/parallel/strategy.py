"""The one small interface the training loop calls, whatever shards the model.

`TrainingStrategy` owns the model, its optimizer and its EMA: forward, backward, step,
save, load, and a full state dict for export. The loop never asks which strategy it has.
FSDP2 is here; ZeRO-2/3 (DeepSpeed) implements the same methods.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from sd35dist.config.recipe import Recipe
from sd35dist.parallel.process_group import World
from sd35dist.train.ema import ShardedEMA

DCP_DIR = "dcp"


class TrainingStrategy(Protocol):
    model: nn.Module
    ema: ShardedEMA | None

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, learning_rate: float, max_grad_norm: float) -> float: ...
    def update_ema(self, decay: float) -> None: ...
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...
    def full_state_dict(self, use_ema: bool = False) -> dict[str, torch.Tensor]: ...


def _dtypes(recipe: Recipe) -> tuple[torch.dtype, torch.dtype]:
    """(master weight dtype, compute dtype) from the recipe's optimizer and precision."""
    master = torch.bfloat16 if recipe.train.optimizer == "adamw_bf16" else torch.float32
    compute = torch.bfloat16 if recipe.train.mixed_precision == "bf16" else master
    return master, compute


def make_optimizer(parameters, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW on fp32 masters (`adamw`), or torch-optimi's AdamW with Kahan summation on bf16 (`adamw_bf16`).

    Plain AdamW on bf16 weights rounds away every update below half a bf16 ulp (at lr 5e-5,
    any |w| ≥ 0.0156 never moves). optimi keeps a bf16 compensation buffer per weight that
    carries what rounding dropped into the next step; measured against fp32 masters it moves
    the same weights, deterministically (docs/numerics.md).
    """
    train = recipe.train
    options = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                   weight_decay=train.adam_weight_decay, eps=train.adam_epsilon)
    if train.optimizer == "adamw_bf16":
        return kahan_adamw(parameters, **options)
    return torch.optim.AdamW(parameters, **options, fused=device.type == "cuda")


def kahan_adamw(parameters, **options: Any) -> torch.optim.Optimizer:
    import optimi

    # The per-parameter loop: FSDP2's DTensor shards have no sharding rule for the
    # _foreach_copy_ that optimi's foreach path uses, and its Triton kernels take plain tensors.
    return optimi.AdamW(parameters, **options, kahan_sum=True, foreach=False, triton=False)


class FSDP2Strategy:
    """fully_shard per transformer block then the root; checkpoints through torch.distributed.checkpoint."""

    name = "fsdp2"

    def __init__(self, recipe: Recipe, world: World, recipe_file: str = "recipe") -> None:
        from sd35dist.parallel.fsdp2 import describe_mesh, load_transformer

        self.recipe = recipe
        self.world = world
        master, compute = _dtypes(recipe)
        replicas = hsdp_replicas(recipe.parallel.shard_degree, world.world_size, recipe_file)
        self.model = load_transformer(
            Path(recipe.model.pretrained),
            world=world,
            subfolder=recipe.model.transformer_subfolder,
            replicas=replicas,
            dtype=master,
            param_dtype=compute,
            reduce_dtype=torch.float32,
            activation_checkpointing=recipe.train.gradient_checkpointing,
            compile_blocks=recipe.train.compile_blocks,
        )
        self.model.train()
        self.mesh = next(p for p in self.model.parameters()).device_mesh
        if world.is_main:
            print(f"fsdp2: {describe_mesh(self.mesh)}, {recipe.train.optimizer}, compute {compute}, "
                  f"master weights {master}", flush=True)
        self.optimizer = make_optimizer(self.model.parameters(), recipe, world.device)
        self.ema = ShardedEMA(list(self.model.named_parameters())) if recipe.train.ema.enabled else None
        self._checkpoint_group: dist.ProcessGroup | None = None

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs, return_dict=False)[0]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, learning_rate: float, max_grad_norm: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def update_ema(self, decay: float) -> None:
        if self.ema is not None:
            self.ema.update(list(self.model.named_parameters()), decay)

    def _state(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state: dict[str, Any] = {"model": model_state, "optim": optim_state}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save(self, directory: Path) -> None:
        """Every rank writes its shards (DCP); resharding on load handles another world size."""
        dcp.save(self._state(), checkpoint_id=str(directory / DCP_DIR))

    def save_async(self, directory: Path) -> Future:
        """Stage the state in host memory now and write it in the background; the future says when.

        The background writer's collectives run on a gloo group of their own, so they never
        interleave with the training step's collectives on the default group.
        """
        if self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")
        return dcp.async_save(self._state(), checkpoint_id=str(directory / DCP_DIR), process_group=self._checkpoint_group)

    def load(self, directory: Path) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])

    def full_state_dict(self, use_ema: bool = False) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if use_ema and self.ema is not None:
            for name, tensor in self.ema.state_dict().items():
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                if dist.get_rank() == 0:
                    state[_clean(name)] = full.cpu()
        return state


def hsdp_replicas(shard_degree: int | None, world_size: int, recipe_file: str = "recipe") -> int:
    """How many replica groups `parallel.shard_degree` makes on `world_size` ranks: 1 is plain FSDP."""
    if shard_degree is None:
        return 1
    if shard_degree > world_size or world_size % shard_degree:
        from sd35dist.config.loading import ConfigError

        raise ConfigError(recipe_file, "parallel.shard_degree",
                          f"{shard_degree} must divide the world size {world_size}")
    return world_size // shard_degree


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def make_strategy(recipe: Recipe, world: World, recipe_file: str = "recipe") -> TrainingStrategy:
    if recipe.parallel.strategy == "fsdp2":
        return FSDP2Strategy(recipe, world, recipe_file)
    if recipe.parallel.strategy in ("zero2", "zero3"):
        from sd35dist.parallel.zero import ZeroStrategy

        return ZeroStrategy(recipe, world)
    from sd35dist.config.loading import ConfigError

    raise ConfigError(recipe_file, "parallel.strategy", f"unknown strategy {recipe.parallel.strategy}; "
                      "use fsdp2, zero2 or zero3")
