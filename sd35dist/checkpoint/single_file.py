"""`sd35dist export … --format single-file`: one safetensors file in Stability's SD3.5 layout.

The layout `sd3.5_large.safetensors` ships in, which ComfyUI, Forge and the model hubs load:
the MMDiT under `model.diffusion_model.` and, with `--with-vae`, the VAE under
`first_stage_model.` (original_layout.py holds the key plan). The file is written streaming
(safetensors_stream.py): one output tensor and the few input tensors it is made of are in
memory at a time, read from the checkpoint by its strategy's lazy reader (tensor_sources.py).
Its metadata carries the `modelspec.*` keys hubs and UIs read, and where the weights came from.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sd35dist.checkpoint.original_layout import OriginalTensor, output_shape, transformer_plan, vae_plan
from sd35dist.checkpoint.safetensors_stream import TensorSpec, write_streaming
from sd35dist.checkpoint.tensor_sources import TensorSource

SINGLE_FILE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                      "fp8_e4m3fn": torch.float8_e4m3fn}
FP8_MAX = 448.0  # largest finite float8_e4m3fn; the cast would make larger values NaN
MODELSPEC_VERSION = "1.0.0"
IMPLEMENTATION = "https://github.com/Stability-AI/sd3.5"
VAE_SCALE = 8  # latent pixels → image pixels


@dataclass(frozen=True)
class Part:
    """One model in the file: where its tensors come from, and the plan that renames them."""

    source: TensorSource
    plan: list[OriginalTensor]


def stored_dtype(name: str, shape: tuple[int, ...], dtype: str) -> torch.dtype:
    """The dtype a tensor is stored in. fp8 stores the MMDiT's linear weights (2-D) only: the
    convolutions, biases, norms, pos_embed and the whole VAE stay bf16, as fp8 files for
    inference commonly do (the UI upcasts each weight when it uses it)."""
    if dtype != "fp8_e4m3fn":
        return SINGLE_FILE_DTYPES[dtype]
    return torch.float8_e4m3fn if len(shape) == 2 and name.startswith("model.") else torch.bfloat16


def transformer_part(source: TensorSource, config: Mapping) -> Part:
    return Part(source, transformer_plan(config, source.specs()))


def vae_part(source: TensorSource, config: Mapping) -> Part:
    return Part(source, vae_plan(config, source.specs()))


def file_specs(parts: list[Part], dtype: str) -> list[TensorSpec]:
    """Every output tensor's name, shape and stored dtype, wider dtypes first (keeps tensors aligned)."""
    specs = []
    for part in parts:
        shapes = part.source.specs()
        for tensor in part.plan:
            shape = output_shape(tensor, [shapes[s][0] for s in tensor.sources])
            specs.append(TensorSpec(tensor.name, shape, stored_dtype(tensor.name, shape, dtype)))
    return sorted(specs, key=lambda s: -torch.empty((), dtype=s.dtype).element_size())


def make_tensor(tensor: OriginalTensor, source: TensorSource, dtype: torch.dtype) -> torch.Tensor:
    """Read the sources of one original tensor, combine them, cast."""
    inputs = [source.get(name) for name in tensor.sources]
    if tensor.op == "qkv":
        made = torch.cat(inputs, dim=0)
    elif tensor.op == "swap_halves":
        shift_or_scale, other = inputs[0].chunk(2, dim=0)
        made = torch.cat([other, shift_or_scale], dim=0)
    elif tensor.op == "conv1x1":
        made = inputs[0][:, :, None, None] if inputs[0].ndim == 2 else inputs[0]
    else:
        made = inputs[0]
    del inputs
    if dtype == torch.float8_e4m3fn:
        made = made.float().clamp(-FP8_MAX, FP8_MAX)
    return made.to(dtype)


def peak_bytes(parts: list[Part], dtype: str, group_of: Callable[[str], str] | None = None) -> int:
    """The most bytes the writer holds at once: one output tensor's inputs, what combining them
    makes, and the stored copy (the largest such set over the file). `group_of` names the
    group a source reads its tensors in (an FSDP2 checkpoint reads a block at a time)."""
    peak = 0
    for part in parts:
        shapes = part.source.specs()
        nbytes = {name: TensorSpec(name, tuple(shape), kind).nbytes for name, (shape, kind) in shapes.items()}
        groups: dict[str, int] = {}
        if group_of is not None:
            for name, size in nbytes.items():
                groups[group_of(name)] = groups.get(group_of(name), 0) + size
        for tensor in part.plan:
            first = shapes[tensor.sources[0]]
            shape = output_shape(tensor, [shapes[s][0] for s in tensor.sources])
            held = groups[group_of(tensor.sources[0])] if group_of else sum(nbytes[s] for s in tensor.sources)
            made = TensorSpec(tensor.name, shape, first[1]).nbytes if tensor.op != "copy" else 0
            stored = TensorSpec(tensor.name, shape, stored_dtype(tensor.name, shape, dtype)).nbytes
            peak = max(peak, held + made + stored)
    return peak


def architecture(config: Mapping) -> str:
    """The modelspec architecture: SD3.5 Medium's MMDiT-X has dual attention layers, Large none."""
    return "stable-diffusion-v3.5-medium" if config.get("dual_attention_layers") else "stable-diffusion-v3.5-large"


def modelspec_metadata(config: Mapping, *, title: str, base_model: str, step: int | None, recipe_sha256: str | None,
                       ema: bool, dtype: str, with_vae: bool) -> dict[str, str]:
    """The `modelspec.*` keys (Stability's model metadata spec, read by hubs and UIs) plus ours."""
    pixels = int(config.get("sample_size", 128)) * VAE_SCALE
    described = (f"Full fine-tune of {base_model} at step {step}" if step is not None
                 else f"Weights of {base_model}")
    metadata = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture(config),
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.description": described + (", EMA weights" if ema else "") + ", exported by sd35dist",
        "modelspec.resolution": f"{pixels}x{pixels}",
        "modelspec.date": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "sd35dist.base_model": base_model,
        "sd35dist.ema": "true" if ema else "false",
        "sd35dist.dtype": dtype,
        "sd35dist.with_vae": "true" if with_vae else "false",
        "sd35dist.transformer_config": json.dumps(dict(config), sort_keys=True),
    }
    if step is not None:
        metadata["sd35dist.step"] = str(step)
    if recipe_sha256:
        metadata["sd35dist.recipe_sha256"] = recipe_sha256
    return metadata


def write_single_file(out: Path, parts: list[Part], dtype: str, metadata: Mapping[str, str]) -> int:
    """Write `out` (complete or not at all); returns its size in bytes."""
    origin = {tensor.name: (tensor, part.source) for part in parts for tensor in part.plan}

    def make(spec: TensorSpec) -> torch.Tensor:
        tensor, source = origin[spec.name]
        return make_tensor(tensor, source, spec.dtype)

    return write_streaming(out, file_specs(parts, dtype), make, metadata)


def export_single_file(source_path: Path, out: Path, *, use_ema: bool = False, dtype: str = "bf16",
                       with_vae: bool = False, vae_dir: Path | None = None, title: str | None = None) -> int:
    """Export a complete checkpoint, or a diffusers transformer folder (a merged LoRA's, say), to `out`.

    The VAE comes from `vae_dir`, else the base model's `vae/` (the checkpoint's recipe names
    the base model; a transformer folder's sibling `vae/`). Returns the file's size.
    """
    from sd35dist.checkpoint.inspect import open_checkpoint
    from sd35dist.checkpoint.layout import COMPLETE, TRANSFORMER_CONFIG, CheckpointUnreadable, read_info, saved_recipe
    from sd35dist.checkpoint.tensor_sources import SafetensorsFiles

    if out.exists():
        raise CheckpointUnreadable(f"{out} already exists: choose another --out")
    if not out.parent.is_dir():
        raise CheckpointUnreadable(f"{out.parent}: no such directory for --out")
    step = recipe_sha256 = None
    if (source_path / COMPLETE).is_file():
        config_file = source_path / TRANSFORMER_CONFIG
        if not config_file.is_file():
            raise CheckpointUnreadable(f"{source_path}: no {TRANSFORMER_CONFIG}")
        info = read_info(source_path)
        step, recipe_sha256 = info.get("step"), info.get("recipe_sha256")
        base = saved_recipe(source_path).get("model") or {}
        base_model = str(base.get("pretrained", "unknown"))
        default_vae = Path(base_model) / "vae"
        source: TensorSource = open_checkpoint(source_path, use_ema)
    elif (source_path / "config.json").is_file():
        if use_ema:
            raise CheckpointUnreadable(f"{source_path}: a diffusers folder holds one set of weights; --ema needs a checkpoint")
        config_file, base_model, default_vae = source_path / "config.json", str(source_path), source_path.parent / "vae"
        source = SafetensorsFiles.folder(source_path)
    else:
        raise CheckpointUnreadable(f"{source_path}: neither a complete checkpoint nor a diffusers folder (config.json)")
    config = json.loads(config_file.read_text())
    parts = [transformer_part(source, config)]
    if with_vae:
        vae = vae_dir or default_vae
        if not (vae / "config.json").is_file():
            raise CheckpointUnreadable(f"{vae}: no VAE here (config.json missing); name one with --vae DIR")
        parts.append(vae_part(SafetensorsFiles.folder(vae), json.loads((vae / "config.json").read_text())))
    metadata = modelspec_metadata(config, title=title or out.stem, base_model=base_model, step=step,
                                  recipe_sha256=recipe_sha256, ema=use_ema, dtype=dtype, with_vae=with_vae)
    return write_single_file(out, parts, dtype, metadata)
