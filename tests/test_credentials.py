"""The one credential rule: a secret value in a profile, a recipe or a `--set` is refused as one
line naming the file and the YAML path, exit status 2, and is written nowhere."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.profile import PROFILE_DIR
from sd35dist.cli import main
from sd35dist.config.credentials import REDACTED, find_credentials, first_credential, looks_secret, redact
from tests.cli_runs import PROJECT, all_text_under

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzEXAMPLEKEY"


def _profile(tmp_path: Path) -> dict:
    return {
        "scheduler": "slurm",
        "slurm": {"partition": "dev", "nodes": 1, "gpus_per_node": 0, "time": "00:10:00"},
        "env": {"values": {"HF_HUB_OFFLINE": "1"}, "passthrough": ["AWS_SECRET_ACCESS_KEY"]},
        "setup": {"lines": ['source "$HOME/venv/bin/activate"']},
        "run_root": str(tmp_path / "runs"),
    }


def _recipe(tmp_path: Path) -> dict:
    return {
        "name": "t",
        "model": {"pretrained": str(tmp_path / "model")},
        "data": {
            "cache_url": "s3://bucket/cache",
            "storage_options": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}},
            "datasets": [{"id": "photos", "source": str(tmp_path / "images")}],
        },
        "output": {"dir": str(tmp_path / "out")},
    }


def _set(tree: dict, path: str, value: Any) -> dict:
    tree = copy.deepcopy(tree)
    node: Any = tree
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return tree


def _submit(tmp_path: Path, capsys, profile: dict, recipe: dict, *extra: str) -> tuple[int, str, str]:
    profile_file = tmp_path / "mycluster.yaml"
    recipe_file = tmp_path / "myrecipe.yaml"
    profile_file.write_text(yaml.safe_dump(profile, sort_keys=False))
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code = main(["submit", "--profile", str(profile_file), "--recipe", str(recipe_file), "--job", "preflight", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _written(tmp_path: Path) -> str:
    """Everything under tmp_path except the two input files the test wrote itself."""
    return "\n".join(
        p.read_bytes().decode(errors="replace")
        for p in tmp_path.rglob("*")
        if p.is_file() and p.name not in ("mycluster.yaml", "myrecipe.yaml")
    )


# (which file, YAML path, value): one of each way a value can hold a credential, in each kind of field.
CASES = [
    ("profile", "env.values.AWS_SECRET_ACCESS_KEY", SECRET),
    ("profile", "env.values.WANDB_API_KEY", SECRET),
    ("profile", "env.values.HF_ENDPOINT", f"https://me:{SECRET}@hub.example.org"),
    ("profile", "setup.lines.0", f"export HF_TOKEN={SECRET}"),
    ("profile", "setup.lines.0", f"huggingface-cli login --token {SECRET}"),
    ("profile", "setup.lines.0", f"aws configure set aws_secret_access_key {SECRET}"),
    ("profile", "setup.lines.0", f"curl -fsS -H 'Authorization: Bearer {SECRET}' https://hub.example.org/x"),
    ("profile", "setup.lines.0", f"wandb login {SECRET}"),
    ("profile", "setup.lines.0", f"git config --global github.token {SECRET}"),
    ("profile", "setup.lines.0", f"curl -u me:{SECRET} https://hub.example.org/x"),
    ("profile", "setup.lines.0", "echo hf_" + SECRET.replace("-", "") + " > ~/.cache/token"),
    ("profile", "env.values.WANDB_KEY", SECRET),
    ("profile", "env.values.GITHUB_PAT", SECRET),
    ("profile", "env.values.DB_PASS", SECRET),
    ("profile", "setup.modules", [f"cuda/12.4 --password={SECRET}"]),
    ("profile", "run_root", f"sftp://me:{SECRET}@storage/runs"),
    ("recipe", "data.storage_options.secret", SECRET),
    ("recipe", "data.storage_options.tokens", SECRET),
    ("recipe", "data.storage_options.pw", SECRET),
    ("recipe", "data.storage_options.pwd", SECRET),
    ("recipe", "data.storage_options.auth", [SECRET, SECRET]),
    ("recipe", "data.storage_options.client_kwargs.aws_secret_access_key", SECRET),
    ("recipe", "data.storage_options.client_kwargs.endpoint_url", f"http://minio:{SECRET}@127.0.0.1:9000"),
    ("recipe", "data.storage_options.config_kwargs.headers", [{"Authorization": f"Bearer {SECRET}"}]),
    ("recipe", "data.storage_options.token", 12345678),
    ("recipe", "data.cache_url", f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/cache"),
    ("recipe", "data.cache_url", f"https://bucket.example.org/cache?X-Amz-Signature={SECRET}"),
    ("recipe", "data.datasets.0.source", f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/images"),
    ("recipe", "model.pretrained", f"https://me:{SECRET}@models.example.org/sd35"),
    ("recipe", "output.dir", f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/out"),
    ("recipe", "train.resume", f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/out/checkpoint-400"),
]


def _expected_path(path: str, value: Any) -> str:
    if isinstance(value, list):
        return path + (".0.Authorization" if isinstance(value[0], dict) else ".0")
    return path


@pytest.mark.unit
@pytest.mark.parametrize("how", ["--dry-run", "--output"])
@pytest.mark.parametrize(("which", "path", "value"), CASES, ids=[f"{w}:{p}" for w, p, _ in CASES])
def test_credential_in_any_field_is_refused_and_written_nowhere(tmp_path, capsys, which, path, value, how):
    profile, recipe = _profile(tmp_path), _recipe(tmp_path)
    if which == "profile":
        profile = _set(profile, path, value)
    else:
        recipe = _set(recipe, path, value)
    extra = ["--dry-run"] if how == "--dry-run" else ["--output", str(tmp_path / "job.sbatch")]
    code, out, err = _submit(tmp_path, capsys, profile, recipe, *extra)
    source = "mycluster.yaml" if which == "profile" else "myrecipe.yaml"
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {source}: {_expected_path(path, value)}: "), err
    assert "credential" in err or "user-info" in err
    assert str(value) not in err + out and SECRET not in err + out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "job.sbatch").exists()
    assert SECRET not in _written(tmp_path) and "12345678" not in _written(tmp_path)


@pytest.mark.parametrize(
    ("override", "path"),
    [
        (f"env.values.WANDB_API_KEY={SECRET}", "env.values.WANDB_API_KEY"),
        (f"data.storage_options.client_kwargs.aws_secret_access_key={SECRET}",
         "data.storage_options.client_kwargs.aws_secret_access_key"),
        (f"data.cache_url=s3://key:{SECRET}@bucket/cache", "data.cache_url"),
    ],
)
@pytest.mark.unit
def test_credential_in_an_override_is_refused(tmp_path, capsys, override, path):
    code, out, err = _submit(tmp_path, capsys, _profile(tmp_path), _recipe(tmp_path), "--set", override,
                             "--output", str(tmp_path / "job.sbatch"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --set: {path}: "), err
    assert SECRET not in err + out and SECRET not in _written(tmp_path)
    assert not (tmp_path / "runs").exists()


def _leaves(node: Any, path: tuple[str, ...] = ()) -> list[str]:
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in _leaves(value, (*path, str(key)))]
    if isinstance(node, list) and node:
        return [leaf for i, value in enumerate(node) for leaf in _leaves(value, (*path, str(i)))]
    return [".".join(path)]


def _full_tree(which: str) -> dict:
    """Every field of the schema, defaults included, as a loaded and re-dumped config has them."""
    from launcher.profile import load_profile
    from sd35dist.config import load_recipe

    if which == "profile":
        return load_profile(PROFILE_DIR / "h100x8x4.yaml").model_dump(mode="json")
    data = load_recipe(PROJECT / "recipes" / "tiny.yaml").model_dump(mode="json")
    data["data"]["datasets"][0]["instance_prompt"] = "k4s4"
    return data


@pytest.mark.unit
@pytest.mark.parametrize("which", ["profile", "recipe"])
def test_every_field_of_both_schemas_is_covered(tmp_path, capsys, which):
    """Not a list of fields kept by hand: each leaf of the whole tree, set to a URL with
    user-info, is refused at its own path — so a field added later is covered too."""
    tree = _full_tree(which)
    leaves = _leaves(tree)
    assert len(leaves) > (20 if which == "profile" else 60)
    for leaf in leaves:
        poisoned = _set(tree, leaf, f"s3://key:{SECRET}@bucket/x")
        profile = poisoned if which == "profile" else _profile(tmp_path)
        recipe = poisoned if which == "recipe" else _recipe(tmp_path)
        code, out, err = _submit(tmp_path, capsys, profile, recipe, "--dry-run")
        source = "mycluster.yaml" if which == "profile" else "myrecipe.yaml"
        assert code == 2 and err.startswith(f"error: {source}: {leaf}: "), (leaf, err)
        assert SECRET not in err + out


@pytest.mark.unit
def test_values_that_only_look_close_are_accepted(tmp_path, capsys):
    """Booleans, empty values, names (not values) of secrets, `$VAR` references and ordinary
    keys that merely contain 'key' or 'token' pass."""
    profile = _profile(tmp_path)
    profile["env"]["values"].update({"TOKENIZERS_PARALLELISM": "false", "WANDB_API_KEY": "", "MONKEY_PATCH": "1",
                                      "HF_TOKEN": "${TEAM_HF_TOKEN}"})
    profile["env"]["passthrough"] += ["AWS_ACCESS_KEY_ID", "HF_TOKEN"]
    profile["setup"]["lines"] += ['export HF_TOKEN="$(cat ~/.hf_token)"', "export WANDB_API_KEY=$MY_WANDB_KEY",
                                  'huggingface-cli login --token "$HF_TOKEN"', "wandb login --relogin",
                                  'curl -H "Authorization: Bearer $HF_TOKEN" https://hub.example.org/x',
                                  "docker login --password-stdin registry.example.org < ~/.docker-token",
                                  "set -euo pipefail", "git config --global credential.helper store",
                                  "aws configure set default.s3.max_concurrent_requests 20"]
    recipe = _recipe(tmp_path)
    recipe["data"]["cache_url"] = "s3://bucket/cache@v2"
    recipe["data"]["storage_options"].update({"anon": False, "token": None, "key_prefix": "k/", "use_ssl": True})
    recipe["data"]["datasets"][0].update({"keep_tokens": 3, "caption_strategy": "instance_prompt",
                                          "instance_prompt": "a photo of sks, key light, a set secret garden"})
    code, out, err = _submit(tmp_path, capsys, profile, recipe, "--dry-run")
    assert code == 0, err
    assert 'export HF_TOKEN="$(cat ~/.hf_token)"' in out  # read on the node at run time: no value written
    assert "AWS_ACCESS_KEY_ID is not set" in out  # passthrough names are checked, values never written


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("AWS_SECRET_ACCESS_KEY", True), ("AWS_ACCESS_KEY_ID", True), ("AWS_SESSION_TOKEN", True),
        ("WANDB_API_KEY", True), ("HF_TOKEN", True), ("key", True), ("secret", True), ("apiKey", True),
        ("SecretAccessKey", True), ("account_key", True), ("sas_token", True), ("client_secret", True),
        ("private_key", True), ("password", True), ("X-Amz-Credential", True),
        ("keep_tokens", False), ("key_prefix", False), ("monkey", False), ("TOKENIZERS_PARALLELISM", False),
        ("tokenizer_3", False), ("cache_url", False), ("endpoint_url", False), ("passthrough", False),
        ("role_session_name", False), ("keyboard", False),
        ("WANDB_KEY", True), ("GITHUB_PAT", True), ("tokens", True), ("pw", True), ("pwd", True), ("auth", True),
        ("DB_PASS", True), ("basic_auth", True), ("sort_key", False), ("max_tokens", False), ("token_file", False),
        ("password_stdin", False), ("auth_type", False), ("public_key", False),
    ],
)
@pytest.mark.unit
def test_which_names_look_secret(key, secret):
    assert looks_secret(key) is secret


@pytest.mark.unit
def test_the_walk_reports_every_credential_in_document_order():
    tree = {"a": {"b": [{"password": "x"}, "http://u:p@h"]}, "token": True, "c": "export API_KEY=$K"}
    assert [c.path for c in find_credentials(tree)] == ["a.b.0.password", "a.b.1"]


@pytest.mark.unit
def test_frozen_run_directory_holds_no_credential_from_a_valid_submission(tmp_path, capsys, monkeypatch):
    """The positive path: the secret is in the submitting environment, its name passes through,
    and the run directory holds no value."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    code, _, err = _submit(tmp_path, capsys, _profile(tmp_path), _recipe(tmp_path), "--output", str(tmp_path / "j.sh"))
    assert code == 0, err
    written = all_text_under(tmp_path / "runs")
    assert "AWS_SECRET_ACCESS_KEY" in written and SECRET not in written


@pytest.mark.process
def test_console_script_refuses_env_value_secret(tmp_path):
    """The real process: exit status 2, one line on stderr, nothing on stdout."""
    profile_file = tmp_path / "mycluster.yaml"
    profile_file.write_text(yaml.safe_dump(_set(_profile(tmp_path), "env.values.AWS_SECRET_ACCESS_KEY", SECRET)))
    recipe_file = tmp_path / "myrecipe.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe(tmp_path)))
    proc = subprocess.run(
        [sys.executable, "-m", "sd35dist", "submit", "--profile", str(profile_file), "--recipe", str(recipe_file),
         "--job", "preflight", "--dry-run"],
        capture_output=True, text=True, cwd=PROJECT,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: mycluster.yaml: env.values.AWS_SECRET_ACCESS_KEY: looks like a credential")
    assert len(proc.stderr.strip().splitlines()) == 1 and SECRET not in proc.stderr


@pytest.mark.unit
def test_redact_takes_every_credential_out_and_leaves_the_rest():
    """What the SimpleTuner importer (and anything else showing a config it did not write) calls."""
    tree = {
        "output_dir": f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/out",
        "aws_secret_access_key": SECRET,
        "setup": [f"huggingface-cli login --token {SECRET}", "source ~/venv/bin/activate"],
        "backend": {"headers": {"Authorization": f"Bearer {SECRET}"}, "endpoint_url": "http://127.0.0.1:9000",
                    "anon": False, "keep_tokens": 3},
        "note": f"export WANDB_API_KEY={SECRET}",
    }
    clean = redact(tree)
    assert first_credential(clean) is None and SECRET not in str(clean) and "AKIA" not in str(clean)
    assert clean["output_dir"] == "s3://bucket/out", "a URL keeps working without its user-info"
    assert clean["aws_secret_access_key"] == REDACTED
    assert clean["setup"] == [f"huggingface-cli login --token {REDACTED}", "source ~/venv/bin/activate"]
    assert clean["backend"] == {"headers": {"Authorization": REDACTED}, "endpoint_url": "http://127.0.0.1:9000",
                                "anon": False, "keep_tokens": 3}
    assert clean["note"] == f"export WANDB_API_KEY={REDACTED}"
    assert [c.path for c in find_credentials(tree)] == ["output_dir", "aws_secret_access_key", "setup.0",
                                                        "backend.headers.Authorization", "note"]
