"""sd-scripts' SD3 LoRA module names and the original-layout tensors they adapt, for the kohya
export tests. Read from kohya-ss/sd-scripts at 48d368f (networks/lora_sd3.py: modules named
`lora_unet_<MMDiT module with _ for .>`, built from each Linear of the MMDiT's SingleDiTBlocks and
its embedders; library/sd3_models.py: which Linears a block holds). A re-implementation of the
naming rule, no sd-scripts code."""

from __future__ import annotations

import torch


def original_tensor(tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """`tensor` (an entry of checkpoint/original_layout.transformer_plan) built from diffusers-named `state`."""
    sources = [state[s] for s in tensor.sources]
    if tensor.op == "qkv":
        return torch.cat(sources)
    if tensor.op == "swap_halves":
        half = sources[0].shape[0] // 2
        return torch.cat([sources[0][half:], sources[0][:half]])
    return sources[0]


def kohya_module_name(tensor) -> str:
    """sd-scripts' LoRA name of an original-layout weight: `model.diffusion_model.a.b.weight` → `lora_unet_a_b`."""
    return "lora_unet_" + tensor.name.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")


def sd_scripts_lora_names(config: dict) -> set[str]:
    """The modules kohya's lora_sd3 finds in its MMDiT: the Linears of each SingleDiTBlock (x_block,
    context_block: adaLN_modulation.1, attn.qkv, attn.proj, mlp.fc1, mlp.fc2, attn2.* in MMDiT-X blocks;
    the last context block is pre_only: adaLN and qkv only) and the emb_dims filters' Linears."""
    names = {"context_embedder", "t_embedder_mlp_0", "t_embedder_mlp_2", "y_embedder_mlp_0", "y_embedder_mlp_2",
             "final_layer_adaLN_modulation_1", "final_layer_linear"}
    layers, dual = config["num_layers"], set(config.get("dual_attention_layers") or ())
    for i in range(layers):
        for stream in ("x_block", "context_block"):
            pre_only = stream == "context_block" and i == layers - 1
            children = ["adaLN_modulation_1", "attn_qkv"] + ([] if pre_only else ["attn_proj", "mlp_fc1", "mlp_fc2"])
            children += ["attn2_qkv", "attn2_proj"] if stream == "x_block" and i in dual else []
            names |= {f"joint_blocks_{i}_{stream}_{child}" for child in children}
    return {"lora_unet_" + name for name in names}
