"""A NaN or inf loss, gradient or weight stops the run in one line naming the step, exit status 2,
never restarted — and a checkpoint of such weights is never published: `latest` keeps naming the
last sound one. The loss on FSDP2 and ZeRO-2, fp32 and bf16, 2 CPU ranks under sd35dist's torchrun
with the profile's default restarts; the weights' check on a one-process group with each strategy.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from sd35dist.checkpoint.finite import all_finite, finite_non_negative
from sd35dist.checkpoint.layout import CheckpointDir
from sd35dist.config.loading import ConfigError, load_yaml, validate_mapping
from sd35dist.config.recipe import TrainSection
from tests.rank_runs import assert_one_quiet_line, torchrun
from tests.train_runs import train_recipe

# DeepSpeed on its CPU accelerator, its ops built in the venv's own folder (conftest.py).
pytestmark = pytest.mark.usefixtures("deepspeed_on_cpu")

POISON = {"learning_rate": 1e30, "lr_scheduler": "constant", "lr_warmup_steps": 2, "max_train_steps": 6,
          "checkpointing_steps": 2, "checkpoints_total_limit": 5}
CASES = {"fsdp2-fp32": ("fsdp2", "fp32"), "fsdp2-bf16": ("fsdp2", "bf16"),
         "zero2-fp32": ("zero2", "fp32"), "zero2-bf16": ("zero2", "bf16")}


def poisoned_recipe(tmp_path: Path, cache, strategy: str, precision: str, **train) -> Path:
    recipe = train_recipe(tmp_path / "r.yaml", cache, tmp_path / "out", mixed_precision=precision, **{**POISON, **train})
    data = yaml.safe_load(recipe.read_text())
    data["parallel"]["strategy"] = strategy
    recipe.write_text(yaml.safe_dump(data))
    return recipe


def checkpoint_names(output: Path) -> list[str]:
    root = CheckpointDir(output).root
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) if root.is_dir() else []


CLI_CASE = "zero2-bf16"
"""Started as a profile's script starts it: exit status 2, one line, not restarted. The other cases run
in one torchrun (tests/trainings_check.py), where each rank records the line the run ends with."""


@pytest.fixture(scope="module")
def driven(cache, tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """The cases other than CLI_CASE, one after another in one process group: ROOT/CASE/{out,run}, and
    per case each rank's outcome."""
    from tests.trainings_check import run_trainings

    root = tmp_path_factory.mktemp("nonfinite")
    cases = [case for case in CASES if case != CLI_CASE]
    jobs = []
    for case in cases:
        (root / case).mkdir()
        jobs.append((poisoned_recipe(root / case, cache, *CASES[case]), root / case / "run"))
    runs = run_trainings(root / "outcomes.json", *jobs)
    return root, {case: run["outcomes"] for case, run in zip(cases, runs, strict=True)}


@pytest.mark.dist
@pytest.mark.parametrize("case", list(CASES))
def test_a_non_finite_loss_stops_the_run_in_one_line_naming_the_step(cache, tmp_path, case, request):
    """lr 1e30 (finite, within float32) after a step of warmup at lr 0: step 2's update makes the weights
    ~1e30, still finite, and they are published; step 3's forward overflows. The run stops there, before
    step 3 reaches the weights."""
    if case == CLI_CASE:
        proc = torchrun("train", poisoned_recipe(tmp_path, cache, *CASES[case]), tmp_path / "run", timeout=900)
        line = assert_one_quiet_line(proc)  # exit 2, one error line, no traceback, not restarted
        assert "(a mistake: not restarted)" in proc.stderr
        root = tmp_path
    else:
        driven_root, outcomes = request.getfixturevalue("driven")
        root = driven_root / case
        line = outcomes[case][0]
        assert outcomes[case] == [line, line], "every rank stops at the same step with the same line"
    assert re.match(r"error: step 3: the loss is (nan|inf), not a finite number: training stops and nothing of "
                    r"step 3 is saved \(latest checkpoint: step-00000002\); lower train.learning_rate or check the data",
                    line), line
    assert checkpoint_names(root / "out") == ["step-00000002"], "no .partial of step 3"
    assert CheckpointDir(root / "out").latest().name == "step-00000002"
    steps = [json.loads(row)["step"] for row in (root / "run" / "metrics-rank00000.jsonl").read_text().splitlines()]
    assert steps == [1, 2], "no metrics of the poisoned step"


@pytest.mark.unit
@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "1e999", "inf", "NaN"])
def test_a_non_finite_learning_rate_is_refused_at_load_time(text):
    with pytest.raises(ConfigError, match=r"r\.yaml: learning_rate: must be a finite number"):
        validate_mapping(TrainSection, {"learning_rate": load_yaml(text)}, "r.yaml")


@pytest.mark.unit
def test_what_counts_as_finite():
    assert finite_non_negative(0.0) and finite_non_negative(3.5)
    # DeepSpeed reports a gradient norm it could not compute (inf or NaN inside) as -1.
    assert not any(finite_non_negative(v) for v in (math.nan, math.inf, -math.inf, -1.0, None))
    assert all_finite([torch.ones(3), torch.zeros(2, 2)]) and all_finite([])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, math.nan])])
    assert not all_finite([torch.tensor([math.inf], dtype=torch.bfloat16)])


@pytest.fixture
def one_process_world(monkeypatch):
    """A one-process gloo group in this process (the torchrun variables unset, as a plain `python` run)."""
    from sd35dist.parallel.process_group import destroy, init_process_group_from_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    world = init_process_group_from_env(120)
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)  # DeepSpeed sets these itself; set here they are undone after the test
    yield world
    destroy()


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["fsdp2", "zero2"])
def test_a_checkpoint_of_non_finite_weights_is_never_published(tiny_model, tmp_path, one_process_world,
                                                               strategy):
    """A NaN that reached the EMA or a weight without passing through the loss (an EMA resumed from an
    old checkpoint; DeepSpeed's bf16 step, which applies a gradient whose norm it could not compute) is
    found when a checkpoint is about to be written: nothing is written, `latest` stays on the last sound
    one. (One test per strategy: DeepSpeed keeps its groups per process, so it initialises once here.)"""
    from sd35dist.checkpoint.finite import NonFiniteTraining
    from sd35dist.checkpoint.manager import CheckpointManager
    from sd35dist.config.recipe import Recipe
    from sd35dist.parallel.strategy import make_strategy

    recipe = Recipe.model_validate({
        "name": "t", "model": {"pretrained": str(tiny_model)}, "data": {"cache_url": str(tmp_path / "cache")},
        "parallel": {"strategy": strategy}, "output": {"dir": str(tmp_path / "out")},
        "train": {"mixed_precision": "fp32", "ema": {"enabled": True}, "gradient_checkpointing": False}})
    model = make_strategy(recipe, one_process_world)
    manager = CheckpointManager(recipe, one_process_world, model, {}, resume_from=None)
    manager.save(1)
    assert manager.latest().name == "step-00000001" and model.weights_finite()
    weight = model.trainable[0][1] if strategy == "fsdp2" else model._named_master_fragments()[0][1]
    for step, target in ((2, next(iter(model.ema.shadow.values()))), (3, weight)):
        local = (target.to_local() if hasattr(target, "to_local") else target).view(-1)
        sound = float(local[0])
        with torch.no_grad():
            local[0] = math.nan
        assert not model.weights_finite()
        with pytest.raises(NonFiniteTraining, match=rf"^step {step}: the weights hold NaN or inf, so this checkpoint "
                                                    r"is not published \(latest stays step-00000001\)"):
            manager.save(step)
        assert checkpoint_names(tmp_path / "out") == ["step-00000001"], "nothing of it, not even a .partial"
        assert manager.latest().name == "step-00000001"
        with torch.no_grad():
            local[0] = sound
    assert model.weights_finite()
    manager.save(4)
    assert manager.latest().name == "step-00000004", "sound weights are published again"
