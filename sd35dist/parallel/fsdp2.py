"""FSDP2 for the SD3 MMDiT: activation checkpointing → compile → fully_shard per block → root,
and `FSDP2Strategy`, the training strategy built on it (checkpoints through DCP).

The torchtitan order. Everything here runs on a meta-built model (see
`sd35dist.models.transformer_build`): sharding is decided before any storage exists, and
`materialize_and_load` then gives each rank only its shard.

A 1-D mesh shards every parameter over all ranks (FSDP). A 2-D mesh (replicas × shards)
is HSDP: parameters are sharded within a group of ranks (a node, say) and replicated
across groups, so the all-gathers stay on the fast links.

Mixed precision: parameters are all-gathered in `param_dtype` and gradients reduced in
`reduce_dtype`. Forward inputs are cast to `param_dtype` too, except the timestep: like
the diffusers pipeline, the sinusoidal time projection gets it in fp32 (in bf16, 928.35
would become 928) and its output is cast after projecting.
"""

from __future__ import annotations

import pickle
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sd35dist.checkpoint.dcp_reader import MetadataCheckedReader, UnsafeMetadata, missing_storage
from sd35dist.checkpoint.layout import CheckpointUnreadable
from sd35dist.config.loading import ConfigError
from sd35dist.config.mesh_layout import MeshLayout, resolve_mesh
from sd35dist.config.recipe import LoraSection, Recipe
from sd35dist.models.lora import inject_lora, trainable_parameters
from sd35dist.models.state_keys import plain_name
from sd35dist.models.transformer_build import build_on_meta, materialize_and_load, transformer_config
from sd35dist.parallel.ema import ShardedEMA
from sd35dist.parallel.finite import all_finite
from sd35dist.parallel.optimizer import make_optimizer, master_and_compute_dtypes
from sd35dist.parallel.process_group import World

SHARD_DIM_NAME = "dp_shard"
REPLICATE_DIM_NAME = "dp_replicate"
# Forward inputs that stay fp32 whatever the compute dtype.
FP32_INPUTS = ("timestep",)
DCP_DIR = "dcp"
"""The checkpoint's subdirectory torch.distributed.checkpoint writes."""
STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
"""Checkpoints hold what trains (everything, or LoRA's adapters) and the buffers."""
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)
"""Loading leaves the frozen base as it is; dcp.load has already checked every saved key is there."""


def fsdp_mesh_shape(world_size: int, replicas: int = 1) -> tuple[int, ...]:
    """(world_size,) for FSDP, (replicas, world_size // replicas) for HSDP."""
    if world_size < 1:
        raise ValueError(f"world_size must be ≥ 1, got {world_size}")
    if replicas < 1 or world_size % replicas:
        raise ValueError(f"parallel.replicas must divide the world size {world_size}, got {replicas}")
    return (world_size,) if replicas == 1 else (replicas, world_size // replicas)


def fsdp_mesh(world_size: int, replicas: int = 1, device_type: str | None = None) -> DeviceMesh:
    """The device mesh `parallelize_fsdp2` shards over; needs an initialised process group."""
    shape = fsdp_mesh_shape(world_size, replicas)
    names = (SHARD_DIM_NAME,) if len(shape) == 1 else (REPLICATE_DIM_NAME, SHARD_DIM_NAME)
    return init_device_mesh(device_type or _device_type(), shape, mesh_dim_names=names)


def parallelize_fsdp2(
    model: nn.Module,
    *,
    mesh: DeviceMesh | None = None,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Wrap `model.transformer_blocks` in place and shard the model; returns the same model.

    param_dtype is what forward/backward compute in (parameters are all-gathered in it);
    the sharded master weights keep the dtype the model was built with. reduce_dtype is
    the gradient reduce-scatter dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        mesh = fsdp_mesh(dist.get_world_size())
    blocks = model.transformer_blocks
    if activation_checkpointing:
        # LoRA dropout draws random masks: the recomputed forward must draw the same ones.
        dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in blocks.modules())
        apply_activation_checkpointing(blocks, preserve_rng_state=dropout)
    if compile_blocks:
        compile_each_block(blocks)

    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    last = len(blocks) - 1
    for index, block in enumerate(blocks):
        # Backward needs the last block first, right after forward: keep it gathered.
        reshard = reshard_after_forward and index < last
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    # The root holds the embedders and the output head: everything outside the blocks. It casts
    # its inputs itself (cast_inputs_except), so the timestep reaches the time projection in fp32.
    root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    fully_shard(model, mesh=mesh, mp_policy=root_policy, reshard_after_forward=reshard_after_forward)
    model.register_forward_pre_hook(cast_inputs_except(param_dtype, FP32_INPUTS), with_kwargs=True)
    return model


def cast_inputs_except(dtype: torch.dtype, keep: tuple[str, ...]):
    """A forward pre-hook casting floating-point inputs to `dtype`, except the keyword inputs named in `keep`."""

    def cast(value):
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        return tuple(cast(a) for a in args), {k: v if k in keep else cast(v) for k, v in kwargs.items()}

    return hook


def apply_activation_checkpointing(blocks: nn.ModuleList, preserve_rng_state: bool = False) -> None:
    """Recompute each block's activations in backward instead of storing them (full AC, per block)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for index, block in enumerate(blocks):
        # preserve_rng_state=False unless asked: SD3 blocks have no dropout, and saving RNG state costs a sync on GPU.
        blocks[index] = checkpoint_wrapper(block, preserve_rng_state=preserve_rng_state)


def compile_each_block(blocks: nn.ModuleList) -> None:
    """torch.compile every block in place (keys and module paths unchanged, unlike torch.compile(module))."""
    for block in blocks:
        block.compile()


def load_transformer(
    model_dir: Path,
    *,
    world: World,
    subfolder: str = "transformer",
    replicas: int = 1,
    dtype: torch.dtype = torch.float32,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    reshard_after_forward: bool = True,
    lora: LoraSection | None = None,
    seed: int = 0,
) -> nn.Module:
    """Meta build → (LoRA) → FSDP2 → materialise and load: the sharded, pretrained SD3 transformer.

    `dtype` is the dtype of the sharded master weights; the other options go to
    `parallelize_fsdp2`. With `lora` the base is frozen in `param_dtype` and only the
    adapters keep `dtype` masters. Needs the process group that `world` describes.
    """
    base_dtype = dtype if lora is None else param_dtype  # a LoRA's frozen base needs no masters
    model = build_on_meta(transformer_config(model_dir, subfolder), dtype=base_dtype)
    initial = inject_lora(model, lora, dtype=dtype, seed=seed)
    mesh = fsdp_mesh(world.world_size, replicas, world.device.type)
    parallelize_fsdp2(
        model,
        mesh=mesh,
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        activation_checkpointing=activation_checkpointing,
        compile_blocks=compile_blocks,
        reshard_after_forward=reshard_after_forward,
    )
    return materialize_and_load(model, model_dir, subfolder, device=world.device, dtype=base_dtype, initial=initial)


def _device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def mesh_layout_for(recipe: Recipe, world: World, recipe_file: str = "recipe") -> MeshLayout:
    """The layout this job runs, from the recipe and torchrun's view of nodes × workers per node:
    the same pure decision the launcher's dry-run prints (HSDP by default across nodes)."""
    per_node = world.local_world_size if world.world_size % world.local_world_size == 0 else world.world_size
    return resolve_mesh(strategy=recipe.parallel.strategy, shard_degree=recipe.parallel.shard_degree,
                        nodes=world.world_size // per_node, procs_per_node=per_node, recipe_file=recipe_file)


class FSDP2Strategy:
    """fully_shard per transformer block then the root; checkpoints through torch.distributed.checkpoint."""

    name = "fsdp2"
    supports_async = True

    def __init__(self, recipe: Recipe, world: World, recipe_file: str = "recipe") -> None:
        """The pretrained transformer of `recipe.model`, built on meta, sharded, then loaded shard by shard."""
        master, compute = master_and_compute_dtypes(recipe)
        layout = mesh_layout_for(recipe, world, recipe_file)
        replicas = layout.replicas
        model = load_transformer(
            Path(recipe.model.pretrained),
            world=world,
            subfolder=recipe.model.transformer_subfolder,
            replicas=replicas,
            dtype=master,
            param_dtype=compute,
            reduce_dtype=torch.float32,
            activation_checkpointing=recipe.train.gradient_checkpointing,
            compile_blocks=recipe.train.compile_blocks,
            lora=recipe.train.lora,
            seed=recipe.seed,
        )
        self._adopt(model, recipe, world)
        if world.is_main:
            print(f"{layout.describe()}; {recipe.train.optimizer}, compute {compute}, "
                  f"master weights {master}", flush=True)

    @classmethod
    def from_model(cls, model: nn.Module, recipe: Recipe, world: World, recipe_file: str = "recipe") -> FSDP2Strategy:
        """The strategy around a model already in memory (a random init, say): sharded as the recipe says."""
        _, compute = master_and_compute_dtypes(recipe)
        replicas = mesh_layout_for(recipe, world, recipe_file).replicas
        parallelize_fsdp2(
            model,
            mesh=fsdp_mesh(world.world_size, replicas, world.device.type),
            param_dtype=compute,
            reduce_dtype=torch.float32,
            activation_checkpointing=recipe.train.gradient_checkpointing,
            compile_blocks=recipe.train.compile_blocks,
        )
        strategy = cls.__new__(cls)
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
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], max_grad_norm if max_grad_norm > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
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

    @staticmethod
    def read_lazy(checkpoint: Path, use_ema: bool = False):
        """The same tensors read one at a time (single-file export, inspect): a TensorSource."""
        from sd35dist.checkpoint.tensor_sources import DcpTensors

        return DcpTensors(checkpoint / DCP_DIR, use_ema)

    @staticmethod
    def read_full(checkpoint: Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
        """Full tensors of a checkpoint's weights (or EMA), in one process, without a process group."""
        state = _read_dcp_tensors(checkpoint / DCP_DIR, "model")
        if use_ema:  # the EMA covers parameters; buffers (pos_embed) come from the model
            state.update(_read_dcp_tensors(checkpoint / DCP_DIR, "ema"))
        return state


def _read_dcp_tensors(directory: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor saved under `prefix` (model or ema) in a DCP checkpoint, as full tensors."""
    if not (directory / ".metadata").is_file():
        raise CheckpointUnreadable(f"{directory.parent}: no {directory.name}/.metadata: the checkpoint's weights are "
                                   f"missing (copied without its {directory.name}/ directory?)")
    reader = MetadataCheckedReader(str(directory))
    try:
        metadata = reader.read_metadata()
    except (UnsafeMetadata, pickle.UnpicklingError, EOFError) as err:
        raise CheckpointUnreadable(f"{directory / '.metadata'}: not readable as DCP metadata ({err})") from None
    problem = missing_storage(directory, metadata)
    if problem:
        raise CheckpointUnreadable(f"{directory.parent}: broken checkpoint: {problem}")
    targets = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix + ".") and isinstance(meta, TensorStorageMetadata)
    }
    if not targets:
        raise CheckpointUnreadable(f"{directory}: no '{prefix}' tensors in this checkpoint")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process is the point
        try:
            dcp.load(targets, storage_reader=reader, no_dist=True)
        except CheckpointException as err:
            # DCP keeps (exception, traceback) per rank
            errors = [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]
            causes = {type(e).__name__: e for e in errors}
            missing = causes.get("FileNotFoundError")
            why = f"{missing.filename} is missing" if missing is not None else "; ".join(map(str, causes.values()))
            raise CheckpointUnreadable(f"{directory.parent}: weights unreadable: {why}") from None
    return {plain_name(key[len(prefix) + 1 :]): tensor for key, tensor in targets.items()}
