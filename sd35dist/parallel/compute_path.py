"""How the transformer blocks compute, set up before sharding and shared by FSDP2 and ZeRO:
FP8 Linears (torchao float8) → activation checkpointing (the recipe's policy) → per-block torch.compile.

All three change modules in place and keep every parameter's name, so checkpoints, exports and the
pretrained loader see the plain diffusers keys whatever is switched on:
- FP8 swaps `nn.Linear` for torchao's `Float8Linear` (a subclass holding the same `weight` and `bias`
  in the master dtype; only the matmuls run in fp8). Only the blocks' token Linears are swapped: the
  first and last blocks, the embedders, the output head and the adaLN modulation Linears (one row per
  sample: nothing to gain) stay in bf16, as torchao recommends for the layers nearest input and output.
- Checkpointing wraps a module's `forward` in torch.utils.checkpoint (non-reentrant), as diffusers'
  own gradient checkpointing does, instead of inserting a wrapper module into the module paths.
- Compile makes each block's call a torch.compile'd function with dynamic shapes: the token count
  changes with every aspect bucket (and the batch with a remainder), and one graph per block serves
  them all instead of a recompile per bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sd35dist.config.activation_policy import CheckpointingPolicy
from sd35dist.config.loading import ConfigError
from sd35dist.config.mesh_layout import MeshLayout
from sd35dist.config.recipe import Recipe
from sd35dist.config.resource_plan import resolve_checkpointing

FP8_TOKEN_LINEARS = ("attn.", "attn2.", "ff.", "ff_context.")
"""Module-name prefixes, inside a block, of the Linears that see every token (the ones FP8 pays for)."""
FP8_DIVISOR = 16
"""torchao's float8 matmuls need both Linear dimensions divisible by 16."""


def compile_on(setting: bool | str, device: torch.device) -> bool:
    """train.compile_blocks resolved for this device: auto compiles on CUDA only (inductor on CPU costs
    minutes of compile for little gain)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def fp8_linear_filter(layers: int):
    """torchao's module_filter_fn: True for the Linears FP8 swaps (see the module docstring)."""

    def swap(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or not fqn.startswith("transformer_blocks."):
            return False
        index, _, inner = fqn[len("transformer_blocks."):].partition(".")
        if int(index) in (0, layers - 1) or not inner.startswith(FP8_TOKEN_LINEARS):
            return False
        return module.in_features % FP8_DIVISOR == 0 and module.out_features % FP8_DIVISOR == 0

    return swap


def fp8_config(recipe_name: str, device: torch.device, fsdp_all_gather: bool) -> Any:
    """torchao's Float8LinearConfig for `train.fp8`: its named recipe, emulated off CUDA (torchao's
    emulation upcasts the fp8 operands, so CPU tests see fp8 rounding without fp8 hardware), with FSDP2's
    fp8 all-gather where torchao supports it (tensorwise scaling)."""
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe_name)
    # Rebuilt rather than copied with dataclasses.replace: the config validates itself on construction.
    fields = {name: getattr(config, name) for name in config.__dataclass_fields__}
    fields["emulate"] = device.type != "cuda"
    fields["enable_fsdp_float8_all_gather"] = fsdp_all_gather and recipe_name == "tensorwise"
    return Float8LinearConfig(**fields)


def require_fp8_device(device: torch.device, recipe_file: str) -> None:
    """A CUDA device without FP8 tensor cores (before compute capability 8.9, e.g. A100) is a mistake."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(recipe_file, "train.fp8", f"{name} has no FP8 tensor cores (needs compute capability "
                          "8.9+: H100, H200, L40S); set fp8: none")


def convert_to_fp8(model: nn.Module, recipe_name: str, device: torch.device, fsdp_all_gather: bool) -> int:
    """Swap the blocks' token Linears for torchao Float8Linear in place; returns how many were swapped."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    layers = len(model.transformer_blocks)
    convert_to_float8_training(model, config=fp8_config(recipe_name, device, fsdp_all_gather),
                               module_filter_fn=fp8_linear_filter(layers))
    return sum(isinstance(m, Float8Linear) for m in model.modules())


def checkpoint_forward(module: nn.Module, preserve_rng_state: bool) -> None:
    """Make `module` recompute its forward in backward (torch.utils.checkpoint, non-reentrant), keeping its
    name and its parameters' names. Hooks on the module (FSDP2's gathers, ZeRO-3's fetches) stay outside."""
    forward = module.forward

    @functools.wraps(forward)
    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False,
                                                 preserve_rng_state=preserve_rng_state, **kwargs)

    module.forward = checkpointed


def checkpointed_modules(blocks: nn.ModuleList, policy: CheckpointingPolicy) -> list[nn.Module]:
    """The modules `policy` checkpoints: whole blocks, or in every block its attention(s) or its MLP(s)."""
    if policy.kind in ("full", "every"):
        return [blocks[i] for i in policy.checkpointed_blocks(len(blocks))]
    names = {"attention": ("attn", "attn2"), "mlp": ("ff", "ff_context")}.get(policy.kind, ())
    return [getattr(block, name) for block in blocks for name in names if getattr(block, name, None) is not None]


def apply_checkpointing(blocks: nn.ModuleList, policy: CheckpointingPolicy) -> int:
    """Checkpoint what `policy` says; returns how many modules recompute in backward."""
    # LoRA dropout draws random masks: the recomputed forward must draw the same ones. SD3 itself has no
    # dropout, and saving RNG state costs a device sync on GPU.
    dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in blocks.modules())
    modules = checkpointed_modules(blocks, policy)
    for module in modules:
        checkpoint_forward(module, preserve_rng_state=dropout)
    return len(modules)


def compile_each_block(blocks: nn.ModuleList, backend: str = "inductor") -> None:
    """torch.compile every block in place (keys and module paths unchanged, unlike torch.compile(module)).

    dynamic=True: the token and batch dimensions are symbolic from the first call, so the eight aspect
    buckets of a recipe (and a remainder batch) share one graph per block; parameter shapes stay static.
    """
    for block in blocks:
        block.compile(dynamic=True, backend=backend)


def device_memory_gib(device: torch.device) -> float | None:
    """What `plan` calls the GPU's memory (nvidia-smi's total), or None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def prepare_blocks(model: nn.Module, *, policy: CheckpointingPolicy, compile_blocks: bool, fp8: str,
                   device: torch.device, fsdp_all_gather: bool, compile_backend: str = "inductor") -> dict[str, int]:
    """FP8 → activation checkpointing → compile, in place, in that order (torchtitan's): compile sees the
    fp8 casts and the recomputation and fuses them with their neighbours. Returns what was done, for the log."""
    done = {"fp8_linears": 0, "checkpointed": 0, "compiled_blocks": 0}
    if fp8 != "none":
        done["fp8_linears"] = convert_to_fp8(model, fp8, device, fsdp_all_gather)
    blocks = model.transformer_blocks
    done["checkpointed"] = apply_checkpointing(blocks, policy)
    if compile_blocks:
        compile_each_block(blocks, compile_backend)
        done["compiled_blocks"] = len(blocks)
    return done


@dataclasses.dataclass(frozen=True)
class ComputeSettings:
    """What the recipe's train.gradient_checkpointing, compile_blocks and fp8 mean on this rank's device."""

    policy: CheckpointingPolicy
    compile_blocks: bool
    fp8: str
    compile_backend: str = "inductor"

    def describe(self, layers: int) -> str:
        compiled = f"per block, dynamic shapes, {self.compile_backend}" if self.compile_blocks else "off"
        return f"activation checkpointing: {self.policy.describe(layers)}; compile: {compiled}; fp8: {self.fp8}"


def compute_settings(recipe: Recipe, config: Mapping[str, Any], mesh: MeshLayout, device: torch.device,
                     recipe_file: str = "recipe") -> ComputeSettings:
    """Resolve `auto`s for `device` (the checkpointing policy `sd35dist plan` predicts for this GPU's memory;
    compile on CUDA) and refuse FP8 on a GPU without it, in one line."""
    if recipe.train.fp8 != "none":
        require_fp8_device(device, recipe_file)
    policy = resolve_checkpointing(recipe, config, mesh, device_memory_gib(device))
    return ComputeSettings(policy, compile_on(recipe.train.compile_blocks, device), recipe.train.fp8,
                           recipe.train.compile_backend)


def refresh_fp8_scales(model: nn.Module, settings: ComputeSettings) -> None:
    """After an optimizer step, with fp8 all-gathers: every fp8 weight's scale in one all-reduce
    (torchao's precompute), instead of one per weight inside the next forward."""
    if settings.fp8 == "tensorwise":
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)
