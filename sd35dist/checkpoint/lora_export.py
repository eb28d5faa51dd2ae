"""`sd35dist export` of an adapter checkpoint: `pytorch_lora_weights.safetensors`, or with `--merge`
the full transformer with the adapters fused in, in the same diffusers layout as a full fine-tune's
export. (`--format kohya`: checkpoint/kohya_export.py.)

A LoRA file names tensors `transformer.<module>.lora_A.weight` / `.lora_B.weight` as
`StableDiffusion3Pipeline.save_lora_weights` does, with alpha / rank folded into lora_B so
every loader applies the same update (models/lora.py); its metadata holds diffusers'
`lora_adapter_metadata` (the LoraConfig that reads it back). A LoKr/LoHa file is LyCORIS's own
(`lycoris_<module>.lokr_w1 …` and `.alpha`, models/lycoris.py), the file SimpleTuner writes, which
lycoris-lora and ComfyUI load; its metadata holds the `lycoris_config` it was trained with. Both
carry sd35dist's record: rank, alpha, targets, base model, step and the recipe's sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sd35dist.checkpoint.layout import TRANSFORMER_CONFIG, CheckpointUnreadable, read_info, saved_recipe
from sd35dist.config.recipe import LoraSection
from sd35dist.runtime.atomic_files import staged_directory

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""The file name diffusers' load_lora_weights looks for in a directory."""
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
"""diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY: the LoraConfig diffusers builds the adapter from,
its fields prefixed by the component (`transformer.r`), as save_lora_weights writes it."""
METADATA_PREFIX = "sd35dist."
LYCORIS_METADATA_KEY = "lycoris_config"
"""What SimpleTuner's save hook stores beside LyCORIS's weights: the lycoris_config, JSON."""


def checkpoint_lora(checkpoint: Path) -> LoraSection | None:
    """The `train.lora` section the checkpoint was trained with; None for a full fine-tune."""
    section = (saved_recipe(checkpoint).get("train") or {}).get("lora")
    return None if section is None else LoraSection.model_validate(section)


def lora_metadata(checkpoint: Path, section: LoraSection, modules: list[str]) -> dict[str, str]:
    """safetensors metadata (strings only): diffusers' LoraConfig (or LyCORIS's config) and sd35dist's record."""
    recipe = saved_recipe(checkpoint)
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    record = {"type": section.type, "rank": section.rank, "alpha": section.alpha, "targets": section.targets,
              "base_model": (recipe.get("model") or {}).get("pretrained"), "step": step,
              "recipe_sha256": read_info(checkpoint).get("recipe_sha256")}
    ours = {METADATA_PREFIX + key: json.dumps(value) for key, value in record.items()}
    if section.type != "lora":
        return {"format": "pt", LYCORIS_METADATA_KEY: json.dumps(lycoris_config(section), sort_keys=True), **ours,
                METADATA_PREFIX + "modules": json.dumps(len(modules))}
    # The scale is in lora_B already: alpha = rank makes diffusers' scale 1.
    diffusers_config = {"r": section.rank, "lora_alpha": section.rank, "target_modules": modules,
                        "lora_dropout": 0.0, "use_dora": False, "lora_bias": False}
    # diffusers keys each component's LoraConfig fields by the component (transformer.r, …).
    packed = {f"transformer.{key}": value for key, value in diffusers_config.items()}
    return {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, sort_keys=True), **ours,
            METADATA_PREFIX + "scale_in_lora_B": json.dumps(section.alpha / section.rank)}


def lycoris_config(section: LoraSection) -> dict:
    """The section as SimpleTuner's lycoris_config (LyCORIS's create_lycoris arguments) says it."""
    config: dict = {"algo": section.type, "multiplier": 1.0, "linear_dim": section.rank, "linear_alpha": section.alpha}
    if section.type == "lokr":
        config.update(factor=section.factor, full_matrix=section.full_matrix, decompose_both=section.decompose_both)
    if section.preset is not None:
        config["apply_preset"] = section.preset.model_dump(exclude_defaults=True, exclude_none=True)
    return config


def checkpoint_adapted_linears(checkpoint: Path, section: LoraSection) -> list:
    """Which Linears a LyCORIS checkpoint adapts, from its transformer_config.json (a meta model; no weights)."""
    from sd35dist.models.lycoris import adapted_linears
    from sd35dist.models.transformer_build import build_on_meta

    model = build_on_meta(json.loads((checkpoint / TRANSFORMER_CONFIG).read_text()))
    return adapted_linears(model, section)


def export_lora(checkpoint: Path, out: Path, state: dict[str, torch.Tensor], *, dtype: torch.dtype,
                merge: bool = False, max_shard_size: str = "5GB") -> Path:
    """Write `out` from the checkpoint's (plain-named) `state`: the LoRA file, or the merged transformer."""
    from safetensors.torch import save_file

    from sd35dist.models.lora import adapted_modules, adapter_state, diffusers_lora_state

    section = checkpoint_lora(checkpoint)
    assert section is not None, f"{checkpoint} is not a LoRA checkpoint"
    adapters = adapter_state(state)
    if merge:
        model = merged_transformer(checkpoint, section, adapters)
        with staged_directory(out) as staging:
            model = model if model.dtype == dtype else model.to(dtype)  # diffusers warns on every cast
            model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        return out
    if section.type == "lora":
        tensors = diffusers_lora_state(adapters, section)
        modules = adapted_modules(tensors)
    else:
        from sd35dist.models.lycoris import lycoris_file_state

        targets = checkpoint_adapted_linears(checkpoint, section)
        tensors, modules = lycoris_file_state(adapters, targets), [target.module for target in targets]
    tensors = {key: tensor.to(dtype) for key, tensor in tensors.items()}
    with staged_directory(out) as staging:
        save_file(tensors, str(staging / LORA_WEIGHTS), metadata=lora_metadata(checkpoint, section, modules))
    return out


def merged_transformer(checkpoint: Path, section: LoraSection, adapters: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The base transformer (from the recipe's model.pretrained) with the adapters merged into its weights (fp32)."""
    from diffusers import SD3Transformer2DModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sd35dist.models.lora import inject_lora, is_adapter_key

    model_section = saved_recipe(checkpoint).get("model") or {}
    base = Path(model_section.get("pretrained", "")) / model_section.get("transformer_subfolder", "transformer")
    if not (base / "config.json").is_file():
        # Never a Hub lookup: a moved base model is a local path that is gone, not a repository id.
        raise CheckpointUnreadable(f"{checkpoint}: --merge needs the base transformer the LoRA was trained on, {base}, "
                          "which is not there (moved?): put it back, or export the LoRA file without --merge")
    model = SD3Transformer2DModel.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    inject_lora(model, section, dtype=torch.float32)
    result = model.load_state_dict(adapters, strict=False)
    missing = [key for key in result.missing_keys if is_adapter_key(key)]
    if result.unexpected_keys or missing:
        raise ValueError(f"{checkpoint}: adapters do not fit the model built from {base}: "
                         f"unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}")
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model
