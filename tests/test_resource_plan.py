"""`sd35dist plan`: parameter counts, the memory model against measured H100 peaks, the
communication model, and the one-line refusal when a recipe cannot fit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from launcher.cli import main
from sd35dist.config.mesh_layout import resolve_mesh
from sd35dist.config.model_size import SD35_LARGE_CONFIG, image_tokens, lora_parameters, transformer_size
from sd35dist.config.recipe import LORA_PRESET_MODULES
from sd35dist.config.resource_plan import (
    GIB,
    GPU_PRESETS,
    PEAK_TOLERANCE,
    Workload,
    memory_plan,
    step_time,
    traffic,
    train_flops_per_sample,
)
from tests.cli_runs import PROJECT

ONE_GPU = resolve_mesh(strategy="fsdp2", shard_degree=None, nodes=1, procs_per_node=1)
SD35L_TOKENS = image_tokens(SD35_LARGE_CONFIG, 1024, 1024) + 77 + 256
# One H100 80 GB, SD3.5 Large at 1024 px, batch 4, per-block activation checkpointing,
# pure-bf16 weights and AdamW states (no master copy, no Kahan buffer).
PURE_BF16 = Workload(strategy="fsdp2", master_bytes=2, state_bytes=4, compute_bytes=2, optimizer_impl="foreach",
                     batch=4, gradient_accumulation=1, tokens=SD35L_TOKENS, activation_checkpointing=True, ema=False)


@pytest.mark.unit
@pytest.mark.parametrize("config_name", ["tiny", "sd35_large"])
def test_the_parameter_formula_equals_the_meta_built_model(config_name):
    from sd35dist.models.tiny_sd3 import TRANSFORMER_SIZES
    from sd35dist.models.transformer_build import build_on_meta

    config = dict(TRANSFORMER_SIZES) if config_name == "tiny" else SD35_LARGE_CONFIG
    model = build_on_meta(config)
    size = transformer_size(config)
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.transformer_blocks]
    assert list(size.blocks) == blocks
    assert size.total == sum(p.numel() for p in model.parameters())
    if config_name == "sd35_large":
        assert size.total == 8_056_627_520


@pytest.mark.unit
@pytest.mark.parametrize(("optimizer_impl", "measured_gib", "phase"),
                         [("foreach", 76.2, "optimizer step"), ("fused", 67.2, "backward")])
def test_the_memory_model_reproduces_the_measured_h100_peaks(optimizer_impl, measured_gib, phase):
    plan = memory_plan(transformer_size(SD35_LARGE_CONFIG), dataclasses.replace(PURE_BF16, optimizer_impl=optimizer_impl),
                       ONE_GPU)
    assert abs(plan.peak_gib - measured_gib) / measured_gib < PEAK_TOLERANCE, plan.peak_gib
    assert plan.phase == phase, "foreach's sqrt(v) temporary sets the eager peak; backward sets the fused one"


@pytest.mark.unit
def test_sharding_divides_the_state_and_checkpointing_the_activations():
    size = transformer_size(SD35_LARGE_CONFIG)
    adamw = dataclasses.replace(PURE_BF16, master_bytes=4, state_bytes=8, optimizer_impl="fused", ema=True)
    eight = dict(memory_plan(size, adamw, resolve_mesh(strategy="fsdp2", shard_degree=None, nodes=1, procs_per_node=8)).rows)
    hsdp = dict(memory_plan(size, adamw, resolve_mesh(strategy="fsdp2", shard_degree=None, nodes=4, procs_per_node=8)).rows)
    assert eight["weights (sharded master)"] == hsdp["weights (sharded master)"] == size.total * 4 / 8
    assert eight["optimizer state (sharded)"] == size.total * 8 / 8
    assert eight["EMA, fp32 (sharded like the optimizer)"] == size.total * 4 / 8, "EMA shards like the weights"
    no_ac = memory_plan(size, dataclasses.replace(adamw, activation_checkpointing=False), ONE_GPU)
    ac = memory_plan(size, adamw, ONE_GPU)
    assert no_ac.peak_gib > ac.peak_gib + 50


@pytest.mark.unit
def test_communication_model_fsdp_over_64_nodes_is_network_bound_and_hsdp_is_not():
    p = transformer_size(SD35_LARGE_CONFIG).total
    fsdp = traffic("fsdp", p, world_size=512, nodes=64)
    hsdp = traffic("hsdp", p, world_size=512, nodes=64, shard_degree=8)
    # Two bf16 all-gathers and an fp32 reduce-scatter: 8 bytes per parameter through each GPU's NIC.
    assert fsdp.inter_bytes == pytest.approx(8 * p * 511 / 512) and 63e9 < fsdp.inter_bytes < 65e9
    # HSDP: one all-reduce of the fp32 gradient shard (P/8) across 64 replicas.
    assert hsdp.inter_bytes == pytest.approx(2 * 63 / 64 * 4 * p / 8) and hsdp.inter_bytes < 8.1e9
    assert hsdp.intra_bytes == pytest.approx(8 * p * 7 / 8)
    flops = train_flops_per_sample(SD35_LARGE_CONFIG, 1024, 1024, 333)
    h100 = GPU_PRESETS["h100"]
    slow = step_time(flops, h100, fsdp, batch=4, activation_checkpointing=True)
    fast = step_time(flops, h100, hsdp, batch=4, activation_checkpointing=True)
    assert slow.inter_s == pytest.approx(1.29, abs=0.01), "64 GB at 50 GB/s"
    assert slow.overlapped_s == slow.inter_s > slow.compute_s, "FSDP over 64 nodes waits on the network"
    assert fast.overlapped_s == fast.compute_s, "HSDP hides its communication behind compute"
    assert traffic("zero2", p, world_size=8, nodes=1).intra_bytes == pytest.approx(6 * p * 7 / 8)


@pytest.mark.unit
def test_plan_prints_the_hsdp_plan_for_four_nodes(capsys):
    assert main(["plan", "--profile", "h100x8x4"]) == 0
    out = capsys.readouterr().out
    assert "mesh: fsdp2: HSDP 4 replicas × 8 shards" in out
    assert "<- runs" in [line for line in out.splitlines() if line.strip().startswith("HSDP")][0]
    assert "fits" in out and "8,056,627,520" in out


@pytest.mark.unit
def test_the_dry_run_prints_a_one_line_plan_beside_the_script(capsys, tmp_path):
    assert main(["submit", "--profile", "h100x8x4", "--dry-run", "--run-dir", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    plan_lines = [line for line in captured.err.splitlines() if line.startswith("plan")]
    assert len(plan_lines) == 1 and "GiB per GPU" in plan_lines[0] and "across nodes" in plan_lines[0]
    assert "MFU" in plan_lines[0] and "plan" not in captured.out.split("\n")[0]
    assert main(["plan", "--profile", "h100x8x4", "--recipe", str(PROJECT / "recipes/sd35l-full-zero3.yaml")]) == 2
    assert "parallel.strategy: zero3 across 4 nodes" in capsys.readouterr().err, "plan refuses what submit refuses"


@pytest.mark.unit
@pytest.mark.parametrize(("override", "key"), [
    ("train.gradient_checkpointing=false", "train.gradient_checkpointing"),
    ("train.train_batch_size=64", "train.train_batch_size"),
])
def test_a_recipe_that_cannot_fit_is_refused_with_the_knob_to_turn(override, key, capsys, tmp_path):
    assert main(["plan", "--profile", "h100x8", "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: sd35l-full-fsdp2.yaml: {key}: predicted peak "), err
    assert "exceeds the 79.6 GiB of one h100" in err[0]
    run_dir = tmp_path / "run"
    assert main(["submit", "--profile", "h100x8", "--set", override, "--run-dir", str(run_dir), "--dry-run"]) == 2
    assert not run_dir.exists()


@pytest.mark.unit
def test_the_plan_reads_the_models_own_config(tmp_path, capsys):
    model = tmp_path / "model" / "transformer"
    model.mkdir(parents=True)
    config = dict(SD35_LARGE_CONFIG, num_layers=2)
    (model / "config.json").write_text(json.dumps(config))
    recipe = (PROJECT / "recipes" / "sd35l-full-fsdp2.yaml").read_text().replace(
        "~/models/stable-diffusion-3.5-large", str(tmp_path / "model"))
    (tmp_path / "r.yaml").write_text(recipe)
    assert main(["plan", "--profile", "h100x8", "--recipe", str(tmp_path / "r.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"({transformer_size(config).total:,}) from {model / 'config.json'}" in out
    assert transformer_size(config).total * 16 / 8 / GIB < 1


@pytest.mark.unit
@pytest.mark.parametrize("targets", ["attention", "attention_ff", "all_linear", ["attn2.to_q", "proj_out"]])
def test_the_lora_count_equals_peft_on_the_meta_model(targets):
    """The plan's adapter count (no torch) against peft's adapters injected into the tiny meta model,
    whose dual-attention block, context_pre_only last block and qk norm cover every Linear family."""
    from sd35dist.config.recipe import LoraSection
    from sd35dist.models.lora import inject_lora
    from sd35dist.models.tiny_sd3 import TRANSFORMER_SIZES
    from sd35dist.models.transformer_build import build_on_meta

    section = LoraSection(rank=4, alpha=4, targets=targets)
    model = build_on_meta(dict(TRANSFORMER_SIZES))
    inject_lora(model, section, dtype=torch.float32, seed=0)
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora_parameters(dict(TRANSFORMER_SIZES), section.target_modules(), 4) == adapters > 0


@pytest.mark.unit
@pytest.mark.parametrize("lora", [
    {"type": "lokr", "rank": 10000, "alpha": 1, "full_matrix": True,
     "preset": {"target_module": ["Attention", "FeedForward"], "module_algo_map": {"FeedForward": {"factor": 8}}}},
    {"type": "lokr", "rank": 2, "factor": 4, "targets": "attention_ff"},
    {"type": "loha", "rank": 4, "preset": {"target_module": ["JointTransformerBlock"], "target_name": ["proj_out"]}}])
def test_the_lycoris_count_equals_the_layers_built_on_the_meta_model(lora):
    """The plan's LoKr/LoHa count (no torch, SD3's classes by module name) against the adapters built."""
    from sd35dist.config.model_size import adapter_parameters
    from sd35dist.config.recipe import LoraSection
    from sd35dist.models.lora import inject_lora
    from sd35dist.models.tiny_sd3 import TRANSFORMER_SIZES
    from sd35dist.models.transformer_build import build_on_meta

    section = LoraSection(**lora)
    model = build_on_meta(dict(TRANSFORMER_SIZES))
    inject_lora(model, section, dtype=torch.float32, seed=0)
    adapters = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert adapter_parameters(dict(TRANSFORMER_SIZES), section) == adapters > 0


@pytest.mark.unit
def test_a_lora_recipe_is_planned_as_a_frozen_base_and_sharded_adapters():
    # SD3.5 Large's counts as peft gives them on the meta model (benchmarks/lora_params.py, docs/benchmarks.md).
    assert lora_parameters(SD35_LARGE_CONFIG, LORA_PRESET_MODULES["attention"], 16) == 23_580_672
    assert lora_parameters(SD35_LARGE_CONFIG, LORA_PRESET_MODULES["attention"], 256) == 377_290_752
    assert lora_parameters(SD35_LARGE_CONFIG, LORA_PRESET_MODULES["attention_ff"], 256) == 844_234_752
    assert lora_parameters(SD35_LARGE_CONFIG, None, 256) == 1_181_466_624
    size, eight = transformer_size(SD35_LARGE_CONFIG), resolve_mesh(strategy="fsdp2", shard_degree=None, nodes=1,
                                                                     procs_per_node=8)
    full = dataclasses.replace(PURE_BF16, master_bytes=4, state_bytes=8, optimizer_impl="fused", ema=True)
    lora = dataclasses.replace(full, trainable=377_290_752)
    rows = dict(memory_plan(size, lora, eight).rows)
    assert rows["base weights, frozen (sharded)"] == size.total * 2 / 8
    assert rows["adapter optimizer state, fp32 (sharded)"] == 377_290_752 * 8 / 8
    assert rows["EMA, fp32 (sharded like the optimizer)"] == 377_290_752 * 4 / 8
    assert memory_plan(size, lora, eight).peak_gib < memory_plan(size, full, eight).peak_gib - 10
    p = size.total
    assert traffic("zero2", p, world_size=8, nodes=1, trainable=377_290_752).intra_bytes < 0.1 * traffic(
        "zero2", p, world_size=8, nodes=1).intra_bytes, "zero2 LoRA moves only the adapters"
    proc = main(["plan", "--profile", "h100x8", "--recipe", str(PROJECT / "recipes" / "sd35l-lora-fsdp2.yaml")])
    assert proc == 0
