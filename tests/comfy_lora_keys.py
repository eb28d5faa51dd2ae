"""ComfyUI's SD3 LoRA key map, reimplemented from its public source for the tests (no package on
the registry carries ComfyUI's loader: `pip index versions comfyui` finds none).

Read from comfyanonymous/ComfyUI:
- comfy/utils.py `mmdit_to_diffusers` at commit 2ba5cc8b867bc1aabe59fdaf0a8489e65012d603:
  diffusers SD3 weight names → ComfyUI MMDiT weights (`joint_blocks.N.x_block…`); to_q/to_k/to_v
  (and add_q/k/v_proj) map onto slices of one fused qkv weight, offset `depth * 64` each;
  norm_out.linear and the last block's norm1_context.linear carry a scale/shift swap.
- comfy/lora.py `model_lora_keys_unet` at commit 41444b5236c613ee5ff7d09aa620f94b702f30eb: for an SD3
  model each diffusers weight `X.weight` is reachable as LoRA key `transformer.X` ("regular diffusers
  sd3 lora format"), and `load_lora` takes `{key}.lora_B.weight` (up) with `{key}.lora_A.weight`
  (down), and `{key}.alpha` when present (absent: scale 1).
- comfy/lora.py `model_lora_keys_unet` (same commit), SD3 branch: each diffusers weight is also
  reachable as `lycoris_<diffusers module with _ for .>` ("simpletuner lycoris format") and every
  MMDiT weight as `lora_unet_<MMDiT module with _ for .>` (kohya's names); `load_lora` reads
  `{key}.lokr_w1|lokr_w2|lokr_w1_a|lokr_w1_b|lokr_w2_a|lokr_w2_b|lokr_t2`, `{key}.hada_w1_a …` and
  `{key}.alpha`.
- comfy/weight_adapter/lokr.py at 179c2d35c84beb3d9761fcd146ffcba77273413e and
  comfy/weight_adapter/loha.py at 17adbb5cacc2d08310dad408e043a5d18e3ec013, `calculate_weight`:
  LoKr ΔW = kron(w1, w2) with w1 = w1_a @ w1_b and w2 = w2_a @ w2_b when factored; the scale is
  alpha / dim where dim is the rank of the last factored half (w1_b's, then w2_b's rows), and 1
  when neither half is factored or the file has no alpha. LoHa ΔW = (w1_a @ w1_b) * (w2_a @ w2_b)
  · alpha / w1_b's rows. ΔW is reshaped to the target (a qkv slice for to_q/k/v) and added; a
  shape that does not fit is logged and skipped, so a test must check the weight changed.
Only the rules that decide whether a key loads and what it adds are reimplemented; no ComfyUI
code is copied.
"""

from __future__ import annotations

import torch

MMDIT_BLOCK = {  # ComfyUI name in a joint block ← diffusers name in transformer_blocks.N
    "context_block.adaLN_modulation.1": "norm1_context.linear",
    "context_block.attn.proj": "attn.to_add_out",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
    "x_block.adaLN_modulation.1": "norm1.linear",
    "x_block.attn.proj": "attn.to_out.0",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
}
MMDIT_BASIC = {
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "x_embedder.proj": "pos_embed.proj",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "final_layer.linear": "proj_out",
}
QKV = {"to_q": ("x_block", 0), "to_k": ("x_block", 1), "to_v": ("x_block", 2),
       "add_q_proj": ("context_block", 0), "add_k_proj": ("context_block", 1), "add_v_proj": ("context_block", 2)}


def comfy_sd3_unet_config(transformer_config: dict) -> dict:
    """The MMDiT ComfyUI builds for an SD3 checkpoint: its model detection (comfy/model_detection.py at
    d415a44) reads depth = x_embedder width / 64 and counts no blocks, and MMDiT (comfy/ldm/modules/
    diffusionmodules/mmdit.py at 03925bd) makes `depth` heads of 64 and, with num_blocks unset,
    `depth` joint blocks, the last one pre-only."""
    depth = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"] // 64
    return {"depth": depth, "num_blocks": depth, "hidden": 64 * depth}


def comfy_sd3_loads(transformer_config: dict) -> list[str]:
    """Why ComfyUI cannot load a diffusers SD3 transformer of this config as an MMDiT ([] when it can):
    its MMDiT must have the checkpoint's width, head count and block count."""
    unet = comfy_sd3_unet_config(transformer_config)
    heads, width = transformer_config["num_attention_heads"], transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    problems = []
    if unet["hidden"] != width:
        problems.append(f"width {width} is not a multiple of 64")
    if heads != unet["depth"]:
        problems.append(f"{heads} heads where ComfyUI makes {unet['depth']} (one per 64 of width)")
    if transformer_config["num_layers"] != unet["num_blocks"]:
        problems.append(f"{transformer_config['num_layers']} blocks where ComfyUI makes {unet['num_blocks']} (width / 64)")
    return problems


def mmdit_lora_key_map(unet_config: dict) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """LoRA key (`transformer.<diffusers module>`) → (ComfyUI weight, (row offset, rows) of a fused qkv slice or None)."""
    depth, blocks = unet_config["depth"], unet_config["num_blocks"]
    offset = depth * 64
    key_map: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for i in range(blocks):
        source, target = f"transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        for name, (stream, index) in QKV.items():
            key_map[f"transformer.{source}.attn.{name}"] = (f"{target}.{stream}.attn.qkv.weight", (offset * index, offset))
        for name, index in (("to_q", 0), ("to_k", 1), ("to_v", 2)):
            key_map[f"transformer.{source}.attn2.{name}"] = (f"{target}.x_block.attn2.qkv.weight", (offset * index, offset))
        key_map[f"transformer.{source}.attn2.to_out.0"] = (f"{target}.x_block.attn2.proj.weight", None)
        for comfy, diffusers in MMDIT_BLOCK.items():
            key_map[f"transformer.{source}.{diffusers}"] = (f"{target}.{comfy}.weight", None)
    for comfy, diffusers in MMDIT_BASIC.items():
        key_map[f"transformer.{diffusers}"] = (f"diffusion_model.{comfy}.weight", None)
    last = depth - 1
    key_map[f"transformer.transformer_blocks.{last}.norm1_context.linear"] = (
        f"diffusion_model.joint_blocks.{last}.context_block.adaLN_modulation.1.weight", None)
    # The same targets under SimpleTuner's LyCORIS names.
    for key, value in list(key_map.items()):
        key_map["lycoris_" + key.removeprefix("transformer.").replace(".", "_")] = value
    return key_map


def kohya_key_map(mmdit_weights) -> dict[str, tuple[str, None]]:
    """`lora_unet_<MMDiT module with _>` → the MMDiT weight, for every weight ComfyUI's model holds."""
    return {"lora_unet_" + key.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_"): (key, None)
            for key in mmdit_weights if key.endswith(".weight")}


LYCORIS_ROLES = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                 "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def comfy_delta(lora: dict, key: str) -> torch.Tensor | None:
    """ΔW (unshaped) ComfyUI computes for `key` from a LoRA, LoKr or LoHa state dict; None: nothing there."""
    def get(role):
        value = lora.get(f"{key}.{role}")
        return None if value is None else value.double()

    alpha = lora.get(f"{key}.alpha")
    alpha = None if alpha is None else float(alpha)
    up, down = get("lora_B.weight"), get("lora_A.weight")
    if up is None:
        up, down = get("lora_up.weight"), get("lora_down.weight")
    if up is not None:
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        return (up.flatten(1) @ down.flatten(1)) * scale
    if get("hada_w1_a") is not None:
        scale = alpha / get("hada_w1_b").shape[0] if alpha is not None else 1.0
        return (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b")) * scale
    w1, w2, dim = get("lokr_w1"), get("lokr_w2"), None
    if w1 is None and get("lokr_w1_a") is None and w2 is None and get("lokr_w2_a") is None:
        return None
    if w1 is None:
        dim, w1 = get("lokr_w1_b").shape[0], get("lokr_w1_a") @ get("lokr_w1_b")
    if w2 is None:
        dim, w2 = get("lokr_w2_b").shape[0], get("lokr_w2_a") @ get("lokr_w2_b")
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2) * scale


def swapped_targets(unet_config: dict) -> set[str]:
    """Weights whose diffusers-named ΔW ComfyUI swaps in halves (utils.py swap_scale_shift): the final
    adaLN, and the context adaLN of block `depth - 1`, the last block."""
    last = unet_config["depth"] - 1
    return {"diffusion_model.final_layer.adaLN_modulation.1.weight",
            f"diffusion_model.joint_blocks.{last}.context_block.adaLN_modulation.1.weight"}


def apply_like_comfy(weights: dict, lora: dict, key_map: dict, swapped: set[str] = frozenset()) -> tuple[dict, list[str]]:
    """`weights` (ComfyUI's MMDiT names) with every mapped adapter of `lora` added as ComfyUI adds it
    (halves swapped for diffusers-named keys onto `swapped` targets); and the keys of `lora` no mapped
    module used ("lora key not loaded")."""
    out = {name: tensor.double().clone() for name, tensor in weights.items()}
    used: set[str] = set()
    for key, (target, fused) in key_map.items():
        delta = comfy_delta(lora, key)
        if delta is None:
            continue
        used |= {name for name in lora if name.startswith(key + ".") and name[len(key) + 1:].split(".")[0] in
                 (*LYCORIS_ROLES, "alpha", "lora_A", "lora_B", "lora_up", "lora_down")}
        view = out[target] if fused is None else out[target].narrow(0, fused[0], fused[1])
        delta = delta.reshape(view.shape)
        if target in swapped and not key.startswith("lora_unet_"):
            half = delta.shape[0] // 2
            delta = torch.cat([delta[half:], delta[:half]])
        view += delta
    return out, sorted(set(lora) - used)


def unloaded_keys(lora: dict, key_map: dict) -> list[str]:
    """Keys of a LoRA state dict that ComfyUI's load_lora would leave unloaded ("lora key not loaded")."""
    loaded = set()
    for key in key_map:
        up, down = f"{key}.lora_B.weight", f"{key}.lora_A.weight"
        if up in lora and down in lora:
            loaded |= {up, down, f"{key}.alpha"}
    return sorted(set(lora) - loaded)


def qkv_slice_mismatches(lora: dict, key_map: dict) -> list[str]:
    """Fused-qkv targets whose LoRA up matrix does not have exactly the slice's rows."""
    bad = []
    for key, (_, fused) in key_map.items():
        up = lora.get(f"{key}.lora_B.weight")
        if up is not None and fused is not None and up.shape[0] != fused[1]:
            bad.append(f"{key}: {tuple(up.shape)} vs {fused[1]} rows")
    return bad
