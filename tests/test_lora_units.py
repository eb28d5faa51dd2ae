"""LoRA without training: the recipe section, the targets on the SD3.5 Large shape (meta, no
memory), peft's init, and the names a diffusers LoRA file gets and ComfyUI maps."""

from __future__ import annotations

import pytest
import torch
import yaml

from sd35dist.config.loading import ConfigError
from sd35dist.config.recipe import LoraSection, load_recipe
from sd35dist.models.lora import adapter_parameter_count, diffusers_lora_state, inject_lora, target_modules
from sd35dist.models.transformer_build import build_on_meta
from tests.comfy_lora_keys import comfy_sd3_unet_config, mmdit_lora_key_map, qkv_slice_mismatches, unloaded_keys

pytestmark = pytest.mark.unit

LARGE = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
             num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
             pos_embed_max_size=192, qk_norm="rms_norm")
"""SD3.5 Large's transformer/config.json (benchmarks/train_step.py's LARGE)."""


def large(targets="attention", rank=16):
    model = build_on_meta({"_class_name": "SD3Transformer2DModel", **LARGE}, dtype=torch.bfloat16)
    initial = inject_lora(model, LoraSection(rank=rank, alpha=rank / 2, targets=targets), dtype=torch.float32)
    return model, initial


@pytest.mark.parametrize("targets", ["attention", "attention_ff", "all_linear"])
def test_every_key_we_write_maps_onto_a_comfyui_mmdit_weight(targets):
    model, _ = large(targets, rank=4)
    adapters = {name: torch.empty(p.shape, device="meta") for name, p in model.named_parameters() if ".lora_" in name}
    lora = diffusers_lora_state(adapters, LoraSection(rank=4, alpha=2.0, targets=targets))
    key_map = mmdit_lora_key_map(comfy_sd3_unet_config(LARGE))
    assert lora and unloaded_keys(lora, key_map) == []
    assert qkv_slice_mismatches(lora, key_map) == [], "to_q/k/v adapters fill their slice of ComfyUI's fused qkv"
    assert all(k.startswith("transformer.transformer_blocks.") for k in lora) or targets == "all_linear"


def test_presets_train_the_frozen_base_s_adapters_only():
    model, initial = large("attention", rank=16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable) and set(initial) == {
        n.replace("_checkpoint_wrapped_module.", "") for n in trainable}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad), "fp32 masters"
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not p.requires_grad), "base in bf16"
    # 38 blocks × 8 projections (the last block has no context output projection) of rank 16, 2432 wide.
    assert adapter_parameter_count(model) == (38 * 8 - 1) * 16 * (2432 + 2432)


def test_adapters_start_as_peft_initialises_them_and_alike_on_every_build():
    model, initial = large("attention", rank=8)
    a = initial["transformer_blocks.0.attn.to_q.lora_A.default.weight"]()
    b = initial["transformer_blocks.0.attn.to_q.lora_B.default.weight"]()
    assert a.shape == (8, 2432) and b.shape == (2432, 8)
    assert torch.count_nonzero(b) == 0 and a.abs().max() <= 1 / 2432 ** 0.5 + 1e-6, "Kaiming-uniform A, zero B"
    _, again = large("attention", rank=8)
    assert torch.equal(again["transformer_blocks.0.attn.to_q.lora_A.default.weight"](), a)
    assert not torch.equal(initial["transformer_blocks.1.attn.to_q.lora_A.default.weight"](), a)


def test_an_unknown_target_names_the_recipe_key():
    from sd35dist.models.lora import LoraTargetError

    model = build_on_meta({"_class_name": "SD3Transformer2DModel", **LARGE})
    with pytest.raises(LoraTargetError, match="'attn.to_qq' names no Linear"):
        target_modules(model, ["attn.to_qq"])


def test_diffusers_names_fold_alpha_over_rank_into_b():
    adapters = {"transformer_blocks.0.attn.to_q.lora_A.default.weight": torch.ones(2, 3),
                "transformer_blocks.0.attn.to_q.lora_B.default.weight": torch.ones(3, 2)}
    out = diffusers_lora_state(adapters, LoraSection(rank=2, alpha=8.0))
    assert sorted(out) == ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                           "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    assert out["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].max() == 4.0


def test_zero3_lora_is_refused_in_one_line(tmp_path):
    recipe = {"name": "r", "model": {"pretrained": "m"}, "data": {"cache_url": "c"}, "output": {"dir": "o"},
              "parallel": {"strategy": "zero3"}, "train": {"lora": {"rank": 4}}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="train.lora.*fsdp2 or zero2"):
        load_recipe(path)
    recipe["train"]["lora"] = {"rank": 4, "init": "pissa"}
    recipe["parallel"]["strategy"] = "fsdp2"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="train.lora.init"):
        load_recipe(path)
