"""The SD3 MMDiT built on the meta device, then materialised and loaded file by file.

The order torchtitan uses, so an 8B model never exists in full on any rank:

    config = transformer_config(model_dir)
    model = build_on_meta(config)             # shapes only, no memory
    parallelize_fsdp2(model, ...)             # sharding decided while still on meta
    materialize_and_load(model, model_dir)    # to_empty, then each rank copies its shard

Loading follows the checkpoint's index json one safetensors file at a time and one tensor
at a time; a sharded (DTensor) parameter keeps only this rank's slice, so a rank holds its
shard of the model plus at most one full tensor. The same function loads an unsharded model,
which is how the tests compare against `SD3Transformer2DModel.from_pretrained`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sd35dist.models.state_keys import key_mismatch, plain_name

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


FP32_INPUTS = ("timestep",)
"""Forward inputs that stay fp32 whatever the compute dtype: the sinusoidal time projection gets
the timestep in fp32, as the diffusers pipeline gives it (in bf16, 928.35 would become 928)."""


class CheckpointMismatch(ValueError):
    """The checkpoint's tensors do not match the model built from its config (names or shapes)."""


def transformer_config(model_dir: Path, subfolder: str = "transformer") -> dict[str, Any]:
    """The transformer's config.json as a dict (diffusers' `_class_name` etc. included)."""
    path = Path(model_dir) / subfolder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a diffusers SD3 directory with a {subfolder}/ subfolder")
    return json.loads(path.read_text())


def build_on_meta(config: dict[str, Any], *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An SD3Transformer2DModel whose parameters and buffers are all on the meta device."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    # nn.Module.to, not ModelMixin.to: the latter warns on every dtype cast.
    return model if model.dtype == dtype else nn.Module.to(model, dtype)


def materialize_and_load(
    model: nn.Module,
    model_dir: Path,
    subfolder: str = "transformer",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    initial: Mapping[str, Callable[[], torch.Tensor]] | None = None,
) -> nn.Module:
    """Give a meta-built (possibly FSDP2-sharded) model real storage and the pretrained weights.

    `dtype` is the dtype the parameters are kept in (the master weights); the model must have
    been built in it (`build_on_meta(config, dtype=...)`). Checkpoint tensors are converted to
    it as they are copied. `initial` makes the full tensors of keys the checkpoint cannot have
    (LoRA adapters, models/lora.py), which may be in another dtype. Raises CheckpointMismatch,
    before reading any weights, when a model key is not in the checkpoint (and cannot be
    recomputed or made) or the checkpoint has extra keys.
    """
    folder = Path(model_dir) / subfolder
    initial = dict(initial or {})
    key_files = checkpoint_key_files(folder)
    targets = _plain_state(model)
    recomputable = set(_derived_buffer_names(model)) | set(initial)
    _check_keys(folder, set(targets), set(key_files), recomputable)
    _check_dtype(model, dtype, skip=set(initial))

    model.to_empty(device=device)
    recomputed = recompute_derived_buffers(model)
    _check_buffers_restorable(model, targets, recomputed | set(initial))
    # to_empty swaps in new tensors; fetch the live ones again.
    targets = _plain_state(model)
    with torch.no_grad():
        for name, tensor in iter_checkpoint_tensors(folder, key_files):
            _copy_full_into(targets[name], tensor, name, folder)
        for name, make in initial.items():
            _copy_full_into(targets[name], make(), name, folder)
    return model


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # peft's `base_layer.` stays in state-dict keys; the checkpoint names the plain module.
    return {plain_name(name): tensor for name, tensor in model.state_dict(keep_vars=True).items()}


def checkpoint_key_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key → the safetensors file holding it, from the index json or the one file's header."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / file for key, file in weight_map.items()}
    single = folder / WEIGHTS_NAME
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt", device="cpu") as handle:
            return {key: single for key in handle.keys()}
    raise FileNotFoundError(f"{folder}: neither {WEIGHTS_INDEX_NAME} nor {WEIGHTS_NAME}; the transformer weights are missing")


def iter_checkpoint_tensors(folder: Path, key_files: dict[str, Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, full tensor) pairs, one file open at a time, one tensor in memory at a time."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key, path in key_files.items():
        by_file.setdefault(path, []).append(key)
    for path in sorted(by_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {folder / WEIGHTS_INDEX_NAME} but not on disk")
        with safe_open(path, framework="pt", device="cpu") as handle:
            for key in sorted(by_file[path]):
                yield key, handle.get_tensor(key)


def recompute_derived_buffers(model: nn.Module) -> set[str]:
    """Refill buffers that are a pure function of the config; returns their state-dict-style names.

    After `to_empty` every buffer holds garbage. SD3's only buffer is PatchEmbed's sin-cos
    `pos_embed`: persistent (so normally loaded from the checkpoint), but recomputing it here
    means a checkpoint without it, or a non-persistent variant, still ends up correct.
    """
    from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed

    recomputed = set()
    for name, module in model.named_modules():
        if not isinstance(module, PatchEmbed) or module.pos_embed is None:
            continue
        buffer = module.pos_embed
        # The same arguments PatchEmbed.__init__ derives from its own (SD3 passes height == width).
        grid_size = module.pos_embed_max_size or int((module.height * module.width) ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(
            module.proj.out_channels,
            grid_size,
            base_size=module.base_size,
            interpolation_scale=module.interpolation_scale,
            output_type="pt",
        )
        with torch.no_grad():
            buffer.copy_(pos_embed.float().unsqueeze(0))
        recomputed.add(plain_name(f"{name}.pos_embed" if name else "pos_embed"))
    return recomputed


def _derived_buffer_names(model: nn.Module) -> Iterator[str]:
    from diffusers.models.embeddings import PatchEmbed

    for name, module in model.named_modules():
        if isinstance(module, PatchEmbed) and module.pos_embed is not None:
            yield plain_name(f"{name}.pos_embed" if name else "pos_embed")


def _check_keys(folder: Path, model_keys: set[str], checkpoint_keys: set[str], recomputable: set[str]) -> None:
    problem = key_mismatch(model_keys, checkpoint_keys, recomputable)
    if problem is not None:
        raise CheckpointMismatch(
            f"{folder}: checkpoint does not match the model built from its config.json: {problem}; "
            "point model.pretrained at an unmodified SD3/SD3.5 diffusers directory"
        )


def _check_dtype(model: nn.Module, dtype: torch.dtype, skip: set[str] = frozenset()) -> None:
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dtype != dtype and plain_name(name) not in skip:
            raise ValueError(
                f"parameter {plain_name(name)} is {param.dtype}, expected {dtype}; "
                f"build the model with build_on_meta(config, dtype={dtype})"
            )


def _check_buffers_restorable(model: nn.Module, targets: dict[str, torch.Tensor], recomputed: set[str]) -> None:
    # A non-persistent buffer is neither loaded nor (unless known) recomputed: it would stay garbage.
    for name, _ in model.named_buffers():
        name = plain_name(name)
        if name not in targets and name not in recomputed:
            raise NotImplementedError(f"buffer {name} is not in the state dict and has no recipe to recompute it after to_empty")


def _copy_full_into(target: torch.Tensor, full: torch.Tensor, name: str, folder: Path) -> None:
    """Copy `full` (the whole checkpoint tensor) into `target`, keeping only the local shard of a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if tuple(full.shape) != tuple(target.shape):
        raise CheckpointMismatch(
            f"{folder}: {name} has shape {tuple(full.shape)} in the checkpoint but {tuple(target.shape)} in the model "
            "built from config.json"
        )
    if isinstance(target, DTensor):
        full = full.to(device=target.device, dtype=target.dtype)
        # src_data_rank=None: every rank read the same file, so each slices locally with no scatter.
        shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(shard.to_local())
    else:
        target.copy_(full)
