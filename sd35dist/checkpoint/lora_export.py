"""`sd35dist export` of a LoRA checkpoint: `pytorch_lora_weights.safetensors` in diffusers' format
(which ComfyUI loads too), or with `--merge` the full transformer with the LoRA fused in, in the
same diffusers layout as a full fine-tune's export.

The LoRA file names tensors `transformer.<module>.lora_A.weight` / `.lora_B.weight` as
`StableDiffusion3Pipeline.save_lora_weights` does, with alpha / rank folded into lora_B so
every loader applies the same update (models/lora.py). Its safetensors metadata holds diffusers'
`lora_adapter_metadata` (the LoraConfig that reads it back) and sd35dist's own record: rank,
alpha, targets, base model, step and the recipe's sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sd35dist.checkpoint.layout import CheckpointUnreadable, read_info, saved_recipe
from sd35dist.config.recipe import LoraSection
from sd35dist.runtime.atomic_files import staged_directory

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""The file name diffusers' load_lora_weights looks for in a directory."""
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
"""diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY: the LoraConfig diffusers builds the adapter from,
its fields prefixed by the component (`transformer.r`), as save_lora_weights writes it."""
METADATA_PREFIX = "sd35dist."


def checkpoint_lora(checkpoint: Path) -> LoraSection | None:
    """The `train.lora` section the checkpoint was trained with; None for a full fine-tune."""
    section = (saved_recipe(checkpoint).get("train") or {}).get("lora")
    return None if section is None else LoraSection.model_validate(section)


def lora_metadata(checkpoint: Path, section: LoraSection, modules: list[str]) -> dict[str, str]:
    """safetensors metadata (strings only): diffusers' LoraConfig and sd35dist's record of the run."""
    recipe = saved_recipe(checkpoint)
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    # The scale is in lora_B already: alpha = rank makes diffusers' scale 1.
    diffusers_config = {"r": section.rank, "lora_alpha": section.rank, "target_modules": modules,
                        "lora_dropout": 0.0, "use_dora": False, "lora_bias": False}
    record = {"rank": section.rank, "alpha": section.alpha, "scale_in_lora_B": section.alpha / section.rank,
              "targets": section.targets, "base_model": (recipe.get("model") or {}).get("pretrained"),
              "step": step, "recipe_sha256": read_info(checkpoint).get("recipe_sha256")}
    # diffusers keys each component's LoraConfig fields by the component (transformer.r, …).
    packed = {f"transformer.{key}": value for key, value in diffusers_config.items()}
    return {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, sort_keys=True),
            **{METADATA_PREFIX + key: json.dumps(value) for key, value in record.items()}}


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
    tensors = {key: tensor.to(dtype) for key, tensor in diffusers_lora_state(adapters, section).items()}
    with staged_directory(out) as staging:
        save_file(tensors, str(staging / LORA_WEIGHTS),
                  metadata=lora_metadata(checkpoint, section, adapted_modules(tensors)))
    return out


def merged_transformer(checkpoint: Path, section: LoraSection, adapters: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The base transformer (from the recipe's model.pretrained) with the adapters merged into its weights (fp32)."""
    from diffusers import SD3Transformer2DModel
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    from sd35dist.models.lora import ADAPTER, lora_config, target_modules

    model_section = saved_recipe(checkpoint).get("model") or {}
    base = Path(model_section.get("pretrained", "")) / model_section.get("transformer_subfolder", "transformer")
    if not (base / "config.json").is_file():
        # Never a Hub lookup: a moved base model is a local path that is gone, not a repository id.
        raise CheckpointUnreadable(f"{checkpoint}: --merge needs the base transformer the LoRA was trained on, {base}, "
                          "which is not there (moved?): put it back, or export the LoRA file without --merge")
    model = SD3Transformer2DModel.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    inject_adapter_in_model(lora_config(section, target_modules(model, section.targets)), model, adapter_name=ADAPTER)
    result = model.load_state_dict(adapters, strict=False)
    missing = [key for key in result.missing_keys if ".lora_" in key]
    if result.unexpected_keys or missing:
        raise ValueError(f"{checkpoint}: adapters do not fit the model built from {base}: "
                         f"unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}")
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model
