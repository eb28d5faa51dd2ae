"""What the ranks would fail on is refused before anything runs: at `submit`, at `plan`, and by the
rank job itself before its process group (a script submitted with plain sbatch). One line naming
the recipe file, the key and the fix; exit status 2; no run directory, no job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sd35dist.cli import main
from tests.cli_runs import PROJECT, venv_env


@pytest.fixture
def setup(tmp_path, tiny_model):
    """A local profile and, in its own directory, a recipe on the tiny model with a prompts file beside it."""
    profile = tmp_path / "local.yaml"
    profile.write_text(yaml.safe_dump({"scheduler": "local", "launch": {"procs_per_node": 2},
                                       "run_root": str(tmp_path / "runs")}))
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "prompts.txt").write_text("a red fox\n\na lighthouse\n")
    (tmp_path / "images").mkdir()
    recipe = {"name": "t", "model": {"pretrained": str(tiny_model)},
              "data": {"cache_url": str(tmp_path / "cache"), "datasets": [{"id": "d", "source": str(tmp_path / "images")}]},
              "output": {"dir": str(tmp_path / "out")},
              "validation": {"prompts_file": "prompts.txt", "resolutions": [[64, 64]], "every_n_steps": 2}}
    (recipes / "my.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path, profile, recipes / "my.yaml"


def run(capsys, command: str, setup, *overrides: str) -> tuple[int, str, str]:
    tmp_path, profile, recipe = setup
    flags = [text for text in overrides if text.startswith("--")]
    overrides = tuple(text for text in overrides if not text.startswith("--"))
    sets = [arg for text in overrides for arg in ("--set", text)] + flags
    if command == "train":  # the rank job, as a plain-sbatch script starts it (one process, no torchrun here)
        data = yaml.safe_load(recipe.read_text())
        from sd35dist.config import apply_overrides, parse_override

        recipe.write_text(yaml.safe_dump(apply_overrides(data, [parse_override(text) for text in overrides])))
        code = main(["train", "--recipe", str(recipe), "--run-dir", str(tmp_path / "run")])
    elif command == "plan":
        code = main(["plan", "--profile", str(profile), "--recipe", str(recipe), *sets])
    else:  # --output prepares the run directory (or, refused, must not) without starting a job
        output = [] if "--dry-run" in flags else ["--output", str(tmp_path / "job.sh")]
        code = main(["submit", "--profile", str(profile), "--recipe", str(recipe), *output, *sets])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(setup, code: int, err: str, key: str, expected: str) -> None:
    tmp_path = setup[0]
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: my.yaml: {key}: "), err
    assert expected in err, err
    written = [tmp_path / name for name in ("runs", "run", "out", "job.sh") if (tmp_path / name).exists()]
    assert not written, f"a refused job writes nothing: {written}"


BAD_RECIPES = [
    # (id, --set overrides, the key named, what the line says)
    ("prompts-missing", ["validation.prompts_file=nope.txt"], "validation.prompts_file", "nope.txt does not exist"),
    ("prompts-a-directory", ["validation.prompts_file=."], "validation.prompts_file", "is a directory"),
    ("seed-2^70", ["validation.seeds=[1180591620717411303424]"], "validation.seeds.0", "must be ≤ 18446744073709551615"),
    ("seed-2^64", ["validation.seeds=[0, 18446744073709551616]"], "validation.seeds.1", "must be ≤ 18446744073709551615"),
    ("seed-negative", ["validation.seeds=[-1]"], "validation.seeds.0", "must be ≥ 0"),
    ("resolution-beyond-pos-embed", ["validation.resolutions=[[1024, 1024]]"], "validation.resolutions",
     "1024x1024 is beyond the model's position embedding: at most 512 pixels a side"),
    ("resolution-one-side", ["validation.resolutions=[[64, 64], [528, 64]]"], "validation.resolutions",
     "528x64 is beyond the model's position embedding"),
    ("lora-typo", ["train.lora={targets: [attn.to_qq]}"], "train.lora.targets", "'attn.to_qq' names no Linear module"),
    ("lora-one-of-two", ["train.lora={targets: [to_q, ff.net.9]}"], "train.lora.targets", "'ff.net.9' names no Linear"),
    ("lora-not-a-linear", ["train.lora={targets: [norm1]}"], "train.lora.targets", "'norm1' names no Linear"),
    ("skip-layer-beyond-the-blocks", ["validation.skip_layer_guidance={layers: [3, 4]}"],
     "validation.skip_layer_guidance.layers", "[3, 4]: the transformer in"),
    ("weights-ema-without-ema", ["validation.weights=ema"], "validation.weights",
     "train.ema.enabled is false: set train.ema.enabled: true or use weights: model"),
    ("weights-both-on-zero2", ["validation.weights=both", "train.ema.enabled=true", "parallel.strategy=zero2"],
     "validation.weights", "needs strategy fsdp2"),
    ("lr-yaml-inf", ["train.learning_rate=.inf"], "train.learning_rate", "must be a finite number, got inf"),
    ("lr-overflowing", ["train.learning_rate=1e999"], "train.learning_rate", "must be a finite number, got inf"),
    ("lr-word-inf", ["train.learning_rate=inf"], "train.learning_rate", "must be a finite number, got 'inf'"),
    ("ema-decay-nan", ["train.ema={enabled: true, decay: .nan}"], "train.ema.decay", "must be a finite number"),
]


@pytest.mark.unit
@pytest.mark.parametrize("command", ["submit", "plan", "train"])
@pytest.mark.parametrize(("overrides", "key", "expected"), [case[1:] for case in BAD_RECIPES],
                         ids=[case[0] for case in BAD_RECIPES])
def test_a_recipe_the_ranks_would_fail_on_is_one_line(capsys, setup, command, overrides, key, expected):
    code, _, err = run(capsys, command, setup, *overrides)
    assert_refused(setup, code, err, key, expected)


@pytest.mark.unit
@pytest.mark.parametrize("command", ["submit", "plan", "train"])
@pytest.mark.parametrize(("content", "expected"), [
    ("a fox\nm\u00fcnchen\n".encode("latin-1"), "is not UTF-8 text (byte 0xfc on line 2): save it as UTF-8"),
    (b"\xff\xfe\x00a\x00", "is not UTF-8 text (byte 0xff on line 1)"),
    (b"", "holds no prompt: write one prompt per line"),
    (b"\n   \n\t\n", "holds no prompt"),
], ids=["latin-1", "utf-16", "empty", "blank-lines"])
def test_a_prompts_file_the_ranks_cannot_read_is_one_line(capsys, setup, command, content, expected):
    (setup[2].parent / "prompts.txt").write_bytes(content)
    code, _, err = run(capsys, command, setup)
    assert_refused(setup, code, err, "validation.prompts_file", expected)


@pytest.mark.unit
@pytest.mark.parametrize("where", ["the file itself", "a parent"])
def test_an_output_dir_that_is_a_file_is_refused(capsys, setup, where):
    tmp_path = setup[0]
    (tmp_path / "taken").write_text("not a directory\n")
    target = tmp_path / "taken" if where == "the file itself" else tmp_path / "taken" / "out"
    for command in ("submit", "plan", "train"):
        code, _, err = run(capsys, command, setup, f"output.dir={target}")
        assert_refused(setup, code, err, "output.dir", f"{tmp_path / 'taken'}")
        assert "name a directory for checkpoints" in err


@pytest.mark.unit
def test_sizes_follow_the_models_own_patch_and_vae(capsys, setup, tiny_model):
    """A model with patch 4 needs multiples of 32 pixels and reaches 32 × 4 × 8 = 1024 a side."""
    tmp_path = setup[0]
    model = tmp_path / "patch4"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "transformer" / "config.json").read_text())
    (model / "transformer" / "config.json").write_text(json.dumps({**config, "patch_size": 4}))
    code, _, err = run(capsys, "submit", setup, f"model.pretrained={model}", "validation.resolutions=[[48, 48]]")
    assert_refused(setup, code, err, "validation.resolutions", "48x48: sides must be positive multiples of 32")
    code, _, err = run(capsys, "submit", setup, f"model.pretrained={model}", "validation.resolutions=[[1024, 992]]",
                       "--dry-run")
    assert code == 0, err


@pytest.mark.unit
def test_good_values_at_the_limits_pass(capsys, setup):
    code, out, err = run(capsys, "submit", setup, "validation.seeds=[0, 18446744073709551615]",
                         "validation.resolutions=[[512, 512], [512, 64]]", "train.lora={targets: [to_q, norm1.linear]}",
                         "train.ema.enabled=true", "validation.weights=both", "--dry-run")
    assert code == 0 and err == "", err
    assert out.startswith("#!/bin/bash")


@pytest.mark.unit
def test_a_relative_prompts_file_is_read_from_the_recipes_directory(capsys, setup, monkeypatch):
    """Not from the working directory: one there of the same name is ignored, and the frozen recipe
    names the file beside the recipe."""
    tmp_path, profile, recipe = setup
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (elsewhere / "other.txt").write_text("a prompt in the working directory\n")
    code, _, err = run(capsys, "submit", setup, "validation.prompts_file=other.txt")
    assert_refused(setup, code, err, "validation.prompts_file", f"{recipe.parent / 'other.txt'} does not exist")
    assert "a relative prompts_file is read from the recipe's directory" in err
    code = main(["submit", "--profile", str(profile), "--recipe", str(recipe), "--output", str(tmp_path / "job.sh")])
    assert code == 0, capsys.readouterr().err
    run_dir = next((tmp_path / "runs").iterdir())
    frozen = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert frozen["validation"]["prompts_file"] == str(recipe.parent / "prompts.txt")


@pytest.mark.unit
def test_a_prompts_file_a_cluster_host_cannot_see_is_a_note(capsys, setup):
    tmp_path, _, recipe = setup
    slurm = tmp_path / "cluster.yaml"
    slurm.write_text(yaml.safe_dump({"scheduler": "slurm", "slurm": {"partition": "dev", "time": "00:10:00"},
                                     "run_root": str(tmp_path / "runs")}))
    code = main(["submit", "--profile", str(slurm), "--recipe", str(recipe), "--set",
                 "validation.prompts_file=/shared/only/on/the/nodes.txt", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 0
    assert err.splitlines() == ["note: validation.prompts_file /shared/only/on/the/nodes.txt is not visible from "
                                "this host, so it was not checked"]


@pytest.mark.process
@pytest.mark.parametrize(("overrides", "expected"), [
    (["validation.prompts_file=nope.txt"], "validation.prompts_file"),
    (["train.lora={targets: [attn.to_qq]}"], "train.lora.targets"),
    (["validation.resolutions=[[1024, 1024]]"], "validation.resolutions"),
], ids=["prompts", "lora", "resolution"])
def test_a_real_local_submit_starts_no_rank(setup, overrides, expected):
    """Not a dry run: the local profile would start torchrun at once; nothing starts, nothing is recorded."""
    tmp_path, profile, recipe = setup
    state = tmp_path / "state"
    sets = [arg for text in overrides for arg in ("--set", text)]
    proc = subprocess.run([sys.executable, "-m", "sd35dist", "submit", "--profile", str(profile), "--recipe", str(recipe),
                           *sets], capture_output=True, text=True, cwd=PROJECT, timeout=120,
                          env=venv_env(SD35DIST_STATE_DIR=str(state)))
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: my.yaml: {expected}: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "runs").exists(), "no run directory, so no job script and no rank"
    assert not state.exists(), "no job recorded"
    assert not any("sd35dist" in _cmdline(pid) and str(recipe) in _cmdline(pid) for pid in _pids()), "no rank started"


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
