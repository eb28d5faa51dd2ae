"""FSDP2 sharding of the SD3 MMDiT: FP8 → activation checkpointing → compile → fully_shard per block → root.

The torchtitan order (the first three: sd35dist/parallel/compute_path.py). Everything here runs on a meta-built model (see
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

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sd35dist.config.activation_policy import CheckpointingPolicy
from sd35dist.config.mesh_layout import MeshLayout, resolve_mesh
from sd35dist.config.recipe import LoraSection, Recipe
from sd35dist.models.lora import inject_lora
from sd35dist.models.transformer_build import FP32_INPUTS, build_on_meta, materialize_and_load, transformer_config
from sd35dist.parallel.compute_path import prepare_blocks
from sd35dist.parallel.process_group import World

SHARD_DIM_NAME = "dp_shard"
REPLICATE_DIM_NAME = "dp_replicate"


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
    activation_checkpointing: bool | CheckpointingPolicy = False,
    compile_blocks: bool = False,
    fp8: str = "none",
    reshard_after_forward: bool = True,
    compile_backend: str = "inductor",
) -> nn.Module:
    """Prepare `model.transformer_blocks` in place (compute_path.prepare_blocks) and shard the model;
    returns the same model.

    param_dtype is what forward/backward compute in (parameters are all-gathered in it);
    the sharded master weights keep the dtype the model was built with. reduce_dtype is
    the gradient reduce-scatter dtype. activation_checkpointing: True (every block), False, or a policy.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        mesh = fsdp_mesh(dist.get_world_size())
    blocks = model.transformer_blocks
    policy = (activation_checkpointing if isinstance(activation_checkpointing, CheckpointingPolicy)
              else CheckpointingPolicy("full" if activation_checkpointing else "none"))
    prepare_blocks(model, policy=policy, compile_blocks=compile_blocks, fp8=fp8,
                   device=torch.device(mesh.device_type), fsdp_all_gather=True, compile_backend=compile_backend)

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


def load_transformer(
    model_dir: Path,
    *,
    world: World,
    subfolder: str = "transformer",
    replicas: int = 1,
    dtype: torch.dtype = torch.float32,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool | CheckpointingPolicy = False,
    compile_blocks: bool = False,
    compile_backend: str = "inductor",
    fp8: str = "none",
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
        compile_backend=compile_backend,
        fp8=fp8,
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
