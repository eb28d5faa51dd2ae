"""`sd35dist train` on the tiny SD3 with 2 CPU ranks (gloo): exact resume, rotation, resharding.

Each torchrun launch costs ~15 s of CPU (imports, set-up, teardown) against ~4 s of training, so one run
serves several tests: the module's straight run is the reference the others compare with, and it also
writes its checkpoints in the background and renders validation rounds (proved to change nothing by the
crash/resume chain, which runs the same recipe without either); the branch test resumes the straight
run's checkpoints on 2, then 1, then 2 ranks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sd35dist.checkpoint.export import checkpoint_state
from sd35dist.checkpoint.layout import CheckpointDir, read_info
from sd35dist.checkpoint.manager import resume_checkpoint
from sd35dist.checkpoint.weights import read_weights
from sd35dist.cli import main as sd35dist_main
from sd35dist.config.loading import ConfigError
from sd35dist.jobs.rank_inputs import load_rank_recipe
from tests.cli_runs import PROJECT, one_torch_thread, venv_env
from tests.rank_runs import WARM_TORCHRUN
from tests.train_runs import (
    RunsCode,
    export,
    learning_rates,
    losses,
    train,
    train_in_one_group,
    train_recipe,
    train_refused,
)

pytestmark = pytest.mark.dist


FP32 = {"checkpointing_steps": 2, "lr_scheduler": "cosine"}
"""The fp32 recipe of this module's reference run and of the runs compared with it: 6 steps, EMA on,
a checkpoint every 2 steps (the newest two kept: 4, 6), a learning rate that changes every step."""


BF16 = {"optimizer": "adamw_bf16", "mixed_precision": "bf16", "max_train_steps": 3, "checkpointing_steps": 2,
        "lr_scheduler": "cosine"}
"""test_bf16_adamw_bf16_validation_and_stop_and_resume's recipe: three steps, bf16 AdamW, a cosine schedule."""


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory, cache) -> tuple[Path, dict[Path, str]]:
    """The runs that need no earlier one, in one torchrun (tests/trainings_check.py): the fp32 reference run
    (root/straight: out, run) and the bf16 test's straight run (root/bf16/run0, validation on) and first
    submission (root/bf16/run1, train.stop_at_step 1 into root/bf16/out). Returns root and what rank 0
    printed per run directory."""
    from tests.validation_check import cache_validation_prompts, with_validation

    root = tmp_path_factory.mktemp("first-runs")
    (root / "straight").mkdir()
    (root / "bf16").mkdir()
    recipe = train_recipe(root / "straight" / "r.yaml", cache, root / "straight" / "out", **FP32,
                          async_checkpointing=True)
    cache_validation_prompts(recipe)
    bf16_straight = train_recipe(root / "bf16" / "straight.yaml", cache, root / "bf16" / "straight", **BF16)
    cache_validation_prompts(bf16_straight)
    printed = train_in_one_group(
        (with_validation(recipe, weights="both"), root / "straight" / "run"),
        (with_validation(bf16_straight), root / "bf16" / "run0"),
        (train_recipe(root / "bf16" / "first.yaml", cache, root / "bf16" / "out", **BF16, stop_at_step=1),
         root / "bf16" / "run1"))
    return root, printed


@pytest.fixture(scope="module")
def straight(first_runs) -> tuple[Path, dict[int, float]]:
    """The module's uninterrupted reference run (2 ranks, fp32): root/out, root/run and its per-step losses.
    It writes its checkpoints in the background (train.async_checkpointing) and renders validation rounds
    (3 (prompt, seed) pairs on 2 ranks, model and EMA side by side); the `chain` below runs the same
    recipe with both off, so comparing the two proves that neither changes training."""
    root = first_runs[0] / "straight"
    return root, losses(root / "run")


@dataclass(frozen=True)
class Chain:
    """The straight recipe without validation, checkpoints written synchronously after every step (the newest
    three kept), as two submissions: one rank of the first (root/run1) is killed (SIGKILL) while the checkpoint
    of step 3 or later is being written (`killed`, its .partial directory); `resume: latest` continues
    the same output dir (root/out) from `latest_after_kill` to step 6 (root/run2, its output in `resumed_output`)."""

    root: Path
    killed: Path
    latest_after_kill: Path | None
    latest_was_complete: bool
    first_exit: int
    resumed_output: str


def kill_a_rank_while_a_checkpoint_is_written(recipe: Path, out: Path, run_dir: Path) -> tuple[Path, int]:
    """Start 2 ranks on `recipe` and kill -9 one of them while the checkpoint of step 3 or later is being
    written; returns that checkpoint's .partial directory and torchrun's exit status. A kill that lands after
    the checkpoint was published is tried again from scratch (at most 3 times)."""
    import os
    import signal
    import time

    from tests.rank_runs import rank_processes

    for _attempt in range(3):
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        killed_at = None
        proc = subprocess.Popen(
            [*WARM_TORCHRUN, "--standalone", "--nproc-per-node=2",
             "-m", "sd35dist", "train", "--recipe", str(recipe), "--run-dir", str(run_dir)],
            cwd=PROJECT, env=venv_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            partial = sorted((out / "checkpoints").glob("step-*.partial")) if (out / "checkpoints").is_dir() else []
            if partial and int(partial[-1].name[5:13]) >= 3:
                os.kill(rank_processes(proc.pid)[-1], signal.SIGKILL)
                killed_at = partial[-1]
                break
            time.sleep(0.002)
        proc.wait(timeout=120)
        if killed_at is not None and killed_at.exists():
            return killed_at, proc.returncode  # the kill landed while that checkpoint was being written
    raise AssertionError("could not kill a rank while a checkpoint was being written")


@pytest.fixture(scope="module")
def chain(tmp_path_factory, cache) -> Chain:
    root = tmp_path_factory.mktemp("chain")
    recipe = train_recipe(root / "r.yaml", cache, root / "out", **{**FP32, "checkpointing_steps": 1},
                          checkpoints_total_limit=3)
    killed, first_exit = kill_a_rank_while_a_checkpoint_is_written(recipe, root / "out", root / "run1")
    latest = CheckpointDir(root / "out").latest()
    latest_was_complete = latest is not None and (latest / "COMPLETE").is_file()
    resumed = train(recipe, root / "run2")
    return Chain(root, killed, latest, latest_was_complete, first_exit, resumed.stdout + resumed.stderr)


def chain_losses(chain: Chain) -> dict[int, float]:
    return {**losses(chain.root / "run1"), **losses(chain.root / "run2")}


def assert_same_weights_and_ema(checkpoint: Path, reference: Path) -> None:
    for use_ema in (False, True):
        got, expected = checkpoint_state(checkpoint, use_ema), checkpoint_state(reference, use_ema)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), f"final weights equal (EMA: {use_ema})"


def test_straight_run_trains_and_rotates_checkpoints(straight):
    root, got = straight
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert all(value == value and value > 0 for value in got.values())
    ckpts = CheckpointDir(root / "out")
    assert ckpts.complete_steps() == [4, 6], "checkpoints_total_limit 2 keeps the newest two"
    assert ckpts.latest().name == "step-00000006"
    metrics = [json.loads(line) for line in (root / "run" / "metrics-rank00001.jsonl").read_text().splitlines()]
    assert {"step_seconds", "data_wait_fraction", "images_per_second"} <= set(metrics[0])


def test_kill_during_checkpoint_write_keeps_latest_on_a_complete_checkpoint(chain):
    """kill -9 of one rank while a checkpoint is being written: `latest` still names a complete
    checkpoint, the half-written one is never published, and resume finishes the run."""
    assert chain.first_exit != 0
    assert chain.latest_after_kill is not None and chain.latest_was_complete
    assert chain.latest_after_kill.name < chain.killed.name[: -len(".partial")], "the interrupted checkpoint is not published"
    assert f"resumed from {chain.latest_after_kill}" in chain.resumed_output
    ckpts = CheckpointDir(chain.root / "out")
    assert ckpts.latest().name == "step-00000006" and ckpts.complete_steps() == [4, 5, 6]
    assert not list(ckpts.root.glob("*.partial")), "rotation cleared the stale partial checkpoint"


def test_resume_after_a_crash_gives_the_same_losses_and_weights(straight, chain):
    """The chain's two submissions, next to the uninterrupted run: every step's loss and the final weights and
    EMA equal, bit for bit (CPU/gloo resume is exact). The true `stop_at_step` → `resume: latest` submission
    pair is the bf16 test's."""
    root, expected = straight
    first, second = losses(chain.root / "run1"), losses(chain.root / "run2")
    resumed_at = int(chain.latest_after_kill.name[5:13])
    assert sorted(second) == list(range(resumed_at + 1, 7)) and min(first) == 1 and max(first) >= resumed_at
    assert first == {s: expected[s] for s in first} and second == {s: expected[s] for s in second}
    assert_same_weights_and_ema(CheckpointDir(chain.root / "out").path(6), CheckpointDir(root / "out").path(6))


def test_async_checkpointing_publishes_the_same_checkpoints(straight, chain):
    """The straight run wrote in the background: the same checkpoints, bit for bit, as the chain's synchronous
    saves, none left half-written; the branch test resumes one of them exactly."""
    root, expected = straight
    assert chain_losses(chain) == expected, "writing in the background changes nothing in training"
    ckpts = CheckpointDir(root / "out")
    assert ckpts.complete_steps() == [4, 6] and not list(ckpts.root.glob("*.partial"))
    assert_same_weights_and_ema(ckpts.path(6), CheckpointDir(chain.root / "out").path(6))


def test_validation_renders_on_all_ranks_and_leaves_training_unchanged(straight, chain, cache):
    """3 (prompt, seed) pairs on 2 ranks, model and EMA weights side by side; the same losses as the chain,
    which ran without validation."""
    from tests.validation_check import check_validation_run

    root, _ = straight
    checkpoint = CheckpointDir(root / "out").path(6)
    states = {"model": read_weights(checkpoint), "ema": read_weights(checkpoint, use_ema=True)}
    check_validation_run(root / "run", chain_losses(chain), cache, states)


def test_export_writes_a_loadable_transformer_from_raw_and_ema_weights(straight, cache, tmp_path, capsys):
    """Through the CLI once (a child process, as typed); the EMA export and the refusal in this process."""
    from diffusers import SD3Transformer2DModel

    root, _ = straight
    model_dir, _ = cache
    raw = export(root / "out", tmp_path / "raw")
    assert sd35dist_main(["export", str(CheckpointDir(root / "out").path(6)), "--out", str(tmp_path / "ema"),
                          "--dtype", "fp32", "--ema"]) == 0
    ema = SD3Transformer2DModel.from_pretrained(tmp_path / "ema").state_dict()
    pretrained = SD3Transformer2DModel.from_pretrained(model_dir / "transformer").state_dict()
    key = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(raw[key], pretrained[key]), "training changed the weights"
    assert not torch.equal(ema[key], raw[key]), "the EMA is its own set of weights"
    assert torch.equal(ema["pos_embed.pos_embed"], raw["pos_embed.pos_embed"])
    from sd35dist.runtime.atomic_files import user_umask

    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "raw").iterdir()}
    assert set(modes.values()) == {0o666 & ~user_umask()}, f"others can read the export (not 0600): {modes}"
    capsys.readouterr()
    assert sd35dist_main(["export", str(root / "out"), "--out", str(tmp_path / "raw")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bf16_adamw_bf16_validation_and_stop_and_resume(first_runs, cache, tmp_path):
    """bf16 compute with Kahan-summed bf16 AdamW (torch-optimi), three runs of 3 steps. A straight run renders
    validation rounds on 2 ranks (at the start and at step 3); the images match a 1-process bf16 render of its
    last checkpoint. The same recipe without validation as two submissions (train.stop_at_step 1, off the
    checkpoint interval, then `resume: latest` in `sd35dist train` itself) gives the straight run's losses,
    learning rates and final weights (and EMA) bit for bit: the rounds change nothing in training,
    stop_at_step keeps the schedule, and the optimizer's moments, compensation buffers and step counter go
    through the checkpoint."""
    from tests.validation_check import check_validation_run

    root, printed = first_runs
    runs = root / "bf16"
    expected, expected_lr = losses(runs / "run0"), learning_rates(runs / "run0")
    out = tmp_path / "out"
    shutil.copytree(runs / "out", out)
    assert "stopped at step 1 (train.stop_at_step), saved; the schedule runs to step 3" in printed[runs / "run1"]
    assert CheckpointDir(out).complete_steps() == [1]
    assert learning_rates(runs / "run1") == {1: expected_lr[1]}, "stop_at_step keeps the schedule's horizon"
    second = train(train_recipe(tmp_path / "second.yaml", cache, out, **BF16), tmp_path / "run2")
    assert f"resumed from {CheckpointDir(out).path(1)}" in second.stdout + second.stderr
    chain = {**losses(runs / "run1"), **losses(tmp_path / "run2")}
    assert sorted(losses(tmp_path / "run2")) == [2, 3] and chain == expected, "exact resume, validation changes nothing"
    assert learning_rates(tmp_path / "run2") == {s: expected_lr[s] for s in (2, 3)}
    straight_final = CheckpointDir(runs / "straight").latest()
    assert straight_final.name == "step-00000003"
    assert_same_weights_and_ema(CheckpointDir(out).latest(), straight_final)
    check_validation_run(runs / "run0", chain, cache, {"model": read_weights(straight_final)}, dtype=torch.bfloat16)


def test_sweep_and_sample_render_the_kept_checkpoints(straight, cache, tmp_path):
    """`sd35dist sweep --compare-guidance` over the straight run's checkpoints, on 2 ranks as in one process;
    `sd35dist sample` of a checkpoint equals the sample of its export, pixel for pixel."""
    import numpy as np
    from PIL import Image

    from sd35dist.checkpoint.export import export_checkpoint
    from tests.validation_check import PROMPTS, cache_validation_prompts

    root, _ = straight
    recipe = train_recipe(tmp_path / "r.yaml", cache, tmp_path / "unused")
    cache_validation_prompts(recipe)
    out = root / "out"
    sweep = ["sweep", str(out), "--compare-guidance", "--recipe", str(recipe)]
    with one_torch_thread():  # as the ranks below run
        assert sd35dist_main([*sweep, "--out", str(tmp_path / "sweep")]) == 0
    # The same sweep on 2 ranks (3 images per step and kind: one placeholder round) gives the same pixels.
    proc = subprocess.run([*WARM_TORCHRUN, "--standalone", "--nproc-per-node=2",
                           "-m", "sd35dist", *sweep, "--out", str(tmp_path / "sweep2")], capture_output=True, text=True,
                          cwd=PROJECT, env={**venv_env(), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in (tmp_path / "sweep").glob("step*.png"):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "sweep2" / path.name))), path
    grid = Image.open(tmp_path / "sweep" / "grid.png")
    assert grid.width > 4 * 32 and grid.height > len(PROMPTS) * 32  # steps 4, 6 x cfg, apg; one row per prompt
    image = {(s, k): np.asarray(Image.open(tmp_path / "sweep" / f"step{s}-{k}-p00-seed5-32x32.png"))
             for s in (4, 6) for k in ("cfg", "apg")}
    assert not np.array_equal(image[4, "cfg"], image[6, "cfg"])  # the steps differ
    assert not np.array_equal(image[6, "cfg"], image[6, "apg"])  # and so do the guidance kinds
    assert sd35dist_main(["sweep", str(out), "--steps", "5", "--recipe", str(recipe)]) == 2  # no such checkpoint

    checkpoint = out / "checkpoints" / "step-00000006"
    export_checkpoint(checkpoint, tmp_path / "export", dtype="fp32")
    common = ["--prompt", "a red fox", "--seed", "1", "--seed", "2", "--steps", "3", "--width", "32", "--height", "32",
              "--max-sequence-length", "32"]
    samples = {}
    # In this process: `sample` splits its images over ranks with the sweep's code (sample_command.renderer_for,
    # render.launched_ranks), which the 2-rank sweep above proves pixel for pixel.
    for name, source in (("ckpt", [str(checkpoint)]), ("export", [str(tmp_path / "export"), "--model", str(cache[0])]),
                         ("ema", [str(checkpoint), "--ema"]), ("base", [str(cache[0])])):
        assert sd35dist_main(["sample", *source, *common, "--out", str(tmp_path / name)]) == 0
        samples[name] = np.asarray(Image.open(tmp_path / name / "sample-p00-seed1-32x32.png"))
        assert (tmp_path / name / "sample-p00-seed2-32x32.png").is_file() and (tmp_path / name / "grid.png").is_file()
    assert np.array_equal(samples["ckpt"], samples["export"])
    assert not np.array_equal(samples["ckpt"], samples["ema"]) and not np.array_equal(samples["ckpt"], samples["base"])
    assert sd35dist_main(["sample", str(tmp_path / "export"), *common, "--out", str(tmp_path / "x")]) == 2  # needs --model


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resuming_an_older_checkpoint_branches_only_into_a_new_directory(straight, cache, tmp_path):
    """train.resume naming step 4 of an output dir whose newest is step 6: refused there (nothing
    overwritten or rotated away), trained into a new output.dir exactly as the straight run did (from its
    checkpoint written in the background), and a restart of that same run continues its branch instead of
    starting over from step 4 — here on 1 rank (DCP reshards the 2-rank checkpoint), then back on 2."""
    root, expected = straight
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    before = _tree(out)
    four = CheckpointDir(out).path(4)
    # The check every rank makes first thing (before the stream, the model or a save); a refusal of it ends the
    # ranks as one line, exit status 2, no restart: the crafted-metadata test below runs that through torchrun.
    same = load_rank_recipe(train_recipe(tmp_path / "same.yaml", cache, out, resume=str(four)))
    with pytest.raises(ConfigError) as refused:
        resume_checkpoint(same, "same.yaml", tmp_path / "run0")
    line = str(refused.value)
    assert line.startswith("same.yaml: train.resume: ") and "would overwrite step-00000006" in line, line
    assert "new directory" in line and "\n" not in line, line
    assert _tree(out) == before, "the newer branch and the named checkpoint are untouched"

    branch, run = tmp_path / "branch", tmp_path / "run1"
    ckpts = CheckpointDir(branch)
    train(train_recipe(tmp_path / "branch.yaml", cache, branch, **FP32, resume=str(four)), run)
    assert losses(run) == {5: expected[5], 6: expected[6]}, "the branch trains on exactly"
    assert ckpts.complete_steps() == [6] and _tree(out) == before
    # The same run restarted (torchrun restart, Slurm requeue), on one rank and with two more steps to go.
    again = train(train_recipe(tmp_path / "branch.yaml", cache, branch, **FP32, resume=str(four), max_train_steps=8),
                  run, nproc=1)
    assert f"resumed from {ckpts.path(6)}" in again.stdout + again.stderr
    assert sorted(losses(run)) == [5, 6, 7, 8] and all(v == v for v in losses(run).values())
    assert read_info(ckpts.latest())["world_size"] == 1 and ckpts.latest() == ckpts.path(8)
    back = train(train_recipe(tmp_path / "branch.yaml", cache, branch, **FP32, resume=str(four), max_train_steps=10),
                 run)  # and back to 2 ranks
    assert f"resumed from {ckpts.path(8)}" in back.stdout + back.stderr
    assert sorted(losses(run)) == [5, 6, 7, 8, 9, 10]
    assert read_info(ckpts.latest())["world_size"] == 2 and ckpts.latest() == ckpts.path(10)
    assert _tree(out) == before


def test_a_crafted_dcp_metadata_given_as_resume_is_refused_without_running(straight, cache, tmp_path, capsys):
    """DCP's .metadata is a pickle; one that names a callable is refused once, at start (exit 2: no
    restart), and its code never runs — the same allow-list export uses."""
    import pickle

    root, _ = straight
    crafted = tmp_path / "crafted"
    shutil.copytree(CheckpointDir(root / "out").path(6), crafted)
    sentinel = tmp_path / "code-ran"
    (crafted / "dcp" / ".metadata").write_bytes(pickle.dumps(RunsCode(str(sentinel))))
    line = train_refused(train_recipe(tmp_path / "r.yaml", cache, tmp_path / "out", resume=str(crafted)),
                         tmp_path / "run")
    assert ".metadata: refused" in line and "io.open" in line, line
    assert not (tmp_path / "out").exists(), "refused before anything was written"
    capsys.readouterr()
    assert sd35dist_main(["export", str(crafted), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and ".metadata" in err
    assert not sentinel.exists(), "the pickle's code ran"
