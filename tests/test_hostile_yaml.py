"""YAML that would hang, crash or silently drop a value is refused: one line naming the file and the
YAML path, exit status 2, nothing written — for recipes, profiles, `--set` values and the recipe a
checkpoint holds (sd35dist/config/yaml_reader.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sd35dist.checkpoint.layout import CheckpointUnreadable, saved_recipe
from sd35dist.cli import main
from sd35dist.config.loading import ConfigError, load_mapping
from tests.cli_runs import PROJECT

LAUGHS = 'lol0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)
)
"""Ten lines, 10⁹ strings once expanded."""


def _recipe_text(tmp_path: Path) -> str:
    return yaml.safe_dump({
        "name": "t",
        "model": {"pretrained": str(tmp_path / "model")},
        "data": {"cache_url": str(tmp_path / "cache")},
        "output": {"dir": str(tmp_path / "out")},
    }, sort_keys=False)


def _profile_text(tmp_path: Path) -> str:
    return yaml.safe_dump({
        "scheduler": "slurm",
        "slurm": {"partition": "dev", "nodes": 1, "gpus_per_node": 0, "time": "00:10:00"},
        "run_root": str(tmp_path / "runs"),
    }, sort_keys=False)


# (what, which file, text appended to it, the error's start after "error: FILE: ")
CASES = {
    "billion-laughs": ("recipe", "x_laughs:\n" + "".join("  " + line for line in LAUGHS.splitlines(True)),
                       "x_laughs.lol5.0: the document expands to more than 100000 values"),
    "recursive-alias": ("recipe", "data_extra: &loop\n  again: *loop\n",
                        "data_extra.again: alias *loop is inside the value it names"),
    "recursive-list": ("profile", "setup_extra: &me [1, *me]\n", "setup_extra.1: alias *me is inside"),
    "deep-flow": ("recipe", "deep: " + "[" * 5000 + "]" * 5000 + "\n", "line "),
    "deep-block": ("profile", "deep:\n" + "".join("  " * i + f"- k{i}:\n" for i in range(1, 200)) + "\n",
                   "deep.0.k1.0.k2.0.k3.0.…: nested more than 64 levels deep"),
    "duplicate-key": ("recipe", "train:\n  learning_rate: 1.0e-4\n  max_train_steps: 10\n  learning_rate: 1.0\n",
                      "train.learning_rate: duplicate key (first on line"),
    "duplicate-top-key": ("profile", "run_root: /tmp/elsewhere\n", "run_root: duplicate key (first on line"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_yaml_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    which, extra, expected = CASES[case]
    recipe, profile = tmp_path / "myrecipe.yaml", tmp_path / "mycluster.yaml"
    recipe.write_text(_recipe_text(tmp_path) + (extra if which == "recipe" else ""))
    profile.write_text(_profile_text(tmp_path) + (extra if which == "profile" else ""))
    started = time.perf_counter()
    code = main(["submit", "--profile", str(profile), "--recipe", str(recipe), "--job", "preflight",
                 "--output", str(tmp_path / "job.sbatch")])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {recipe.name if which == 'recipe' else profile.name}: {expected}"), err
    assert elapsed < 1.0, f"refused after {elapsed:.2f}s"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "job.sbatch").exists()


@pytest.mark.unit
def test_billion_laughs_fails_well_under_a_second_alone(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than"):
        load_mapping(path)
    assert time.perf_counter() - started < 0.2


@pytest.mark.unit
def test_yaml_that_only_looks_close_is_accepted(tmp_path):
    """Anchors used a few times, merge keys overriding a merged value, moderate nesting."""
    path = tmp_path / "ok.yaml"
    path.write_text("base: &base {lr: 1.0e-4, steps: 10}\n"
                    "run:\n  <<: *base\n  steps: 20\n"
                    "copies: [*base, *base, *base]\n"
                    "nested: " + "[" * 30 + "1" + "]" * 30 + "\n")
    data = load_mapping(path)
    assert data["run"] == {"lr": 1e-4, "steps": 20}
    assert data["copies"] == [{"lr": 1e-4, "steps": 10}] * 3


@pytest.mark.parametrize(("override", "expected"), [
    ("train.lora={rank: 4, rank: 8}", "error: --set: train.lora.rank: duplicate key"),
    ("data.storage_options=" + "[" * 100 + "]" * 100, "error: --set: data.storage_options: brackets nested"),
])
@pytest.mark.unit
def test_hostile_override_is_one_line(tmp_path, capsys, override, expected):
    recipe, profile = tmp_path / "myrecipe.yaml", tmp_path / "mycluster.yaml"
    recipe.write_text(_recipe_text(tmp_path))
    profile.write_text(_profile_text(tmp_path))
    code = main(["submit", "--profile", str(profile), "--recipe", str(recipe), "--job", "preflight", "--dry-run",
                 "--set", override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(expected), err


@pytest.mark.unit
def test_checkpoint_recipe_is_read_with_the_same_limits(tmp_path):
    checkpoint = tmp_path / "step-00000002"
    checkpoint.mkdir()
    (checkpoint / "recipe.yaml").write_text(LAUGHS)
    with pytest.raises(CheckpointUnreadable, match="recipe.yaml: not a recipe sd35dist wrote .*expands to more than"):
        saved_recipe(checkpoint)
    (checkpoint / "recipe.yaml").write_text("name: a\nname: b\n")
    with pytest.raises(CheckpointUnreadable, match="duplicate key"):
        saved_recipe(checkpoint)


@pytest.mark.process
def test_console_script_refuses_recursive_yaml_without_a_traceback(tmp_path):
    recipe, profile = tmp_path / "myrecipe.yaml", tmp_path / "mycluster.yaml"
    recipe.write_text(_recipe_text(tmp_path) + "x: &x [*x]\n")
    profile.write_text(_profile_text(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "sd35dist", "submit", "--profile", str(profile), "--recipe",
                           str(recipe), "--dry-run"], capture_output=True, text=True, cwd=PROJECT, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: myrecipe.yaml: x.0: alias *x is inside the value it names"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
