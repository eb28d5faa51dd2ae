"""Bad input: one line naming file and YAML path, exit status 2, nothing written or submitted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.profile import load_profile, slurm_time_minutes
from sd35dist.cli import main
from sd35dist.config import load_recipe, parse_override
from tests.cli_runs import PROJECT


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
        "data": {"cache_url": str(tmp_path / "cache"), "datasets": [{"id": "images", "source": str(tmp_path / "images")}]},
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


@pytest.mark.unit
def test_unknown_key_names_file_and_path(tmp_path, capsys):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path, gpus_per_nod=8), _recipe(tmp_path))
    _assert_rejected(tmp_path, code, err, "mycluster.yaml: slurm.gpus_per_nod: unknown key")
    assert "gpus_per_node" in err  # the known keys are listed, so the typo is obvious


@pytest.mark.unit
def test_unknown_recipe_key(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    recipe["train"] = {"learning_rat": 1e-4}
    code, err = _submit(tmp_path, capsys, _profile(tmp_path), recipe)
    _assert_rejected(tmp_path, code, err, "myrecipe.yaml: train.learning_rat: unknown key")


@pytest.mark.unit
def test_wrong_type(tmp_path, capsys):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path, cpus_per_task="many"), _recipe(tmp_path))
    _assert_rejected(tmp_path, code, err, "mycluster.yaml: slurm.cpus_per_task: expected int")


@pytest.mark.unit
def test_quoted_number_is_refused_not_coerced(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    recipe["train"] = {"train_batch_size": "3"}
    code, err = _submit(tmp_path, capsys, _profile(tmp_path), recipe)
    _assert_rejected(tmp_path, code, err, "myrecipe.yaml: train.train_batch_size: expected int, got '3'")
    assert "drop the quotes" in err


@pytest.mark.parametrize(("section", "key", "value", "expected"), [
    ("launch", "max_restarts", 2.0, "mycluster.yaml: launch.max_restarts: expected int, got 2.0"),
    ("slurm", "exclusive", "true", "mycluster.yaml: slurm.exclusive: expected bool, got 'true'"),
    ("slurm", "requeue", 1, "mycluster.yaml: slurm.requeue: expected bool, got 1"),
])
@pytest.mark.unit
def test_no_silent_conversions(tmp_path, capsys, section, key, value, expected):
    profile = _profile(tmp_path)
    profile.setdefault(section, {})[key] = value
    code, err = _submit(tmp_path, capsys, profile, _recipe(tmp_path))
    _assert_rejected(tmp_path, code, err, expected)


@pytest.mark.unit
def test_yaml_numbers_are_accepted_as_users_write_them(tmp_path, capsys):
    recipe_file = _write(tmp_path / "myrecipe.yaml", _recipe(tmp_path))
    recipe_file.write_text(recipe_file.read_text() + "train:\n  learning_rate: 1\n  adam_epsilon: 1e-6\n"
                           "  train_batch_size: 3\n")
    recipe = load_recipe(recipe_file)
    assert (recipe.train.learning_rate, recipe.train.adam_epsilon, recipe.train.train_batch_size) == (1.0, 1e-6, 3)
    assert isinstance(recipe.train.learning_rate, float)
    overridden = load_recipe(recipe_file, [parse_override("train.learning_rate=1e-5"),
                                           parse_override("train.train_batch_size=4"),
                                           parse_override("data.buckets=[[64, 64], [80, 48]]")])
    assert (overridden.train.learning_rate, overridden.train.train_batch_size) == (1e-5, 4)
    assert overridden.data.buckets == [(64, 64), (80, 48)]
    code, _ = _submit(tmp_path, capsys, _profile(tmp_path), None, "--recipe", str(recipe_file), "--dry-run",
                      "--set", "train.learning_rate=2e-5")
    assert code == 0


@pytest.mark.parametrize("path", sorted((PROJECT / "recipes").glob("*.yaml")) + sorted((PROJECT / "cluster_configs").glob("*.yaml")),
                         ids=lambda p: p.name)
@pytest.mark.unit
def test_shipped_recipes_and_profiles_load(path):
    if path.parent.name == "recipes":
        assert load_recipe(path).data.buckets
    else:
        assert load_profile(path).world_size >= 1


@pytest.mark.unit
@pytest.mark.parametrize("nodes", [0, -1])
def test_nodes_must_be_positive(tmp_path, capsys, nodes):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path, nodes=nodes), _recipe(tmp_path))
    _assert_rejected(tmp_path, code, err, "mycluster.yaml: slurm.nodes: must be ≥ 1")


@pytest.mark.unit
def test_nodes_override_is_validated_too(tmp_path, capsys):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path), _recipe(tmp_path), "--set", "slurm.nodes=0")
    _assert_rejected(tmp_path, code, err, "slurm.nodes: must be ≥ 1")


@pytest.mark.unit
@pytest.mark.parametrize("time", ["2 hours", "1:2:3:4", "12:99:00:00x", "0"])
def test_malformed_time(tmp_path, capsys, time):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path, time=time), _recipe(tmp_path))
    _assert_rejected(tmp_path, code, err, "mycluster.yaml: slurm.time:")


@pytest.mark.unit
def test_unknown_profile_lists_available(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["submit", "--profile", "h100x16", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "h100x16" in err and "unknown profile" in err
    for name in ("local", "slurm-dev", "h100x8", "h100x8x4"):
        assert name in err


@pytest.mark.unit
def test_missing_recipe_file(tmp_path, capsys):
    profile_file = _write(tmp_path / "mycluster.yaml", _profile(tmp_path))
    code = main(["submit", "--profile", str(profile_file), "--recipe", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nope.yaml" in err and "not found" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.unit
def test_recipe_needing_more_gpus_than_profile(tmp_path, capsys):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path, gpus_per_node=8, nodes=1), _recipe(tmp_path, min_gpus=16))
    _assert_rejected(tmp_path, code, err, "myrecipe.yaml: parallel.min_gpus: recipe needs 16 GPUs")
    assert "has 8" in err


@pytest.mark.unit
def test_shard_degree_must_divide_world(tmp_path, capsys):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path, nodes=3), _recipe(tmp_path, shard_degree=2))
    _assert_rejected(tmp_path, code, err, "myrecipe.yaml: parallel.shard_degree")


@pytest.mark.unit
def test_unknown_override_key(tmp_path, capsys):
    code, err = _submit(tmp_path, capsys, _profile(tmp_path), _recipe(tmp_path), "--set", "slurmm.nodes=2")
    _assert_rejected(tmp_path, code, err, "--set: slurmm: unknown key")


@pytest.mark.unit
def test_secret_in_recipe_is_refused(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    recipe["data"]["storage_options"] = {"secret": "hunter2"}
    code, err = _submit(tmp_path, capsys, _profile(tmp_path), recipe)
    _assert_rejected(tmp_path, code, err, "myrecipe.yaml: data.storage_options.secret: looks like a credential")
    assert "hunter2" not in err


@pytest.mark.unit
def test_invalid_yaml(tmp_path, capsys):
    profile_file = tmp_path / "broken.yaml"
    profile_file.write_text("scheduler: slurm\nslurm: [unclosed\n")
    code = main(["submit", "--profile", str(profile_file), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: broken.yaml: line") and "invalid YAML" in err


@pytest.mark.process
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
@pytest.mark.unit
def test_slurm_time_forms(text, minutes):
    assert slurm_time_minutes(text) == minutes


# --- files that are not YAML mappings: one line naming the file, never a traceback ---------------

BAD_FILES = {
    "latin-1": "name: caf\u00e9\n".encode("latin-1"),
    "binary junk": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00",
    "control characters": b"scheduler: local\nname: a\x00b\n",
    "invalid YAML": b"scheduler: slurm\nslurm: {nodes: [1\n",
    "a list": b"- scheduler: local\n- name: t\n",
    "a scalar": b"just some words\n",
}
BAD_FILE_MESSAGES = {
    "latin-1": "line 1: not UTF-8 text (byte 0xe9)",
    "binary junk": "line 1: not UTF-8 text (byte 0x89)",
    "control characters": "line 2: invalid YAML: control character #x0000",
    "invalid YAML": "invalid YAML",
    "a list": "top level must be a mapping of keys to values, not a list",
    "a scalar": "top level must be a mapping of keys to values, not a str",
}


@pytest.mark.unit
@pytest.mark.parametrize("which", ["profile", "recipe"])
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_unreadable_file_is_one_line(tmp_path, capsys, which, kind):
    profile_file = _write(tmp_path / "mycluster.yaml", _profile(tmp_path))
    recipe_file = _write(tmp_path / "myrecipe.yaml", _recipe(tmp_path))
    (profile_file if which == "profile" else recipe_file).write_bytes(BAD_FILES[kind])
    output = tmp_path / "job.sbatch"
    code = main(["submit", "--profile", str(profile_file), "--recipe", str(recipe_file), "--output", str(output)])
    err = capsys.readouterr().err.strip()
    name = "mycluster.yaml" if which == "profile" else "myrecipe.yaml"
    _assert_rejected(tmp_path, code, err, f"error: {name}: ")
    assert BAD_FILE_MESSAGES[kind] in err, err
    assert not output.exists()


@pytest.mark.process
def test_non_utf8_recipe_from_the_console_script(tmp_path):
    profile_file = _write(tmp_path / "mycluster.yaml", _profile(tmp_path))
    recipe_file = tmp_path / "myrecipe.yaml"
    recipe_file.write_bytes("name: t\nmodel: {pretrained: /m\u00fcnchen}\n".encode("latin-1"))
    proc = subprocess.run(
        [sys.executable, "-m", "sd35dist", "submit", "--profile", str(profile_file), "--recipe", str(recipe_file),
         "--dry-run"],
        capture_output=True, text=True, cwd=PROJECT,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: myrecipe.yaml: line 2: not UTF-8 text (byte 0xfc): save the file as UTF-8\n"


# --- model.pretrained is checked at submit when this host can see it ---------------------------------


def _local_profile(tmp_path: Path) -> dict:
    return {"scheduler": "local", "launch": {"procs_per_node": 1}, "run_root": str(tmp_path / "runs")}


TRANSFORMER_SHARD = "transformer/diffusion_pytorch_model-00002-of-*.safetensors"
"""The second shard, whatever the tiny transformer's shard count."""


@pytest.mark.parametrize(
    ("job", "removed", "expected"),
    [
        ("train", None, None),
        ("train", "vae", None),  # the trainer reads latents from the cache, never the VAE
        ("train", "model_index.json", "has no model_index.json"),
        ("train", "transformer/config.json", "transformer/ has no config.json"),
        ("train", TRANSFORMER_SHARD, "transformer/ lacks shard(s) diffusion_pytorch_model-00002-of-"),
        ("train", "scheduler", "has no scheduler/"),
        ("cache", None, None),
        ("cache", "transformer", None),
        ("cache", "text_encoder_3", "has no text_encoder_3/"),
        ("cache", "tokenizer_2/tokenizer_config.json", "tokenizer_2/ has no tokenizer_config.json"),
        ("cache", "vae/diffusion_pytorch_model.safetensors", "vae/ has no weights"),
        ("preflight", "transformer", None),  # preflight never opens the model
    ],
)
@pytest.mark.unit
def test_submit_checks_the_model_directory(tmp_path, capsys, tiny_model, job, removed, expected):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    if removed:
        target = next(model.glob(removed))
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    profile_file = _write(tmp_path / "mycluster.yaml", _local_profile(tmp_path))
    recipe_file = _write(tmp_path / "myrecipe.yaml", _recipe(tmp_path))
    output = tmp_path / "job.sh"
    code = main(["submit", "--profile", str(profile_file), "--recipe", str(recipe_file), "--job", job,
                 "--output", str(output)])
    err = capsys.readouterr().err.strip()
    if expected is None:
        assert code == 0 and err == "", err
        assert output.is_file()
    else:
        _assert_rejected(tmp_path, code, err, f"error: myrecipe.yaml: model.pretrained: {model} {expected}")
        assert not output.exists()
    if job == "cache":  # the same verdict as the rank side's own check
        from sd35dist.models.sd3_components import CACHE_INPUT_PARTS, ModelDirectoryIncomplete, check_model_dir

        try:
            check_model_dir(model, CACHE_INPUT_PARTS)
            rank_refuses = False
        except ModelDirectoryIncomplete:
            rank_refuses = True
        assert rank_refuses is (expected is not None)


@pytest.mark.unit
def test_missing_model_on_a_local_profile_is_refused(tmp_path, capsys):
    profile_file = _write(tmp_path / "mycluster.yaml", _local_profile(tmp_path))
    recipe_file = _write(tmp_path / "myrecipe.yaml", _recipe(tmp_path))
    code = main(["submit", "--profile", str(profile_file), "--recipe", str(recipe_file), "--dry-run"])
    err = capsys.readouterr().err.strip()
    _assert_rejected(tmp_path, code, err, f"error: myrecipe.yaml: model.pretrained: {tmp_path / 'model'} does not exist")


@pytest.mark.unit
def test_model_not_visible_from_a_cluster_submit_host_is_a_note(tmp_path, capsys):
    """On Slurm the path may live on the nodes' shared filesystem only: say it was not checked."""
    profile_file = _write(tmp_path / "mycluster.yaml", _profile(tmp_path))
    recipe_file = _write(tmp_path / "myrecipe.yaml", _recipe(tmp_path))
    code = main(["submit", "--profile", str(profile_file), "--recipe", str(recipe_file), "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.startswith("#!/bin/bash")
    assert captured.err.splitlines() == [
        f"note: model.pretrained {tmp_path / 'model'} is not visible from this host, so it was not checked; "
        "the train job needs model_index.json, transformer/, scheduler/ in it"
    ]


@pytest.mark.unit
def test_model_visible_from_a_cluster_submit_host_is_checked(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    code, err = _submit(tmp_path, capsys, _profile(tmp_path), _recipe(tmp_path), "--job", "train", "--dry-run")
    _assert_rejected(tmp_path, code, err, "model.pretrained:")
    assert err.endswith("has no model_index.json; expected a diffusers directory with SD3.5's layout")


@pytest.mark.unit
def test_model_url_is_refused(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    recipe["model"]["pretrained"] = "s3://models/sd35-large"
    code, err = _submit(tmp_path, capsys, _profile(tmp_path), recipe, "--job", "train", "--dry-run")
    _assert_rejected(tmp_path, code, err, "myrecipe.yaml: model.pretrained: is a URL")


# --- status | logs | cancel of a job that does not exist ---------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("command", ["status", "logs", "cancel"])
def test_unknown_job_id_is_no_such_job(tmp_path, capsys, monkeypatch, command):
    """No Slurm on PATH: only this account's records are asked (the slurm tier covers Slurm's answer)."""
    monkeypatch.setenv("SD35DIST_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    code = main([command, "999999"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.strip().splitlines() == [
        "error: 999999: no such job: not submitted from this account (and no Slurm here to ask)"
    ]


@pytest.mark.unit
@pytest.mark.parametrize("command", ["status", "logs", "cancel"])
def test_missing_run_directory_is_no_such_run_directory(tmp_path, capsys, command):
    code = main([command, str(tmp_path / "runs" / "t-train-20260101-000000")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [f"error: {tmp_path / 'runs' / 't-train-20260101-000000'}: no such run directory"]
