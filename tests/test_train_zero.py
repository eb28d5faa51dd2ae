"""`sd35dist train` with DeepSpeed ZeRO-2/3 on the tiny SD3, 2 CPU ranks (gloo): exact resume,
rotation, the config it writes, and the same training as FSDP2.

The trainings the tests read run in one torchrun (the `runs` fixture, tests/trainings_check.py): a
start costs ~15 s against ~4 s of training. Every case's resume runs in a second, fresh torchrun (the
`resumed` fixture: a process that did not train what it resumes), except ZeRO-3's branch, which
`sd35dist train` itself runs in a torchrun of its own, as do the resume on another world size and the
crafted checkpoint's refusal."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sd35dist.checkpoint.export import checkpoint_state
from sd35dist.checkpoint.layout import CheckpointDir
from sd35dist.checkpoint.weights import read_weights
from sd35dist.cli import main as sd35dist_main
from sd35dist.config.recipe import Recipe
from sd35dist.parallel.zero import deepspeed_config
from tests.cli_runs import PROJECT, venv_env
from tests.rank_runs import WARM_TORCHRUN
from tests.train_runs import RunsCode, export, losses, train, train_recipe, train_refused

pytestmark = [pytest.mark.dist, pytest.mark.usefixtures("deepspeed_on_cpu")]

# Named override sets. The fp32 ones accumulate and clip (grad norms here are 0.5–0.9), and
# are compared with an FSDP2 run of the same recipe; the bf16 ones are what SD3.5 runs use.
COMPARABLE = {"gradient_accumulation_steps": 2, "max_grad_norm": 0.6}
CASES = {
    "zero2": {"strategy": "zero2", **COMPARABLE},
    "zero3": {"strategy": "zero3", **COMPARABLE},
    "zero2-bf16": {"strategy": "zero2", "mixed_precision": "bf16"},
    "zero3-bf16": {"strategy": "zero3", "mixed_precision": "bf16"},
    "zero2-offload": {"strategy": "zero2", "offload_optimizer": True},
    "zero3-offload": {"strategy": "zero3", "offload_optimizer": True, "offload_params": True},
}
PARALLEL_KEYS = ("offload_optimizer", "offload_params")


def zero_recipe(path: Path, cache: tuple[Path, Path], output: Path, strategy: str, **train) -> Path:
    parallel = {key: train.pop(key) for key in PARALLEL_KEYS if key in train}
    train_recipe(path, cache, output, **train)
    recipe = yaml.safe_load(path.read_text())
    recipe["parallel"].update(strategy=strategy, **parallel)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# Every case resumes in a process that did not train what it resumes: from a stop at step 3 with
# `resume: latest` for bf16 on ZeRO-2 and both offload cases (which resume at step 4: a branch from step 2
# under DeepSpeed's CPU Adam came out ~1e-7 apart from step 4 on, not investigated), the others as a
# branch from step 2 of their straight run. The driver resets torch.nn.functional.linear between runs
# (ZeRO-3 replaces it for good); before it did, resumes inside it came out ~1e-7 apart.
CLI_RESUME = ("zero2-bf16", "zero2-offload", "zero3-offload")
BRANCH_STEP = 2
CLI_BRANCH = "zero3"
"""The branch `sd35dist train` runs itself (the command's start, its output line, its exit status)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> Path:
    """The trainings the module reads, in one torchrun (tests/trainings_check.py): per case a straight run
    that keeps its checkpoints (2, 4, 6); for the CLI_RESUME cases a run that stops at step 3
    (train.stop_at_step); one FSDP2 run with the fp32 cases' recipe, and ZeRO-3 in bf16 with validation on.
    ROOT/CASE/{out,run,stop-out,stop}; ROOT/outcomes.json: per run, what tests/trainings_check.py records."""
    from tests.trainings_check import run_trainings
    from tests.validation_check import cache_validation_prompts, with_validation

    root = tmp_path_factory.mktemp("zero-runs")
    straight, stops = [], []
    for case, settings in CASES.items():
        folder = root / case
        folder.mkdir()
        straight.append((zero_recipe(folder / "r.yaml", cache, folder / "out", checkpointing_steps=2,
                                     checkpoints_total_limit=3, **settings), folder / "run"))
        if case in CLI_RESUME:
            stops.append((zero_recipe(folder / "stop.yaml", cache, folder / "stop-out", stop_at_step=3,
                                      checkpointing_steps=2, **settings), folder / "stop"))
    (root / "fsdp2").mkdir()
    fsdp2 = (train_recipe(root / "fsdp2" / "r.yaml", cache, root / "fsdp2" / "out", checkpointing_steps=2,
                          **COMPARABLE), root / "fsdp2" / "run")
    (root / "validation").mkdir()
    validation = zero_recipe(root / "validation" / "r.yaml", cache, root / "validation" / "out",
                             checkpointing_steps=2, **CASES["zero3-bf16"])
    cache_validation_prompts(validation)
    jobs = [*straight, *stops, fsdp2, (with_validation(validation), root / "validation" / "run")]
    outcomes = run_trainings(root / "outcomes.json", *jobs)
    assert [run["outcomes"] for run in outcomes] == [["done", "done"]] * len(jobs), outcomes
    return root


@pytest.fixture(scope="module")
def resumed(runs, cache, tmp_path_factory) -> Path:
    """Every resume but CLI_BRANCH's, in one fresh torchrun: a branch from the straight run's step-2 checkpoint
    into a new output directory, or `resume: latest` (the default) of a copy of the stopped run's output.
    ROOT/CASE/{out,run,r.yaml}; ROOT/stdout/CASE: what rank 0 printed."""
    from tests.train_runs import train_in_one_group

    root = tmp_path_factory.mktemp("zero-resumed")
    jobs = []
    for case in (case for case in CASES if case != CLI_BRANCH):
        folder = root / case
        folder.mkdir()
        if case in CLI_RESUME:
            shutil.copytree(runs / case / "stop-out", folder / "out")
            recipe = zero_recipe(folder / "r.yaml", cache, folder / "out", checkpointing_steps=2, **CASES[case])
        else:
            recipe = zero_recipe(folder / "r.yaml", cache, folder / "out", checkpointing_steps=2,
                                 resume=str(CheckpointDir(runs / case / "out").path(BRANCH_STEP)), **CASES[case])
        jobs.append((recipe, folder / "run"))
    printed = train_in_one_group(*jobs)
    (root / "stdout").mkdir()
    for _, run_dir in jobs:
        (root / "stdout" / run_dir.parent.name).write_text(printed[run_dir])
    return root


def test_every_case_trains_and_writes_its_deepspeed_config(runs):
    for case, settings in CASES.items():
        got = losses(runs / case / "run")
        assert sorted(got) == [1, 2, 3, 4, 5, 6], case
        assert all(math.isfinite(value) and value > 0 for value in got.values()), case
        ckpts = CheckpointDir(runs / case / "out")
        assert ckpts.complete_steps() == [2, 4, 6], case
        assert (ckpts.latest() / "ds").is_dir(), "DeepSpeed's own checkpoint format"
        config = json.loads((runs / case / "out" / "deepspeed_config.json").read_text())
        assert config["zero_optimization"]["stage"] == {"zero2": 2, "zero3": 3}[settings["strategy"]], case
        assert config["bf16"]["enabled"] == (settings.get("mixed_precision") == "bf16"), case
        assert config["gradient_accumulation_steps"] == settings.get("gradient_accumulation_steps", 1), case
        assert ("offload_optimizer" in config["zero_optimization"]) == bool(settings.get("offload_optimizer")), case
        assert ("offload_param" in config["zero_optimization"]) == bool(settings.get("offload_params")), case


def assert_resumed_like_the_straight_run(runs, case: str, out: Path, run_dir: Path, from_step: int) -> None:
    """Losses after `from_step` and the final weights (and EMA) equal the straight run's; rotation keeps two."""
    expected = losses(runs / case / "run")
    assert losses(run_dir) == {s: expected[s] for s in range(from_step + 1, 7)}, "CPU/gloo resume is exact"
    assert CheckpointDir(out).complete_steps() == [4, 6], "checkpoints_total_limit 2 keeps the newest two"
    for use_ema in (False, True):
        resumed, uninterrupted = final_state(out, use_ema), final_state(runs / case / "out", use_ema)
        assert resumed.keys() == uninterrupted.keys()
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), "final weights (and EMA) equal"


@pytest.mark.parametrize("case", [case for case in CASES if case not in CLI_RESUME])
def test_a_branch_from_a_kept_checkpoint_gives_the_same_losses_and_weights(runs, resumed, case, cache, tmp_path):
    """`resume: <the straight run's step-2 checkpoint>` into a new output directory; CLI_BRANCH through
    `sd35dist train` itself."""
    middle = CheckpointDir(runs / case / "out").path(BRANCH_STEP)
    if case == CLI_BRANCH:
        out, run_dir = tmp_path / "out", tmp_path / "run"
        proc = train(zero_recipe(tmp_path / "branch.yaml", cache, out, resume=str(middle), checkpointing_steps=2,
                                 **CASES[case]), run_dir)
        printed = proc.stdout + proc.stderr
    else:
        out, run_dir = resumed / case / "out", resumed / case / "run"
        printed = (resumed / "stdout" / case).read_text()
    assert f"resumed from {middle}" in printed
    assert_resumed_like_the_straight_run(runs, case, out, run_dir, BRANCH_STEP)


@pytest.mark.parametrize("case", CLI_RESUME)
def test_stop_and_resume_latest_gives_the_same_losses_and_weights(runs, resumed, case):
    """A run that stopped at step 3 (train.stop_at_step), then trained again with `resume: latest` (the
    default) in a fresh torchrun: the remaining losses and the final weights equal the straight run's."""
    expected = losses(runs / case / "run")
    stop_run = next(run for run in json.loads((runs / "outcomes.json").read_text())
                    if run["run_dir"] == str(runs / case / "stop"))
    assert "stopped at step 3 (train.stop_at_step)" in stop_run["stdout"], stop_run["stdout"][-2000:]
    assert losses(runs / case / "stop") == {s: expected[s] for s in (1, 2, 3)}
    assert CheckpointDir(runs / case / "stop-out").latest().name == CheckpointDir(runs / case / "stop-out").path(3).name
    assert f"resumed from {CheckpointDir(resumed / case / 'out').path(3)}" in (resumed / "stdout" / case).read_text()
    assert_resumed_like_the_straight_run(runs, case, resumed / case / "out", resumed / case / "run", 3)


def grad_norms(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics-rank00000.jsonl").read_text().splitlines()
    return {r["step"]: r["grad_norm"] for r in map(json.loads, lines)}


def final_state(output: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """What `sd35dist export` writes, in fp32, without the subprocess."""
    return checkpoint_state(CheckpointDir(output).latest(), use_ema)


# The COMPARABLE cases (fp32, torch AdamW) compare; bf16 rounds differently under FSDP2 and
# DeepSpeed, and the offload case runs DeepSpeed's CPU Adam.
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c].items() >= COMPARABLE.items()
                                  and "mixed_precision" not in CASES[c]])
def test_zero_trains_the_same_model_as_fsdp2(runs, case, tmp_path):
    root, reference = runs / case, runs / "fsdp2"
    assert losses(root / "run") == pytest.approx(losses(reference / "run"), rel=1e-6)
    assert grad_norms(root / "run") == pytest.approx(grad_norms(reference / "run"), rel=1e-5), "clipped alike"
    for use_ema in (False, True):
        ours, theirs = final_state(root / "out", use_ema), final_state(reference / "out", use_ema)
        assert ours.keys() == theirs.keys()
        assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-5) for k in theirs), "same weights (and EMA)"
    if case == "zero3":  # the CLI end to end once; ZeRO-2's checkpoint through the same command in this process
        exported = export(root / "out", tmp_path / "exported", "--ema")
    else:
        from diffusers import SD3Transformer2DModel

        assert sd35dist_main(["export", str(root / "out"), "--out", str(tmp_path / "exported"), "--dtype", "fp32",
                              "--ema"]) == 0
        exported = SD3Transformer2DModel.from_pretrained(tmp_path / "exported").state_dict()
    assert all(torch.equal(exported[k], ours[k]) for k in ours)


def test_resume_on_another_world_size_is_a_one_line_error(runs, cache, tmp_path):
    shutil.copytree(runs / "zero3" / "out", tmp_path / "out")
    recipe = zero_recipe(tmp_path / "r.yaml", cache, tmp_path / "out", max_train_steps=8, **CASES["zero3"])
    proc = subprocess.run([*WARM_TORCHRUN, "--standalone", "--nproc-per-node=1",
                           "-m", "sd35dist", "train", "--recipe", str(recipe), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=PROJECT, env=venv_env(OMP_NUM_THREADS="1"), timeout=600,
                          check=False)
    assert proc.returncode != 0
    assert "error: " in proc.stderr and "ZeRO checkpoint written by 2 ranks cannot resume on 1" in proc.stderr


def test_deepspeed_config_follows_the_recipe():
    def recipe(**train) -> Recipe:
        return Recipe.model_validate({"name": "t", "model": {"pretrained": "m"}, "data": {"cache_url": "c"},
                                      "parallel": {"strategy": "zero3"}, "train": train, "output": {"dir": "o"}})

    config = deepspeed_config(recipe(train_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=0.5), 8,
                              hidden_size=2432)
    assert config["train_batch_size"] == 64 and config["gradient_accumulation_steps"] == 4
    assert config["managed_gradient_accumulation"] is False, "the loop owns accumulation"
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True} and config["communication_data_type"] == "fp32"
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 24320
    with pytest.raises(ValueError, match="adamw_bf16 runs on strategy fsdp2 only; with zero3 use adamw"):
        recipe(optimizer="adamw_bf16")  # DeepSpeed's pure-bf16 mode drops small updates: refused
    fp32 = deepspeed_config(recipe(mixed_precision="fp32"), 1)
    assert fp32["bf16"] == {"enabled": False} and "communication_data_type" not in fp32
    assert "offload_optimizer" not in fp32["zero_optimization"], "offload only when the recipe asks"

    def offloaded(**parallel) -> dict:
        return Recipe.model_validate({"name": "t", "model": {"pretrained": "m"}, "data": {"cache_url": "c"},
                                      "parallel": {"strategy": "zero3", **parallel}, "output": {"dir": "o"}})

    zero = deepspeed_config(offloaded(offload_optimizer=True, offload_params=True), 2)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="offload_params needs strategy zero3"):
        Recipe.model_validate({"name": "t", "model": {"pretrained": "m"}, "data": {"cache_url": "c"},
                               "parallel": {"strategy": "zero2", "offload_params": True}, "output": {"dir": "o"}})


def test_zero3_validation_renders_on_all_ranks_and_leaves_training_unchanged(runs, cache):
    """ZeRO-3 gathers each block's weights in forward: every rank renders, placeholder round included
    (bf16; FSDP2's is in test_train.py, fp32): the runs fixture's validation-on run against its straight run."""
    from tests.validation_check import check_validation_run

    straight_losses = losses(runs / "zero3-bf16" / "run")
    checkpoint = CheckpointDir(runs / "validation" / "out").path(max(straight_losses))
    check_validation_run(runs / "validation" / "run", straight_losses, cache, {"model": read_weights(checkpoint)},
                         dtype=torch.bfloat16)


# Rides on the fp32 runs above: no training of its own.
@pytest.mark.parametrize("case", ["zero2", "zero3"])
def test_single_file_export_of_every_strategy_loads_in_diffusers_equal_to_the_checkpoint(runs, case, cache, tmp_path):
    from diffusers import SD3Transformer2DModel

    from sd35dist.checkpoint.inspect import diff
    from sd35dist.checkpoint.single_file import export_single_file

    model_dir, _ = cache
    outputs = {case: runs / case / "out"}
    if case == "zero3":
        outputs["fsdp2"] = runs / "fsdp2" / "out"
    for strategy, output in outputs.items():
        for use_ema in (False, True):
            out = tmp_path / f"{strategy}-{use_ema}.safetensors"
            if strategy == "zero3" and use_ema:  # the CLI end to end once; in process otherwise
                proc = subprocess.run([sys.executable, "-m", "sd35dist", "export", str(output), "--format",
                                       "single-file", "--out", str(out), "--dtype", "fp32", "--ema"],
                                      capture_output=True, text=True, cwd=PROJECT, env=venv_env())
                assert proc.returncode == 0, proc.stderr[-2000:]
            else:
                export_single_file(CheckpointDir(output).latest(), out, use_ema=use_ema, dtype="fp32")
            loaded = SD3Transformer2DModel.from_single_file(str(out), config=str(model_dir / "transformer"),
                                                            local_files_only=True, torch_dtype=torch.float32)
            want = final_state(output, use_ema)
            got = loaded.state_dict()
            assert got.keys() == want.keys(), strategy
            assert all(torch.equal(got[k], want[k]) for k in want), f"{strategy} ema={use_ema}: tensor for tensor"
        # `inspect --diff` reads the 2-rank sharded checkpoint in this one process: every block moved.
        changes = diff(output, model_dir)[0]
        assert all(c.relative > 0 for c in changes if c.group.startswith("joint block")), strategy


# Ride on the runs above: ZeRO-2 in bf16 and ZeRO-3 in fp32.
@pytest.mark.parametrize("case", ["zero2-bf16", "zero3"])
def test_zero_checkpoints_load_through_the_allow_list_and_get_umask_modes(runs, case):
    """Every pickle DeepSpeed wrote loads with torch.load(weights_only=True) and the three allow-listed
    classes (the resumes above went through the same loader), and every file of the checkpoint,
    the EMA's safetensors (0600 from safetensors' writer) included, has the user's umask modes."""
    from sd35dist.checkpoint.trusted_pickle import check_pickles, load_trusted
    from sd35dist.runtime.atomic_files import user_umask

    checkpoint = CheckpointDir(runs / case / "out").latest()
    files = sorted((checkpoint / "ds").glob("*.pt"))
    assert len(files) >= 3
    for path in files:
        state = load_trusted(path, map_location="cpu")
        assert isinstance(state, dict) and state.get("ds_version"), path
    check_pickles(checkpoint)
    wanted = 0o666 & ~user_umask()
    for path in checkpoint.rglob("*"):
        if path.is_file() and path.suffix != ".py":
            assert path.stat().st_mode & 0o777 == wanted, f"{path.name}: {oct(path.stat().st_mode & 0o777)}"


def test_a_crafted_zero_checkpoint_runs_no_code(runs, cache, tmp_path, capsys):
    """An optimizer-states file that names a callable: resume (train.resume), export, inspect and
    sample each refuse it in one line naming the file, exit 2, and the code never runs. Training and
    export as a user starts them (child processes); inspect and sample through the same CLI entry in
    this process (their loader is the one export's subprocess proves)."""
    case = "zero2-bf16"
    crafted = tmp_path / "crafted"
    shutil.copytree(CheckpointDir(runs / case / "out").latest(), crafted)
    target = sorted((crafted / "ds").glob("*optim_states.pt"))[0]
    sentinel = tmp_path / "code-ran"
    torch.save({"optimizer_state_dict": RunsCode(str(sentinel))}, target)
    recipe = zero_recipe(tmp_path / "r.yaml", cache, tmp_path / "out", resume=str(crafted), **CASES[case])
    line = train_refused(recipe, tmp_path / "run")
    assert f"{target}: refused: it names io.open" in line, line
    refusal = [f"error: {target}: refused: it names io.open, which no DeepSpeed checkpoint holds (a crafted or "
               "foreign file; loading it could run code)"]
    proc = subprocess.run([sys.executable, "-m", "sd35dist", "export", str(crafted), "--out", str(tmp_path / "export")],
                          capture_output=True, text=True, cwd=PROJECT, env=venv_env(), timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == refusal, proc.stderr[-2000:]
    for command in (["inspect", str(crafted)],
                    ["sample", str(crafted), "--prompt", "a fox", "--steps", "1", "--width", "64", "--height", "64",
                     "--out", str(tmp_path / "sample")]):
        capsys.readouterr()
        code = sd35dist_main(command)
        err = capsys.readouterr().err
        assert code == 2 and err.strip().splitlines() == refusal, (command, err[-2000:])
    assert not sentinel.exists(), "the pickle's code ran"
