"""LoRA fine-tunes (`train.lora`) with fsdp2 and zero2 on the tiny SD3, 2 CPU ranks: the adapters
train and the base stays put, checkpoints hold only the adapters, resume is exact (and FSDP2
resumes on another world size), and the exports load in diffusers (and map onto ComfyUI).

One straight run and one run resumed from its step-2 checkpoint per strategy, all four in one torchrun
(a module-scoped fixture), serve every assert; the bf16 run checks adapters move in bf16 compute. Exports run through the CLI's
entry in this process, the kohya one as a child process (`sd35dist export` as typed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from sd35dist.checkpoint.layout import CheckpointDir
from tests.cli_runs import sd35dist_in_process
from tests.kohya_lora_names import kohya_module_name, original_tensor, sd_scripts_lora_names
from tests.lora_runs import LORA, export_adapters, export_adapters_cli, lora_recipe, probe_inputs
from tests.train_runs import losses, train_in_one_group

pytestmark = [pytest.mark.dist, pytest.mark.usefixtures("deepspeed_on_cpu")]

TOLERANCE = 1e-5
"""fp32 outputs of the diffusers-loaded LoRA vs the trained model: the same math in another order."""


PRECISION = {"fsdp2": "bf16", "zero2": "fp32"}
"""FSDP2 in bf16 compute (a bf16 frozen base and fp32 adapters in one FSDP group), ZeRO-2 in fp32."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> Path:
    """Per strategy, a straight 4-step run (<strategy>/straight, checkpoints at 2 and 4) and a run resumed
    from its step-2 checkpoint to step 4 (<strategy>/resumed): 2N straight against N + resume N. All four
    in one torchrun (tests/trainings_check.py), each as `sd35dist train` runs it on a rank."""
    root = tmp_path_factory.mktemp("lora")
    runs = []
    for strategy, precision in PRECISION.items():
        (root / strategy).mkdir()
        here = root / strategy
        halfway = str(CheckpointDir(here / "straight").path(2))
        runs += [(lora_recipe(here / "straight.yaml", cache, here / "straight", strategy, mixed_precision=precision),
                  here / "run0"),
                 (lora_recipe(here / "resume.yaml", cache, here / "resumed", strategy, mixed_precision=precision,
                              resume=halfway), here / "run2")]
    train_in_one_group(*runs)
    return root


@pytest.fixture(scope="module", params=list(PRECISION))
def runs(request, trained) -> tuple[str, Path]:
    return request.param, trained / request.param


def test_adapters_train_and_resume_exactly_from_adapter_only_checkpoints(runs, cache):
    from sd35dist.checkpoint.export import checkpoint_state
    from sd35dist.config.recipe import LoraSection
    from sd35dist.models.lora import inject_lora
    from sd35dist.models.transformer_build import build_on_meta, transformer_config

    strategy, root = runs
    model = build_on_meta(transformer_config(cache[0]))
    seed = yaml.safe_load((root / "straight.yaml").read_text())["seed"]
    made = inject_lora(model, LoraSection(**LORA), dtype=torch.float32, seed=seed)
    initial_a = {k: make() for k, make in made.items() if ".lora_A." in k}
    expected = losses(root / "run0")
    assert sorted(expected) == [1, 2, 3, 4]
    assert losses(root / "run2") == {s: expected[s] for s in (3, 4)}, "CPU/gloo resume is exact"
    for use_ema in (False, True):
        resumed = checkpoint_state(CheckpointDir(root / "resumed").latest(), use_ema)
        straight = checkpoint_state(CheckpointDir(root / "straight").latest(), use_ema)
        adapters = sorted(k for k in straight if ".lora_" in k)
        assert adapters and resumed.keys() == straight.keys()
        assert all(torch.equal(resumed[k], straight[k]) for k in adapters), "final adapters (and EMA) equal"
    assert not any(k.endswith("to_q.weight") for k in straight), "no base weights in a LoRA checkpoint"
    still = [k for k in adapters if ".lora_B." in k and straight[k].abs().max() == 0]
    # The last block drops its context stream's output, so its context queries get no gradient.
    assert still == ["transformer_blocks.1.attn.add_q_proj.lora_B.default.weight"], "every other B moved from zero"
    assert all(straight[k].dtype == torch.float32 for k in adapters), f"fp32 masters in {PRECISION[strategy]} compute"
    a = [straight[k] for k in adapters if ".lora_A." in k]
    assert all(not torch.equal(t, t.bfloat16().float()) for t in a), "the masters keep what bf16 would round away"
    assert all(not torch.equal(t, initial_a[k]) for k, t in zip([k for k in adapters if ".lora_A." in k], a))


@torch.no_grad()
def trained_model_output(model_dir: Path, adapters: dict[str, torch.Tensor], inputs: dict) -> torch.Tensor:
    """The trained model, built apart from the export: base + peft LoRA of the recipe + the checkpoint's adapters."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    from sd35dist.config.recipe import LORA_PRESET_MODULES

    model = SD3Transformer2DModel.from_pretrained(model_dir / "transformer", dtype=torch.float32)
    inject_adapter_in_model(LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                                       target_modules=list(LORA_PRESET_MODULES[LORA["targets"]])), model)
    assert not model.load_state_dict(adapters, strict=False).unexpected_keys
    return model(**inputs, return_dict=False)[0]


def test_the_lora_file_loads_in_diffusers_and_comfyui_and_merges_like_fuse_lora(runs, cache, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors import safe_open

    from sd35dist.checkpoint.export import checkpoint_state
    from tests.comfy_lora_keys import comfy_sd3_unet_config, mmdit_lora_key_map, qkv_slice_mismatches, unloaded_keys

    strategy, root = runs
    model_dir, _ = cache
    checkpoint = CheckpointDir(root / "straight").latest()
    export_adapters(root / "straight", tmp_path / "lora", "--ema", "--dtype", "fp32")
    export_adapters(root / "straight", tmp_path / "merged", "--ema", "--merge", "--dtype", "fp32")
    file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        metadata, lora = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    assert {json.loads(metadata[f"sd35dist.{k}"]) for k in ("rank", "step")} == {LORA["rank"], 4}
    assert json.loads(metadata["sd35dist.alpha"]) == LORA["alpha"] and json.loads(metadata["sd35dist.targets"]) == LORA["targets"]
    assert json.loads(metadata["sd35dist.base_model"]) == str(model_dir)
    assert json.loads(metadata["sd35dist.recipe_sha256"]) == json.loads((checkpoint / "COMPLETE").read_text())["recipe_sha256"]

    # ComfyUI builds SD3 from its width (width/64 heads of 64 and as many blocks); the tiny model is that model.
    unet = comfy_sd3_unet_config(json.loads((model_dir / "transformer" / "config.json").read_text()))
    key_map = mmdit_lora_key_map(unet)
    assert unloaded_keys(lora, key_map) == [], "ComfyUI's SD3 key map reaches every tensor"
    assert qkv_slice_mismatches(lora, key_map) == [], "to_q/k/v fill their slice of ComfyUI's fused qkv"

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    inputs = probe_inputs(pipe.transformer.config)
    with torch.no_grad():
        base = pipe.transformer(**inputs, return_dict=False)[0]
        pipe.load_lora_weights(tmp_path / "lora")
        loaded = pipe.transformer(**inputs, return_dict=False)[0]
    ema = {k: v for k, v in checkpoint_state(checkpoint, True).items() if ".lora_" in k}
    expected = trained_model_output(model_dir, ema, inputs)
    assert torch.allclose(loaded, expected, rtol=0, atol=TOLERANCE), (loaded - expected).abs().max()
    assert (loaded - base).abs().max() > 100 * TOLERANCE, "the LoRA changes the outputs"

    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    merged = SD3Transformer2DModel.from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict()
    assert merged.keys() == fused.keys()
    assert all(torch.allclose(merged[k], fused[k], rtol=0, atol=1e-6) for k in fused), "--merge equals fuse_lora"
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

    # A merged LoRA also ships as one SD3.5-layout file; unmerged it has no place there.
    export_adapters(root / "straight", tmp_path / "merged.safetensors", "--ema", "--merge", "--format", "single-file",
           "--dtype", "fp32")
    single = SD3Transformer2DModel.from_single_file(str(tmp_path / "merged.safetensors"), local_files_only=True,
                                                    config=str(model_dir / "transformer"), dtype=torch.float32)
    assert all(torch.equal(single.state_dict()[k], merged[k]) for k in merged), "single file = merged folder"
    status, _, refused = sd35dist_in_process("export", str(root / "straight"), "--format", "single-file", "--out",
                                             str(tmp_path / "x.safetensors"))
    assert status == 2 and "add --merge" in refused and not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("runs", ["fsdp2"], indirect=True)  # ZeRO resumes on its own world size only
def test_fsdp2_lora_checkpoint_reloads_exactly_on_another_world_size(runs, tmp_path):
    from sd35dist.checkpoint.fsdp2_files import read_part
    from tests.lora_reshard_check import main as reshard

    strategy, root = runs
    checkpoint = CheckpointDir(root / "straight").latest()
    # World size 1 in this process (a one-process group on an in-memory store): what a resume there loads.
    assert reshard(str(root / "straight.yaml"), str(checkpoint), str(tmp_path / "again")) == 0
    for part in ("model", "optim", "ema"):
        written = read_part(checkpoint, part)
        again = read_part(tmp_path / "again", part)
        assert written.keys() == again.keys() and written
        assert all(torch.equal(written[k], again[k]) for k in written), f"{part}: 2 ranks → 1 rank → saved alike"


@pytest.mark.parametrize("runs", ["fsdp2"], indirect=True)
def test_kohya_export_rebuilds_the_lora_delta_per_module(runs, cache, tmp_path):
    """`--format kohya`: sd-scripts' module names, and each module's up · down · alpha / rank equals our
    B·A·α/r in the original layout (q, k, v concatenated, adaLN halves swapped), from the EMA adapters."""
    from safetensors.torch import load_file

    from sd35dist.checkpoint.export import checkpoint_state
    from sd35dist.checkpoint.original_layout import transformer_plan

    strategy, root = runs
    out = tmp_path / "kohya.safetensors"
    export_adapters_cli(root / "straight", out, "--format", "kohya", "--ema", "--dtype", "fp32")  # the module's child export
    kohya = load_file(str(out))
    assert out.stat().st_mode & 0o777 == 0o666 & ~os.umask(os.umask(0o022)), "the umask's modes, not save_file's 0600"
    config = json.loads((cache[0] / "transformer" / "config.json").read_text())
    names = {k.split(".")[0] for k in kohya}
    assert names and names <= sd_scripts_lora_names(config) and all(f"{n}.alpha" in kohya for n in names)
    state = checkpoint_state(CheckpointDir(root / "straight").latest(), True)
    pairs = {k.split(".lora_A.")[0]: (v, state[k.replace(".lora_A.", ".lora_B.")]) for k, v in state.items() if ".lora_A." in k}
    ours = {m + ".weight": b @ a * (LORA["alpha"] / LORA["rank"]) for m, (a, b) in pairs.items()}
    compared = 0
    for tensor in transformer_plan(config, None):
        if tensor.name.endswith(".weight") and all(s in ours for s in tensor.sources):
            name = kohya_module_name(tensor)
            down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
            rebuilt = up @ down * (float(kohya[f"{name}.alpha"]) / down.shape[0])
            assert torch.allclose(rebuilt, original_tensor(tensor, ours), atol=1e-6), name
            compared += 1
    assert compared == len(names), "every kohya module is one of ours"
    assert kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape[0] == 3 * LORA["rank"]
