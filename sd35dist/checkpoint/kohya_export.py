"""`sd35dist export CHECKPOINT --format kohya --out FILE`: a LoRA in the form kohya's sd-scripts loads.

sd-scripts' SD3 LoRA network (networks/lora_sd3.py at kohya-ss/sd-scripts 48d368f) adapts the
Linears of its own MMDiT, named as Stability's original layout names them, and finds them in a
file by `lora_unet_<module path with _>`: `lora_unet_joint_blocks_0_x_block_attn_qkv`. Each has
`.lora_down.weight` (rank × in), `.lora_up.weight` (out × rank) and `.alpha` (it reads every
module's alpha; ΔW = up · down · alpha / rank). q, k and v are one fused `attn.qkv` Linear there,
so our separate to_q / to_k / to_v adapters (rank r each) become one adapter of rank 3r:

    down = [A_q; A_k; A_v]            (3r × in)
    up   = diag(B_q, B_k, B_v)        (3·out × 3r, zero off the diagonal blocks)
    alpha = 3α                        (so alpha / rank stays α / r)

which is exactly the concatenation [B_q·A_q; B_k·A_k; B_v·A_v] the original layout's qkv weight
is. The module names and the adaLN half swaps are the single-file export's (original_layout.py);
ComfyUI maps `lora_unet_*` keys onto the same MMDiT weights, so the file works there as well.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from sd35dist.checkpoint.layout import TRANSFORMER_CONFIG, read_info, saved_recipe
from sd35dist.checkpoint.original_layout import TRANSFORMER_PREFIX, transformer_plan
from sd35dist.config.recipe import LoraSection

KOHYA_PREFIX = "lora_unet_"
NETWORK_MODULE = "networks.lora_sd3"
"""sd-scripts' `ss_network_module` for an SD3 LoRA (train_network.py writes it into the metadata)."""


def kohya_name(original: str) -> str:
    """`joint_blocks.0.x_block.attn.qkv` → `lora_unet_joint_blocks_0_x_block_attn_qkv`."""
    return KOHYA_PREFIX + original.replace(".", "_")


def kohya_lora_state(adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]], alpha: float,
                     config: Mapping) -> dict[str, torch.Tensor]:
    """Our adapters (diffusers module → (A, B), unscaled) as sd-scripts names and fuses them."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for tensor in transformer_plan(config, None):
        if not tensor.name.endswith(".weight"):
            continue
        sources = [source.removesuffix(".weight") for source in tensor.sources]
        present = [(index, adapters[source]) for index, source in enumerate(sources) if source in adapters]
        if not present:
            continue
        name = kohya_name(tensor.name.removeprefix(TRANSFORMER_PREFIX).removesuffix(".weight"))
        if tensor.op == "qkv":
            widths = [int(config["num_attention_heads"]) * int(config["attention_head_dim"])] * len(sources)
            rank = sum(a.shape[0] for _, (a, _b) in present)
            up = torch.zeros(sum(widths), rank, dtype=torch.float32)
            downs, column = [], 0
            for index, (a, b) in present:
                row = sum(widths[:index])
                up[row:row + b.shape[0], column:column + b.shape[1]] = b.float()
                downs.append(a.float())
                column += a.shape[0]
            down, scale_alpha = torch.cat(downs), alpha * len(present)
        else:
            (_, (a, b)), = present
            down, up, scale_alpha = a.float(), b.float(), alpha
            if tensor.op == "swap_halves":  # diffusers' AdaLayerNormContinuous is (scale, shift); the original (shift, scale)
                half = up.shape[0] // 2
                up = torch.cat([up[half:], up[:half]])
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(scale_alpha))
        used.update(sources[index] for index, _ in present)
    missing = sorted(set(adapters) - used)
    if missing:
        raise ValueError(f"adapters with no place in sd-scripts' SD3 network: {missing[:3]}")
    return out


def checkpoint_lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module → (A, B) from a checkpoint's peft-named LoRA tensors (`X.lora_A.default.weight`)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for role in ("lora_A", "lora_B"):
            marker = f".{role}."
            if marker in key:
                pairs.setdefault(key.split(marker)[0], {})[role] = tensor
    return {module: (roles["lora_A"], roles["lora_B"]) for module, roles in pairs.items()}


def export_kohya(checkpoint: Path, out: Path, state: Mapping[str, torch.Tensor], section: LoraSection, *,
                 dtype: torch.dtype) -> Path:
    """Write `out` (one safetensors file) atomically from a LoRA checkpoint's (plain-named) `state`."""
    from safetensors.torch import save_file

    from sd35dist.runtime.atomic_files import give_umask_modes, temporary_name

    config = json.loads((checkpoint / TRANSFORMER_CONFIG).read_text())
    tensors = kohya_lora_state(checkpoint_lora_pairs(state), section.alpha, config)
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    recipe = saved_recipe(checkpoint)
    metadata = {"ss_network_module": NETWORK_MODULE, "ss_network_dim": str(section.rank),
                "ss_network_alpha": str(section.alpha), "ss_base_model_version": "sd3",
                "sd35dist.base_model": json.dumps((recipe.get("model") or {}).get("pretrained")),
                "sd35dist.step": json.dumps(step), "sd35dist.targets": json.dumps(section.targets),
                "sd35dist.recipe_sha256": json.dumps(read_info(checkpoint).get("recipe_sha256"))}
    staging = temporary_name(out)
    try:
        save_file({key: tensor.to(dtype) if key.endswith(".weight") else tensor for key, tensor in tensors.items()},
                  str(staging), metadata=metadata)
        give_umask_modes(staging)  # save_file leaves 0600; others on the cluster read exports
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    return out
