"""Rank-side mistakes end as one line, printed once, with exit status 2 — under torchrun too —
and loading a checkpoint or a job's result runs no pickled code."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd35dist.cli import main as cli_main
from sd35dist.config.loading import ConfigError
from sd35dist.data.manifest import read_manifest
from sd35dist.data.storage import Store
from sd35dist.jobs.rank_failure import report_before_group, report_failure, traceback_path
from sd35dist.jobs.torchrun import exit_status, failure_summary
from tests.cache_runs import write_inputs, write_recipe
from tests.cli_runs import PROJECT, venv_env
from tests.rank_runs import assert_one_quiet_line, torchrun
from tests.train_runs import train_recipe

# ---- train: a shard gone or changed, every rank stops, one line names it --------------------------


@pytest.mark.dist
def test_a_bad_shard_during_train_is_one_line_with_the_traceback_file(cache, tmp_path):
    """A shard the manifest lists is gone. (A corrupt one takes the same path: the fetcher raises
    ShardCorrupt where it raises ShardUnavailable here, both are in rank_failure.MISTAKES, and its message
    is tested in test_shard_fetcher and under torchrun on Slurm in test_slurm_lifecycle.)"""
    model, cache_dir = cache
    broken = tmp_path / "cache"
    shutil.copytree(cache_dir, broken)
    shard = broken / read_manifest(Store(str(broken))).shards[0].path
    shard.unlink()
    recipe = train_recipe(tmp_path / "r.yaml", (model, broken), tmp_path / "out", max_train_steps=4)
    proc = torchrun("train", recipe, tmp_path / "run")
    line = assert_one_quiet_line(proc)
    assert str(shard) in line and "shard missing" in line
    written = line.rsplit("(traceback: ", 1)[1].rstrip(")")
    assert Path(written).parent == tmp_path / "run" / "logs" and "Traceback" in Path(written).read_text()
    assert "sd35dist: stopped: rank" in proc.stderr.splitlines()[-1], "the agent sums up in one line"


@pytest.mark.dist
def test_model_pretrained_pointing_nowhere_is_one_line_from_rank_zero(cache, tmp_path):
    model, cache_dir = cache
    recipe = train_recipe(tmp_path / "r.yaml", (tmp_path / "nowhere", cache_dir), tmp_path / "out")
    line = assert_one_quiet_line(torchrun("train", recipe, tmp_path / "run"))
    assert line == (f"error: r.yaml: model.pretrained: {tmp_path / 'nowhere'} does not exist; expected a local "
                    "diffusers directory with SD3.5 Large's layout")
    assert not (tmp_path / "out").exists()


@pytest.mark.dist
def test_cache_with_a_missing_dataset_source_names_the_key(tiny_model, tmp_path):
    inputs = write_inputs(tmp_path / "images")
    shutil.rmtree(inputs["exact"])
    recipe = write_recipe(tmp_path / "c.yaml", tiny_model, inputs, str(tmp_path / "cache"))
    line = assert_one_quiet_line(torchrun("cache", recipe, nproc=2))
    assert line == f"error: c.yaml: data.datasets[1].source: {inputs['exact']} is not a directory (dataset exact)"
    assert not (tmp_path / "cache").exists(), "nothing written"


# ---- export: one line, nothing written, no pickled code run --------------------------------------


def export(capsys, *argv: str) -> tuple[int, str]:
    code = cli_main(["export", *argv])
    return code, capsys.readouterr().err


def _checkpoint_without_weights(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "COMPLETE").write_text(json.dumps({"step": 8, "world_size": 2, "strategy": "fsdp2"}))
    (path / "transformer_config.json").write_text("{}")
    return path


@pytest.mark.unit
def test_export_of_a_checkpoint_without_dcp_or_of_no_checkpoint_is_one_line(capsys, tmp_path):
    checkpoint = _checkpoint_without_weights(tmp_path / "step-00000008")
    out = tmp_path / "exported"
    code, err = export(capsys, str(checkpoint), "--out", str(out))
    assert code == 2 and err == (f"error: {checkpoint}: no dcp/.metadata: the checkpoint's weights are missing "
                                 "(copied without its dcp/ directory?)\n")
    code, err = export(capsys, str(tmp_path), "--out", str(out))
    assert code == 2 and err.startswith(f"error: {tmp_path}: neither a complete checkpoint") and err.count("\n") == 1
    code, err = export(capsys, str(tmp_path / "nope"), "--out", str(out))
    assert code == 2 and err == f"error: {tmp_path / 'nope'}: no such directory\n"
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["step-00000008"]


class _Payload:
    """What a crafted `.metadata` would hold: unpickling it writes a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.unit
def test_export_refuses_a_crafted_metadata_without_running_it(capsys, tmp_path):
    checkpoint = _checkpoint_without_weights(tmp_path / "step-00000008")
    marker = tmp_path / "code-ran"
    (checkpoint / "dcp").mkdir()
    (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    code, err = export(capsys, str(checkpoint), "--out", str(tmp_path / "exported"))
    assert not marker.exists(), "the pickle's code did not run"
    assert code == 2 and "refusing builtins.exec" in err and err.count("\n") == 1
    assert not (tmp_path / "exported").exists()


@pytest.mark.unit
def test_a_job_result_file_is_read_as_plain_data_only(tmp_path):
    from launcher.job_control import local_state

    record = {"job_id": "4194000", "scheduler": "local", "submitit_folder": str(tmp_path)}
    result = tmp_path / "4194000_0_result.pkl"
    result.write_bytes(pickle.dumps(("success", 0)))
    assert local_state(record) == "COMPLETED"
    result.write_bytes(pickle.dumps(("error", "Traceback …")))
    assert local_state(record) == "FAILED"
    marker = tmp_path / "code-ran"
    result.write_bytes(pickle.dumps(("success", _Payload(marker))))
    assert local_state(record) == "UNKNOWN" and not marker.exists()


# ---- the pieces ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_report_failure_prints_a_mistake_once_and_re_raises_a_bug(tmp_path):
    out = io.StringIO()
    mistake = ConfigError("recipe.yaml", "train.resume", "no such checkpoint")
    assert report_failure(mistake, 0, tmp_path, out) == 2
    assert out.getvalue() == "error: recipe.yaml: train.resume: no such checkpoint\n"
    assert not traceback_path(tmp_path, 0).exists(), "a recipe mistake needs no traceback"
    with pytest.raises(ZeroDivisionError):
        try:
            raise ZeroDivisionError("a bug")
        except ZeroDivisionError as bug:
            report_failure(bug, 0, tmp_path, io.StringIO())
    late = io.StringIO()
    started = time.monotonic()
    assert report_before_group(mistake, 1, late, wait_for_rank0_s=0.2) == 2
    assert time.monotonic() - started >= 0.2, "rank 1 first gives rank 0 the time to speak for all"
    assert late.getvalue() == "error: recipe.yaml: train.resume: no such checkpoint\n", "…then speaks if still alive"


@pytest.mark.dist
def test_a_mistake_before_the_group_is_one_line_even_when_rank_zero_is_the_slowest(tmp_path):
    """torchrun stops the group at the first rank that exits: rank 1 must not end it before rank 0 has printed."""
    script = tmp_path / "slow_rank0.py"
    script.write_text(
        "import os, sys, time\n"
        "from sd35dist.config.loading import ConfigError\n"
        "from sd35dist.jobs.rank_failure import rank_from_env, report_before_group\n"
        "rank = rank_from_env()\n"
        "time.sleep(3 if rank == 0 else 0)  # rank 0 loads slower, as it does on a busy node\n"
        "sys.exit(report_before_group(ConfigError('r.yaml', 'model.pretrained', 'gone'), rank))\n")
    proc = subprocess.run([sys.executable, "-m", "sd35dist", "torchrun", "--standalone", "--nproc-per-node=2",
                           str(script)], capture_output=True, text=True, cwd=PROJECT,
                          env=venv_env(OMP_NUM_THREADS="1"), timeout=120)
    assert assert_one_quiet_line(proc) == "error: r.yaml: model.pretrained: gone"


@pytest.mark.unit
def test_the_agent_summary_and_exit_status():
    assert failure_summary(1, "node7", 2) == "sd35dist: stopped: rank 1 on node7 exited with status 2"
    assert failure_summary(0, "node7", -9) == "sd35dist: stopped: rank 0 on node7 was killed by signal 9"
    assert (exit_status(2), exit_status(-15), exit_status(0)) == (2, 143, 1)

