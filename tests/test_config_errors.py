"""Bad input: one line naming file and YAML path, exit status 2, nothing written or submitted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.profile import slurm_time_minutes
from sd35dist.cli import main
from tests.conftest import PROJECT

pytestmark = pytest.mark.unit


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _profile(tmp_path: Path, **slurm) -> dict:
    return {
        "scheduler": "slurm",
        "slurm": {"partition": "dev", "nodes": 2, "gpus_per_node": 0, "time": "00:10:00", **slurm},
        "run_root": str(tmp_path / "runs"),
    }


def _recipe(tmp_path: Path, **parallel) -> dict:
    return {
        "name": "t",
        "model": {"pretrained": str(tmp_path / "model")},
        "data": {"cache_url": str(tmp_path / "cache")},
        "parallel": {"strategy": "fsdp2", **parallel},
        "output": {"dir": str(tmp_path / "out")},
    }


def _submit(tmp_path: Path, capsys, profile: dict, recipe: dict | None, *extra: str) -> tuple[int, str]:
    profile_file = _write(tmp_path / "mycluster.yaml", profile)
    argv = ["submit", "--profile", str(profile_file), "--job", "preflight", *extra]
    if recipe is not None:
        argv += ["--recipe", str(_write(tmp_path / "myrecipe.yaml", recipe))]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_rejected(tmp_path: Path, code: int, err: str, expected: str) -> None:
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    assert not (tmp_path / "runs").exists(), "a rejected submission must write nothing"


def test_unknown_key_names_file_and_path(tmp_path, capsys):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path, gpus_per_nod=8), _recipe(tmp_path))
    _assert_rejected(tmp_path, code, err, "mycluster.yaml: slurm.gpus_per_nod: unknown key")
    assert "gpus_per_node" in err  # the known keys are listed, so the typo is obvious


def test_unknown_recipe_key(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    recipe["train"] = {"learning_rat": 1e-4}
    code, err = _submit(tmp_path, capsys, _profile(tmp_path), recipe)
    _assert_rejected(tmp_path, code, err, "myrecipe.yaml: train.learning_rat: unknown key")


def test_wrong_type(tmp_path, capsys):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path, cpus_per_task="many"), _recipe(tmp_path))
    _assert_rejected(tmp_path, code, err, "mycluster.yaml: slurm.cpus_per_task: expected int")


@pytest.mark.parametrize("nodes", [0, -1])
def test_nodes_must_be_positive(tmp_path, capsys, nodes):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path, nodes=nodes), _recipe(tmp_path))
    _assert_rejected(tmp_path, code, err, "mycluster.yaml: slurm.nodes: must be ≥ 1")


def test_nodes_override_is_validated_too(tmp_path, capsys):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path), _recipe(tmp_path), "--set", "slurm.nodes=0")
    _assert_rejected(tmp_path, code, err, "slurm.nodes: must be ≥ 1")


@pytest.mark.parametrize("time", ["2 hours", "1:2:3:4", "12:99:00:00x", "0"])
def test_malformed_time(tmp_path, capsys, time):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path, time=time), _recipe(tmp_path))
    _assert_rejected(tmp_path, code, err, "mycluster.yaml: slurm.time:")


def test_unknown_profile_lists_available(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["submit", "--profile", "h100x16", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "h100x16" in err and "unknown profile" in err
    for name in ("local", "slurm-dev", "h100x8", "h100x8x4"):
        assert name in err


def test_missing_recipe_file(tmp_path, capsys):
    profile_file = _write(tmp_path / "mycluster.yaml", _profile(tmp_path))
    code = main(["submit", "--profile", str(profile_file), "--recipe", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nope.yaml" in err and "not found" in err
    assert not (tmp_path / "runs").exists()


def test_recipe_needing_more_gpus_than_profile(tmp_path, capsys):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path, gpus_per_node=8, nodes=1), _recipe(tmp_path, min_gpus=16))
    _assert_rejected(tmp_path, code, err, "myrecipe.yaml: parallel.min_gpus: recipe needs 16 GPUs")
    assert "has 8" in err


def test_shard_degree_must_divide_world(tmp_path, capsys):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path, nodes=3), _recipe(tmp_path, shard_degree=2))
    _assert_rejected(tmp_path, code, err, "myrecipe.yaml: parallel.shard_degree")


def test_unknown_override_key(tmp_path, capsys):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path), _recipe(tmp_path), "--set", "slurmm.nodes=2")
    _assert_rejected(tmp_path, code, err, "--set: slurmm: unknown key")


def test_secret_in_recipe_is_refused(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    recipe["data"]["storage_options"] = {"secret": "hunter2"}
    code, err = _submit(tmp_path, capsys, _profile(tmp_path), recipe)
    _assert_rejected(tmp_path, code, err, "myrecipe.yaml: data.storage_options:")
    assert "hunter2" not in err


def test_invalid_yaml(tmp_path, capsys):
    profile_file = tmp_path / "broken.yaml"
    profile_file.write_text("scheduler: slurm\nslurm: [unclosed\n")
    code = main(["submit", "--profile", str(profile_file), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: broken.yaml: line") and "invalid YAML" in err


def test_exit_status_is_2_from_the_console_script(tmp_path):
    """The real process, not just main()'s return value."""
    profile_file = _write(tmp_path / "mycluster.yaml", _profile(tmp_path, nodes=0))
    proc = subprocess.run(
        [sys.executable, "-m", "sd35dist", "submit", "--profile", str(profile_file), "--dry-run"],
        capture_output=True, text=True, cwd=PROJECT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: mycluster.yaml: slurm.nodes: must be ≥ 1, got 0"
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("30", 30), ("90:30", 91), ("2:00:00", 120), ("1-0", 1440), ("1-2:30", 1590), ("2-00:00:01", 2881)],
)
def test_slurm_time_forms(text, minutes):
    assert slurm_time_minutes(text) == minutes
