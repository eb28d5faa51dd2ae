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
Only the rules that decide whether a key loads are reimplemented; no ComfyUI code is copied.
"""

from __future__ import annotations

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
    """What ComfyUI's model detection reads off an SD3 checkpoint: depth = x_embedder width / 64, blocks counted."""
    hidden = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    return {"depth": hidden // 64, "num_blocks": transformer_config["num_layers"]}


def mmdit_lora_key_map(unet_config: dict) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """LoRA key (`transformer.<diffusers module>`) → (ComfyUI weight, (row offset, rows) of a fused qkv slice or None)."""
    depth, blocks = unet_config["depth"], unet_config.get("num_blocks", unet_config["depth"])
    offset = depth * 64
    key_map: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for i in range(blocks):
        source, target = f"transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        for name, (stream, index) in QKV.items():
            key_map[f"transformer.{source}.attn.{name}"] = (f"{target}.{stream}.attn.qkv.weight", (offset * index, offset))
        for comfy, diffusers in MMDIT_BLOCK.items():
            key_map[f"transformer.{source}.{diffusers}"] = (f"{target}.{comfy}.weight", None)
    for comfy, diffusers in MMDIT_BASIC.items():
        key_map[f"transformer.{diffusers}"] = (f"diffusion_model.{comfy}.weight", None)
    last = depth - 1
    key_map[f"transformer.transformer_blocks.{last}.norm1_context.linear"] = (
        f"diffusion_model.joint_blocks.{last}.context_block.adaLN_modulation.1.weight", None)
    return key_map


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
