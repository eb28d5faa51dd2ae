"""LyCORIS adapters and the kohya LoRA file without training: the layout, scale and targets against
the installed lycoris-lora itself (4.1.3, the library SimpleTuner trains with), our LyCORIS file
loaded by lycoris-lora's own loader and by ComfyUI's rules (tests/comfy_lora_keys.py), the kohya
file against sd-scripts' names and its ΔW, and the recipe's one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from sd35dist.config.adapter_layout import adapter_layout, factorization
from sd35dist.config.loading import ConfigError
from sd35dist.config.recipe import LoraSection, load_recipe
from sd35dist.models.lora import inject_lora
from sd35dist.models.lycoris import adapted_linears, lycoris_file_state
from sd35dist.models.tiny_sd3 import TRANSFORMER_SIZES
from sd35dist.models.transformer_build import build_on_meta
from tests.comfy_lora_keys import (
    apply_like_comfy,
    comfy_sd3_unet_config,
    kohya_key_map,
    mmdit_lora_key_map,
    swapped_targets,
)
from tests.kohya_lora_names import kohya_module_name, original_tensor, sd_scripts_lora_names

pytestmark = pytest.mark.unit
lycoris = pytest.importorskip("lycoris")

TINY = {"_class_name": "SD3Transformer2DModel", **TRANSFORMER_SIZES}
LARGE = {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
         "out_channels": 16, "num_layers": 38, "attention_head_dim": 64, "num_attention_heads": 38,
         "joint_attention_dim": 4096, "caption_projection_dim": 2432, "pooled_projection_dim": 2048,
         "pos_embed_max_size": 192, "qk_norm": "rms_norm"}
SIMPLETUNER_EXAMPLE = {"target_module": ["Attention", "FeedForward"],
                       "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}}
"""apply_preset of SimpleTuner's config/lycoris_config.json.example (bc8e6ab)."""


def test_layout_and_scale_equal_lycoris_modules():
    from lycoris.functional import factorization as lycoris_factorization
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    assert all(factorization(d, f) == lycoris_factorization(d, f)
               for d in (64, 127, 128, 256, 360, 2432, 9728) for f in (-1, 2, 4, 8, 16, 64))
    cases = [(64, 64, 4, 2.0, 16, False, False), (64, 256, 10000, 1, 8, True, False), (2432, 2432, 16, 8.0, 16, False, False),
             (2432, 9728, 64, 32.0, -1, False, True), (2432, 9728, 4, 4.0, 8, False, True), (64, 128, 100, 1.0, 4, False, False)]
    for in_dim, out_dim, rank, alpha, factor, full, both in cases:
        base = nn.Linear(in_dim, out_dim, device="meta")
        theirs = LokrModule("m", base, lora_dim=rank, alpha=alpha, factor=factor, full_matrix=full, decompose_both=both)
        ours = adapter_layout("lokr", in_dim, out_dim, rank=rank, alpha=alpha, factor=factor, full_matrix=full,
                              decompose_both=both)
        assert ours.shapes == {k: tuple(p.shape) for k, p in theirs.named_parameters()}, (in_dim, out_dim, rank, factor)
        assert (ours.scale, ours.stored_alpha) == (pytest.approx(theirs.scale), pytest.approx(float(theirs.alpha)))
    loha = LohaModule("m", nn.Linear(64, 256, device="meta"), lora_dim=8, alpha=4.0)
    ours = adapter_layout("loha", 64, 256, rank=8, alpha=4.0)
    assert ours.shapes == {k: tuple(p.shape) for k, p in loha.named_parameters()} and ours.scale == loha.scale


def test_simpletuner_preset_adapts_what_lycoris_network_adapts_on_sd35_large():
    from lycoris.wrapper import LycorisNetwork

    model = build_on_meta(LARGE)
    section = LoraSection(type="lokr", rank=10000, alpha=1, full_matrix=True, preset=SIMPLETUNER_EXAMPLE)
    ours = {t.lycoris_name: t for t in adapted_linears(model, section)}
    saved = {k: getattr(LycorisNetwork, k) for k in ("TARGET_REPLACE_MODULE", "MODULE_ALGO_MAP", "TARGET_REPLACE_NAME")}
    try:  # LycorisNetwork keeps its preset in class attributes: restore them for the rest of the session
        LycorisNetwork.apply_preset(SIMPLETUNER_EXAMPLE)
        network = LycorisNetwork(model, lora_dim=10000, alpha=1, network_module="lokr", full_matrix=True)
    finally:
        for key, value in saved.items():
            setattr(LycorisNetwork, key, value)
    theirs = {lora.lora_name: lora for lora in network.loras}
    assert sorted(ours) == sorted(theirs) and len(ours) == 38 * 12 - 3, "attention + MLPs of both streams; the last context stream has no out proj or MLP"
    for name, lora in theirs.items():
        assert ours[name].layout.shapes == {k: tuple(p.shape) for k, p in lora.named_parameters()}, name
    assert ours["lycoris_transformer_blocks_0_attn_to_q"].layout.shapes == {"lokr_w1": (16, 16), "lokr_w2": (152, 152)}
    assert ours["lycoris_transformer_blocks_0_ff_net_2"].layout.shapes == {"lokr_w1": (8, 8), "lokr_w2": (304, 1216)}


def tiny_adapted(section: LoraSection, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The tiny transformer (random base) with `section`'s adapters filled with random values."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**TRANSFORMER_SIZES).eval()
    inject_lora(model, section, dtype=torch.float32, seed=seed)
    adapters = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.05)
                adapters[name] = param.detach().clone()
    return model, adapters


def probe(config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, 16, 8, 8, generator=g), "timestep": torch.tensor([300.0]),
            "encoder_hidden_states": torch.randn(1, 6, config.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g)}


SECTIONS = {
    "lokr-preset": LoraSection(type="lokr", rank=10000, alpha=1, full_matrix=True, preset=SIMPLETUNER_EXAMPLE),
    "lokr-factored": LoraSection(type="lokr", rank=2, alpha=3.0, factor=4, targets="attention_ff"),
    "loha": LoraSection(type="loha", rank=4, alpha=2.0, targets="all_linear"),
}


@pytest.mark.parametrize("kind", sorted(SECTIONS))
def test_our_lycoris_file_loads_in_lycoris_and_comfyui_as_trained(kind, tmp_path):
    from diffusers import SD3Transformer2DModel
    from lycoris import create_lycoris_from_weights
    from safetensors.torch import load_file, save_file

    from sd35dist.checkpoint.original_layout import transformer_plan
    from sd35dist.models.state_keys import plain_name

    section = SECTIONS[kind]
    model, adapters = tiny_adapted(section)
    inputs = probe(model.config)
    with torch.no_grad():
        ours = model(**inputs, return_dict=False)[0]
    file = tmp_path / "pytorch_lora_weights.safetensors"
    plain = {plain_name(k): v for k, v in adapters.items()}
    save_file(lycoris_file_state(plain, adapted_linears(build_on_meta(TINY), section)), str(file))

    torch.manual_seed(0)
    base = SD3Transformer2DModel(**TRANSFORMER_SIZES).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    network, _ = create_lycoris_from_weights(1.0, str(file), base)
    network.apply_to()
    assert len(network.loras) == len({k.split(".")[0] for k in load_file(str(file))}), "lycoris builds every module"
    with torch.no_grad():
        theirs = base(**inputs, return_dict=False)[0]
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0), (theirs - ours).abs().max()

    # ComfyUI: the same adapters added onto the MMDiT weights it holds = our merged model in that layout.
    lora = load_file(str(file))
    merged = {plain_name(k): v for k, v in _merged(model).items()}
    plan = transformer_plan(dict(model.config), None)
    mmdit = {"diffusion_model." + t.name.removeprefix("model.diffusion_model."): original_tensor(t, base_state) for t in plan}
    expected = {"diffusion_model." + t.name.removeprefix("model.diffusion_model."): original_tensor(t, merged) for t in plan}
    unet = comfy_sd3_unet_config(dict(model.config))
    applied, unused = apply_like_comfy(mmdit, lora, mmdit_lora_key_map(unet), swapped_targets(unet))
    assert unused == [], "every tensor of the file reaches a weight ComfyUI holds"
    changed = [k for k in applied if not torch.equal(applied[k], mmdit[k].double())]
    wrong = [k for k in applied if not torch.allclose(applied[k], expected[k].double(), atol=1e-6)]
    assert changed and wrong == []


def _merged(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with peft's adapters merged (what --merge exports)."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, child, module.get_base_layer())
    return merged.state_dict()


def test_kohya_file_has_sd_scripts_names_and_rebuilds_our_delta_per_module():
    from sd35dist.checkpoint.kohya_export import kohya_lora_state
    from sd35dist.checkpoint.original_layout import transformer_plan

    config = dict(TRANSFORMER_SIZES)
    torch.manual_seed(3)
    rank, alpha, width = 4, 8.0, config["num_attention_heads"] * config["attention_head_dim"]
    modules = [t.module for t in adapted_linears(build_on_meta(TINY), LoraSection(type="loha", targets="all_linear"))]
    shapes = {m: p.shape for m in modules for n, p in build_on_meta(TINY).named_parameters() if n == m + ".weight"}
    adapters = {m: (torch.randn(rank, shapes[m][1]), torch.randn(shapes[m][0], rank)) for m in modules}
    kohya = kohya_lora_state(adapters, alpha, config)
    names = {key.split(".")[0] for key in kohya}
    assert names == sd_scripts_lora_names(config), names ^ sd_scripts_lora_names(config)
    assert all(f"{name}.alpha" in kohya for name in names), "sd-scripts reads every module's alpha"
    assert kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape == (3 * rank, width), "rank 3r"
    ours = {m + ".weight": b @ a * (alpha / rank) for m, (a, b) in adapters.items()}
    for tensor in transformer_plan(config, None):
        if not tensor.name.endswith(".weight") or not all(s in ours for s in tensor.sources):
            continue
        name = kohya_module_name(tensor)
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        rebuilt = up @ down * (float(kohya[f"{name}.alpha"]) / down.shape[0])
        assert torch.allclose(rebuilt, original_tensor(tensor, ours), atol=1e-5), name
    # ComfyUI reads the same file through its lora_unet_* names.
    mmdit = {"diffusion_model." + t.name.removeprefix("model.diffusion_model."): torch.zeros(1)
             for t in transformer_plan(config, None)}
    assert set(kohya_key_map(mmdit)) >= names


def write_recipe(tmp_path, lora: dict):
    recipe = {"name": "r", "model": {"pretrained": "m"}, "data": {"cache_url": "c"}, "output": {"dir": "o"},
              "train": {"lora": lora}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipe_mistakes_name_the_key(tmp_path):
    cases = [({"type": "lycoris"}, "train.lora.type"), ({"type": "lokr", "dropout": 0.1}, "no input dropout"),
             ({"factor": 8}, "factor is a LyCORIS option"), ({"type": "loha", "factor": 4}, "lokr options"),
             ({"type": "lokr", "targets": "all_linear", "preset": {"target_module": ["Attention"]}}, "keep one"),
             ({"type": "lokr", "preset": {"target_module": ["Attention"], "module_algo_map": {"Attention": {"algo": "glora"}}}},
              "module_algo_map.Attention.algo")]
    for lora, expected in cases:
        with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
            load_recipe(write_recipe(tmp_path, lora))
    recipe = load_recipe(write_recipe(tmp_path, {"type": "lokr", "rank": 10000, "alpha": 1, "full_matrix": True,
                                                 "preset": SIMPLETUNER_EXAMPLE}))
    assert recipe.train.lora.preset.module_algo_map["FeedForward"].factor == 8
    frozen = LoraSection.model_validate(recipe.train.lora.model_dump())
    assert frozen == recipe.train.lora, "a frozen recipe (every field written out) reads back the same"


def test_simpletuner_lycoris_config_imports_and_bad_algo_is_one_line(tmp_path, capsys):
    from sd35dist.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_family": "sd3", "model_type": "lora", "lora_type": "lycoris",
                                                      "lycoris_config": "config/lycoris_config.json"}))
    example = {"algo": "lokr", "multiplier": 1.0, "full_matrix": True, "linear_alpha": 1, "factor": 16,
               "apply_preset": SIMPLETUNER_EXAMPLE}  # SimpleTuner's config/lycoris_config.json.example (bc8e6ab)
    (tmp_path / "lycoris_config.json").write_text(json.dumps(example))
    out = tmp_path / "recipe.yaml"
    assert main(["import", "simpletuner", str(tmp_path / "config.json"), "-o", str(out)]) == 0
    lora = load_recipe(out).train.lora
    assert (lora.type, lora.rank, lora.alpha, lora.factor, lora.full_matrix) == ("lokr", 4, 1.0, 16, True), \
        "SimpleTuner's linear_dim default 4 (a whole-matrix LoKr ignores it)"
    assert lora.preset.module_algo_map["Attention"].factor == 16 and lora.preset.target_module == ["Attention", "FeedForward"]
    capsys.readouterr()
    (tmp_path / "lycoris_config.json").write_text(json.dumps({**example, "algo": "glora"}))
    out.unlink()
    assert main(["import", "simpletuner", str(tmp_path / "config.json"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lycoris_config.json: algo: 'glora' is not offered" in err and not out.exists()
