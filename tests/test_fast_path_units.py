"""The fast path's pure parts and in-process model changes (no compile, no process group): checkpointing
policies and the plan's choice, FP8 Linear selection, what each policy recomputes, the GPU environment
in job scripts, and the one-line refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from launcher.cli import main
from sd35dist.config.activation_policy import CheckpointingPolicy, candidate_policies, parse_policy
from sd35dist.config.mesh_layout import resolve_mesh
from sd35dist.config.model_size import SD35_LARGE_CONFIG, image_tokens, transformer_size
from sd35dist.config.resource_plan import (
    GPU_PRESETS,
    Workload,
    choose_checkpointing,
    memory_plan,
    step_time,
    traffic,
    train_flops_per_sample,
)

pytestmark = pytest.mark.unit

SIZE = transformer_size(SD35_LARGE_CONFIG)
TOKENS = image_tokens(SD35_LARGE_CONFIG, 1024, 1024) + 77 + 256
FLOPS = train_flops_per_sample(SD35_LARGE_CONFIG, 1024, 1024, 333)
EIGHT = resolve_mesh(strategy="fsdp2", shard_degree=None, nodes=1, procs_per_node=8)
FULL_ADAMW = Workload(strategy="fsdp2", master_bytes=4, state_bytes=8, compute_bytes=2, optimizer_impl="fused",
                      batch=4, gradient_accumulation=1, tokens=TOKENS, activation_checkpointing=True, ema=True)


def test_recipe_values_name_policies_and_anything_else_is_refused():
    assert parse_policy(True) == CheckpointingPolicy("full") and parse_policy(False) == CheckpointingPolicy("none")
    assert parse_policy("auto") is None
    assert parse_policy("every_3").checkpointed_blocks(8) == (0, 3, 6)
    assert parse_policy("attention").name == "attention" and parse_policy("every_2").name == "every_2"
    for bad in ("every_1", "every_x", "attn", "yes"):
        with pytest.raises(ValueError, match="not a checkpointing policy"):
            parse_policy(bad)


def test_policies_keep_less_the_more_they_recompute():
    layers, d = 38, SIZE.hidden_size
    by_cost = sorted(candidate_policies(layers), key=lambda p: p.recomputed_flops(d, TOKENS, layers))
    assert by_cost[0].kind == "none" and by_cost[-1].kind == "full"
    assert by_cost[0].recomputed_flops(d, TOKENS, layers) == 0
    kept = {p.name: p.kept_d(layers) for p in candidate_policies(layers)}
    assert kept["true"] == layers and kept["false"] == 24 * layers
    assert kept["true"] < kept["every_2"] < kept["false"] and kept["attention"] < kept["false"]
    # Full per-block checkpointing recomputes every block's forward: about a third of a training step's FLOPs.
    full = CheckpointingPolicy("full").recomputed_flops(d, TOKENS, layers)
    assert abs(full / FLOPS - 1 / 3) < 0.01


def test_plan_picks_the_least_recomputation_that_fits():
    # 8 H100s, fp32 masters + EMA: no checkpointing does not fit, full does; the choice sits between.
    h100 = GPU_PRESETS["h100"]
    choice = choose_checkpointing(SIZE, FULL_ADAMW, EIGHT, h100.memory_gib, FLOPS)
    assert choice.fits and choice.plan.peak_gib <= h100.memory_gib
    none = memory_plan(SIZE, dataclasses.replace(FULL_ADAMW, activation_checkpointing=False), EIGHT)
    assert none.peak_gib > h100.memory_gib
    assert choice.policy.kind not in ("none", "full"), choice.policy
    cheaper = [p for p in candidate_policies(38) if p.recomputed_flops(SIZE.hidden_size, TOKENS, 38)
               < choice.policy.recomputed_flops(SIZE.hidden_size, TOKENS, 38)]
    assert all(memory_plan(SIZE, dataclasses.replace(FULL_ADAMW, activation_checkpointing=p), EIGHT).peak_gib
               > h100.memory_gib for p in cheaper), "a cheaper policy would have fit"
    # On an H200 nothing needs recomputing; on a tiny GPU full checkpointing is the answer, marked as not fitting.
    assert choose_checkpointing(SIZE, FULL_ADAMW, EIGHT, 140.4, FLOPS).policy.kind == "none"
    tight = choose_checkpointing(SIZE, FULL_ADAMW, EIGHT, 10.0, FLOPS)
    assert tight.policy.kind == "full" and not tight.fits
    # The step-time model charges the chosen policy's recomputation, not a full forward.
    link = traffic("fsdp", SIZE.total, world_size=8, nodes=1)
    partial = step_time(FLOPS, h100, link, batch=4, activation_checkpointing=True,
                        recomputed_flops_per_sample=choice.recomputed_share * FLOPS)
    full = step_time(FLOPS, h100, link, batch=4, activation_checkpointing=True)
    assert partial.compute_s < full.compute_s


def test_plan_prints_the_policy_it_chose_and_its_cost(capsys):
    assert main(["plan", "--profile", "h100x8", "--set", "train.train_batch_size=4"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("activation checkpointing"))
    assert "auto" in line and "recomputes" in line and "GiB" in line, line
    assert main(["plan", "--profile", "h100x8", "--set", "train.gradient_checkpointing=every_2",
                 "--set", "train.train_batch_size=1"]) == 0
    forced = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("activation checkpointing"))
    assert "one block in 2 (19 of 38)" in forced and "recipe" in forced, forced


def test_gpu_profiles_export_the_gpu_environment_with_why(capsys):
    assert main(["submit", "--profile", "h100x8", "--dry-run"]) == 0
    script = capsys.readouterr().out
    lines = script.splitlines()
    exports = {line.split("=", 1)[0][len("export "):]: line.split("=", 1)[1] for line in lines if line.startswith("export ")}
    assert exports["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert exports["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert exports["SD35DIST_COLLECTIVE_TIMEOUT_S"] == "1800"
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_DUMP_ON_TIMEOUT"):
        index = next(i for i, line in enumerate(lines) if line.startswith(f"export {name}="))
        assert lines[index - 1].startswith("# ") and len(lines[index - 1]) > 30, "each variable says why"
    # Turned off one by one, a profile's own value wins, and CPU profiles get none of it.
    assert main(["submit", "--profile", "h100x8", "--dry-run", "--set", "gpu_env.expandable_segments=false",
                 "--set", "gpu_env.collective_timeout_s=600", "--set", "env.values={NCCL_DEBUG: INFO}"]) == 0
    script = capsys.readouterr().out
    assert "PYTORCH_CUDA_ALLOC_CONF" not in script and "SD35DIST_COLLECTIVE_TIMEOUT_S=600" in script
    assert script.count("NCCL_DEBUG=") == 1 and "export NCCL_DEBUG=INFO" in script
    assert main(["submit", "--profile", "slurm-dev", "--dry-run"]) == 0
    assert "PYTORCH_CUDA_ALLOC_CONF" not in capsys.readouterr().out


def test_the_collective_timeout_reaches_the_process_group():
    from sd35dist.parallel.process_group import collective_timeout_s
    from sd35dist.runtime.job_env import COLLECTIVE_TIMEOUT_VAR, JobEnvironment

    assert collective_timeout_s(JobEnvironment.read({COLLECTIVE_TIMEOUT_VAR: "600"}), 1800) == 600
    assert collective_timeout_s(JobEnvironment.read({}), 1800) == 1800


@pytest.mark.parametrize(("overrides", "key"), [
    (["train.fp8=tensorwise", "hardware.gpu=a100"], "train.fp8"),
    (["train.fp8=rowwise", "parallel.strategy=zero2"], "train.fp8"),
    (["train.gradient_checkpointing=every_1"], "train.gradient_checkpointing"),
    (["train.compile_blocks=sometimes"], "train.compile_blocks"),
    (["train.compile_backend=tvm"], "train.compile_backend"),
])
def test_fast_path_mistakes_are_one_line(capsys, overrides, key):
    args = ["submit", "--profile", "h100x8", "--dry-run"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err


# ---- the model changes, in this process on the tiny transformer -----------------------------------------

def _tiny(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    from sd35dist.models.tiny_sd3 import TRANSFORMER_SIZES

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**TRANSFORMER_SIZES, "num_layers": 5})


def _inputs(batch: int = 2, side: int = 8):
    generator = torch.Generator().manual_seed(7)
    return {"hidden_states": torch.randn(batch, 16, side, side, generator=generator),
            "encoder_hidden_states": torch.randn(batch, 7, 32, generator=generator),
            "pooled_projections": torch.randn(batch, 64, generator=generator),
            "timestep": torch.tensor([500.0, 20.0])[:batch]}


def _grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(**_inputs(), return_dict=False)[0]
    loss = (out.float() ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy", ["true", "every_2", "attention", "mlp"])
def test_each_policy_recomputes_what_it_says_and_changes_no_number_or_name(policy):
    from sd35dist.parallel.compute_path import apply_checkpointing

    eager = _tiny()
    keys = list(eager.state_dict())
    loss, grads = _grads(eager)
    model = _tiny()
    resolved = parse_policy(policy if policy != "true" else True)
    count = apply_checkpointing(model.transformer_blocks, resolved)
    assert count == {"true": 5, "every_2": 3, "attention": 6, "mlp": 9}[policy]  # block 0 has attn2; the last no ff_context
    assert list(model.state_dict()) == keys, "checkpointing keeps every key"
    ran_in_backward: set[str] = set()  # modules whose forward runs again during backward

    def record(at: str):
        return lambda *_: ran_in_backward.add(at) if torch._C._current_graph_task_id() >= 0 else None

    for index, block in enumerate(model.transformer_blocks):
        for name, module in block.named_modules():
            if name:  # a checkpointed module's own hooks stay outside; its submodules' run again
                module.register_forward_hook(record(f"{index}.{name}"))
    loss2, grads2 = _grads(model)
    assert torch.equal(loss, loss2) and all(torch.equal(grads[n], grads2[n]) for n in grads)
    assert ran_in_backward
    if policy == "every_2":
        assert {at.split(".")[0] for at in ran_in_backward} == {"0", "2", "4"}
    if policy == "attention":
        assert {at.split(".", 1)[1].split(".")[0] for at in ran_in_backward} <= {"attn", "attn2"}
    if policy == "mlp":
        assert {at.split(".", 1)[1].split(".")[0] for at in ran_in_backward} <= {"ff", "ff_context"}


def test_fp8_swaps_the_inner_blocks_token_linears_only_and_keeps_the_keys():
    from torchao.float8.float8_linear import Float8Linear

    from sd35dist.parallel.compute_path import convert_to_fp8

    model = _tiny()
    keys = {k: v.dtype for k, v in model.state_dict().items()}
    swapped = convert_to_fp8(model, "rowwise", torch.device("cpu"), fsdp_all_gather=False)
    names = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert swapped == len(names) > 0
    assert all(n.startswith(("transformer_blocks.1.", "transformer_blocks.2.", "transformer_blocks.3.")) for n in names)
    assert not any(".norm1" in n for n in names), "the adaLN modulation Linears stay bf16"
    assert "transformer_blocks.2.attn.to_q" in names and "transformer_blocks.2.ff.net.2" in names
    assert {k: v.dtype for k, v in model.state_dict().items()} == keys, "same keys, master dtype"
    out = model(**_inputs(), return_dict=False)[0]
    assert torch.isfinite(out).all()


def test_compile_settings_resolve_per_device_and_name_the_backend_in_the_log_line():
    from sd35dist.config.recipe import Recipe
    from sd35dist.parallel.compute_path import compile_on, compute_settings

    assert compile_on("auto", torch.device("cuda")) and not compile_on("auto", torch.device("cpu"))
    assert not compile_on(False, torch.device("cuda")) and compile_on(True, torch.device("cpu"))

    recipe = Recipe(name="c", model={"pretrained": "unused"}, data={"cache_url": "unused"}, output={"dir": "unused"},
                    train={"gradient_checkpointing": "every_2", "compile_backend": "aot_eager"})
    assert recipe.train.compile_blocks == "auto"  # the default: on where it pays
    settings = compute_settings(recipe, SD35_LARGE_CONFIG, EIGHT, torch.device("cpu"))
    assert not settings.compile_blocks, "auto stays eager on CPU"
    forced = recipe.model_copy(update={"train": recipe.train.model_copy(update={"compile_blocks": True})})
    settings = compute_settings(forced, SD35_LARGE_CONFIG, EIGHT, torch.device("cpu"))
    assert settings.compile_blocks and settings.compile_backend == "aot_eager"
    assert settings.describe(38) == ("activation checkpointing: one block in 2 (19 of 38); "
                                     "compile: per block, dynamic shapes, aot_eager; fp8: none")
