"""`sd35dist plan`: what a recipe costs on a profile, per GPU, before anything is submitted.

Memory (and whether it fits), communication inside and across nodes for FSDP, HSDP, ZeRO-2
and ZeRO-3, and the predicted step time and MFU from the profile's declared GPU. The maths
is sd35dist/config/resource_plan.py; this module gathers its inputs (the model's
config.json, read as JSON: no torch, no weights) and writes the report.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from launcher.plan import mesh_layout
from launcher.profile import Profile
from sd35dist.config import ConfigError, Recipe
from sd35dist.config.activation_policy import parse_policy
from sd35dist.config.mesh_layout import MeshLayout
from sd35dist.config.model_size import SD35_LARGE_CONFIG, TransformerSize, transformer_size
from sd35dist.config.resource_plan import (
    GIB,
    PEAK_TOLERANCE,
    TEXT_TOKENS_CLIP,
    CheckpointingChoice,
    Hardware,
    MemoryPlan,
    StepTime,
    Traffic,
    Workload,
    choose_checkpointing,
    fit_advice,
    largest_bucket,
    memory_plan,
    recomputed_share,
    step_time,
    traffic_table,
    train_flops_per_sample,
    workload_from_recipe,
)

STRATEGY_NAMES = {"fsdp": "FSDP (all ranks)", "hsdp": "HSDP (node shards)", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}


def model_config(recipe: Recipe) -> tuple[dict[str, Any], str]:
    """The transformer's config.json from the recipe's model directory, else SD3.5 Large's (the
    model directory usually lives on the cluster, not on the submit host)."""
    path = Path(recipe.model.pretrained) / recipe.model.transformer_subfolder / "config.json"
    if path.is_file():
        return json.loads(path.read_text()), str(path)
    return dict(SD35_LARGE_CONFIG), f"SD3.5 Large's config ({path} is not on this host)"


@dataclasses.dataclass(frozen=True)
class ResourceReport:
    profile_name: str
    recipe_name: str
    recipe_file: str
    model_source: str
    size: TransformerSize
    mesh: MeshLayout
    work: Workload
    bucket: tuple[int, int, int]
    hardware: Hardware | None
    gpus_per_node: int
    memory: MemoryPlan
    memory_other_ac: MemoryPlan
    traffic: tuple[Traffic, ...]
    times: tuple[StepTime, ...]
    """One per traffic row, when hardware is declared."""
    runs: str
    """The traffic row of the mesh that runs (fsdp, hsdp, zero2, zero3)."""
    checkpointing: CheckpointingChoice
    """The activation checkpointing policy planned: the recipe's, or `auto`'s choice for the declared GPU."""
    checkpointing_source: str
    """recipe | auto (chosen for the GPU) | auto (no GPU declared: full)"""

    @property
    def fits(self) -> bool:
        return self.hardware is None or self.memory.peak_gib <= self.hardware.memory_gib


def build_report(profile: Profile, recipe: Recipe, profile_name: str, recipe_file: str = "recipe") -> ResourceReport:
    config, source = model_config(recipe)
    size = transformer_size(config)
    mesh = mesh_layout(profile, recipe, recipe_file)
    hardware = profile.hardware.resolved()
    work = workload_from_recipe(recipe, config, on_gpus=profile.gpus_per_node > 0)
    width, height, tokens = largest_bucket(recipe, config)
    flops = train_flops_per_sample(config, width, height, TEXT_TOKENS_CLIP + recipe.data.max_sequence_length)
    auto = parse_policy(recipe.train.gradient_checkpointing) is None
    if auto and hardware is not None:
        choice = choose_checkpointing(size, work, mesh, hardware.memory_gib, flops)
        ac_source = "auto, chosen for the GPU"
    else:
        plan = memory_plan(size, work, mesh)
        choice = CheckpointingChoice(work.policy, plan, recomputed_share(work.policy, size, work.tokens, flops),
                                     hardware is None or plan.peak_gib <= hardware.memory_gib)
        ac_source = "auto: no GPU declared, so every block" if auto else "recipe"
    work = dataclasses.replace(work, activation_checkpointing=choice.policy)
    other = dataclasses.replace(work, activation_checkpointing=work.policy.kind != "full")
    table = tuple(traffic_table(size.total, world_size=mesh.world_size, nodes=mesh.nodes,
                                compute_bytes=work.compute_bytes, trainable=work.trainable))
    times: tuple[StepTime, ...] = ()
    if hardware is not None:
        times = tuple(step_time(flops, hardware, row, batch=work.batch, micro_steps=work.gradient_accumulation,
                                activation_checkpointing=True, recomputed_flops_per_sample=choice.recomputed_share * flops)
                      for row in table)
    runs = {"fsdp2": "hsdp" if mesh.is_hsdp else "fsdp"}.get(work.strategy, work.strategy)
    return ResourceReport(profile_name, recipe.name, recipe_file, source, size, mesh, work, (width, height, tokens),
                          hardware, profile.gpus_per_node, memory_plan(size, work, mesh), memory_plan(size, other, mesh),
                          table, times, runs, choice, ac_source)


def refuse_if_too_big(report: ResourceReport) -> None:
    """One line naming the number and the knob to turn when the predicted peak exceeds the GPU."""
    if report.fits:
        return
    assert report.hardware is not None
    key, advice = fit_advice(report.size, report.work, report.mesh, report.memory, report.hardware.memory_gib)
    raise ConfigError(report.recipe_file, key,
                      f"predicted peak {report.memory.peak_gib:.1f} GiB per GPU exceeds the {report.hardware.memory_gib:g} GiB "
                      f"of one {report.hardware.name} (profile {report.profile_name}); {advice}")


def _gb(value: float) -> str:
    return f"{value / 1e9:8.2f}"


def render_report(report: ResourceReport) -> str:
    work, mesh, hw = report.work, report.mesh, report.hardware
    width, height, tokens = report.bucket
    gpus = f"{mesh.nodes} node(s) × {mesh.world_size // mesh.nodes} {'× ' + hw.name if hw else 'ranks'}"
    layers = len(report.size.blocks)
    ac = f"activation checkpointing {work.policy.name}"
    lines = [
        f"plan: recipe {report.recipe_name} on profile {report.profile_name} ({gpus}, {mesh.world_size} ranks)",
        f"model: {report.size.total / 1e9:.3f}e9 parameters ({report.size.total:,}) from {report.model_source}"
        + ("" if work.trainable is None else f"; LoRA: {work.trainable:,} adapter parameters train, the base is frozen"),
        f"mesh: {mesh.describe()}",
        f"work: batch {work.batch} per GPU × {work.gradient_accumulation} micro-step(s) at the largest bucket "
        f"{width}x{height} ({tokens} tokens), {ac}, optimizer {work.optimizer_impl} "
        f"({work.master_bytes} B master weights, {work.state_bytes} B optimizer state per parameter)",
        f"activation checkpointing ({report.checkpointing_source}): {work.policy.describe(layers)}; recomputes "
        f"{report.checkpointing.recomputed_share:.1%} of a step's model FLOPs; peak "
        f"{report.checkpointing.plan.peak_gib:.1f} GiB (set train.gradient_checkpointing to force one: true, false, "
        "every_N, attention, mlp)",
        "",
        "memory per GPU                                     GiB",
    ]
    lines += [f"  {name:<48}{value / GIB:7.2f}" for name, value in report.memory.rows if value]
    budget = f" of {hw.memory_gib:g} ({hw.name}): {'fits' if report.fits else 'DOES NOT FIT'}" if hw else " (no GPU declared)"
    lines.append(f"  {'peak (' + report.memory.phase + ')':<48}{report.memory.peak_gib:7.2f}{budget}")
    other = "with" if work.policy.kind != "full" else "without"
    lines.append(f"  {'peak ' + other + ' per-block checkpointing':<48}{report.memory_other_ac.peak_gib:7.2f}")
    lines.append(f"  (the model holds to measured H100 peaks within ±{PEAK_TOLERANCE:.0%}; docs/benchmarks.md)")
    lines += ["", "communication per GPU per optimizer step    inside node GB  across nodes GB"
              + ("   step s overlapped / serial   MFU overlapped / serial" if hw else "")]
    for index, row in enumerate(report.traffic):
        steps = work.gradient_accumulation
        text = f"  {STRATEGY_NAMES[row.strategy]:<40}{_gb(row.intra_bytes * steps)}      {_gb(row.inter_bytes * steps)}"
        if hw:
            t = report.times[index]
            text += f"   {t.overlapped_s:8.3f} / {t.serial_s:<8.3f}      {t.mfu_overlapped:6.1%} / {t.mfu_serial:.1%}"
        lines.append(text + ("   <- runs" if row.strategy == report.runs else ""))
    if hw:
        compute = report.times[0].compute_s
        lines += ["", f"compute {compute:.3f} s per step at {hw.matmul_efficiency:.0%} of {hw.peak_bf16_tflops:g} "
                      f"TFLOP/s; links {hw.intra_node_gb_s:g} GB/s inside a node, {hw.inter_node_gb_s:g} GB/s across"]
    else:
        lines += ["", "declare hardware.gpu (h100 | h200) in the profile for the fit check, step time and MFU"]
    return "\n".join(lines) + "\n"


def summary_line(report: ResourceReport) -> str:
    """What `submit --dry-run` prints about the plan (stderr; stdout stays the script)."""
    assumed = " (SD3.5 Large's config assumed)" if report.model_source.startswith("SD3.5 Large") else ""
    text = f"plan{assumed}: peak {report.memory.peak_gib:.1f} GiB per GPU ({report.memory.phase})"
    if report.hardware:
        row = next(i for i, r in enumerate(report.traffic) if r.strategy == report.runs)
        t = report.times[row]
        text += (f" of {report.hardware.memory_gib:g}; {report.traffic[row].inter_bytes * report.work.gradient_accumulation / 1e9:.1f}"
                 f" GB per GPU per step across nodes; predicted {t.overlapped_s:.2f} s/step, MFU {t.mfu_overlapped:.0%}")
    return text + "; details: sd35dist plan"
