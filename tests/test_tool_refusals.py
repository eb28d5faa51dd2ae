"""The tools refuse bad arguments in one line with exit status 2, before they load or write anything:
sample, sweep, inspect, export, report, status/cancel, cache inspect and submit --output.

Everything runs in this process on the tiny model and checkpoints written here with DCP (the
format FSDP2 writes); a stderr of exactly one line also proves no weight was loaded (the loaders
draw progress bars on stderr)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from sd35dist.cli import main
from tests.checkpoint_files import write_checkpoint

pytestmark = pytest.mark.unit


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """The console script's exit status, stdout and stderr (argparse's usage errors exit: caught here)."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(code: int, err: str, *expected: str) -> str:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: "), err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    moved = root / "moved-base"
    shutil.copytree(tiny_model, moved)
    step = Path("checkpoints") / "step-00000004"  # in an output directory, as training lays them out
    lora_moved = write_checkpoint(root / "lora-moved" / step, tiny_model, lora=True, pretrained=moved)
    shutil.rmtree(moved)  # the base model the LoRA was trained on is gone
    return {"full": write_checkpoint(root / "full" / step, tiny_model),
            "lora": write_checkpoint(root / "lora" / step, tiny_model, lora=True),
            "lora-moved": lora_moved}


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A directory no file can be created in: permission bits bind only non-root users, so root gets sysfs."""
    if os.geteuid() == 0:
        return Path("/sys/fs")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


# ---- sample -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    (["--steps", "0"], "argument --steps: must be ≥ 1, got 0"),
    (["--steps", "-3"], "argument --steps: must be ≥ 1, got -3"),
    (["--scale", "-5"], "argument --scale: must be ≥ 1, got -5"),
    (["--scale", "nan"], "argument --scale: must be a finite number, got nan"),
    (["--apg-eta", "nan"], "argument --apg-eta: must be a finite number, got nan"),
    (["--apg-eta", "inf"], "argument --apg-eta: must be a finite number, got inf"),
    (["--apg-momentum=-inf"], "argument --apg-momentum: must be a finite number"),
    (["--apg-norm-threshold", "-1"], "argument --apg-norm-threshold: must be ≥ 0"),
    (["--seed", str(2**70)], f"argument --seed: must be between 0 and {2**64 - 1}, got {2**70}"),
    (["--seed", "-1"], "argument --seed: must be between 0 and"),
    (["--width", "0"], "argument --width: must be ≥ 1, got 0"),
    (["--width", "-16"], "argument --width: must be ≥ 1, got -16"),
    (["--height", "100"], "argument --height: must be a multiple of 16 pixels, got 100"),
    (["--width", "16384", "--height", "16384"], "16384x16384 is beyond the model's position embedding: at most 512"),
    (["--max-sequence-length", "513"], "argument --max-sequence-length: must be between 1 and 512"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_sample_refuses_bad_numbers_before_loading(capsys, tiny_model, tmp_path, args, expected):
    started = time.monotonic()
    code, out, err = run(capsys, "sample", str(tiny_model), "--prompt", "a fox", "--out", str(tmp_path / "o"), *args)
    one_line(code, err, expected)
    assert out == "" and not (tmp_path / "o").exists()
    assert time.monotonic() - started < 20, "refused before the model (or a 16384² latent) was made"


def test_sample_refuses_bad_files_and_directories(capsys, tiny_model, tmp_path):
    out = ["--out", str(tmp_path / "o")]
    (tmp_path / "latin1.txt").write_bytes("a fox\nm\u00fcnchen\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n \n")
    random_files = tmp_path / "random"
    random_files.mkdir()
    for name in ("config.json", "model_index.json", "diffusion_pytorch_model.safetensors"):
        (random_files / name).write_bytes(os.urandom(300))
    cases = [
        (["--prompts-file", str(tmp_path / "nope.txt")], f"--prompts-file: {tmp_path / 'nope.txt'} does not exist"),
        (["--prompts-file", str(tmp_path / "latin1.txt")], "is not UTF-8 text (byte 0xfc on line 2)"),
        (["--prompts-file", str(tmp_path / "blank.txt")], "holds no prompt"),
        ([], "give --prompt or --prompts-file"),
    ]
    for args, expected in cases:
        one_line(*run(capsys, "sample", str(tiny_model), *args, *out)[::2], expected)
    prompt = ["--prompt", "a fox"]
    one_line(*run(capsys, "sample", str(random_files), *prompt, *out)[::2], "not a readable JSON config")
    one_line(*run(capsys, "sample", str(tiny_model / "vae"), *prompt, *out)[::2],
             "the config of AutoencoderKL, not of an SD3 transformer")
    one_line(*run(capsys, "sample", str(tmp_path / "nothing"), *prompt, *out)[::2], "no such file or directory")
    one_line(*run(capsys, "sample", str(tiny_model / "transformer"), *prompt, *out)[::2],
             "does not say which base model it belongs to: add --model DIR")
    one_line(*run(capsys, "sample", str(tiny_model / "transformer"), *prompt, "--model", str(random_files), *out)[::2],
             "--model: ")
    (tmp_path / "a-file").write_text("x")
    one_line(*run(capsys, "sample", str(tiny_model), *prompt, "--out", str(tmp_path / "a-file" / "o"))[::2],
             "is a file: name a directory")
    assert not (tmp_path / "o").exists()


# ---- sweep --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    (["--steps", "abc"], "argument --steps: expected comma-separated steps such as 400,800, got 'abc'"),
    (["--steps", "4,x"], "argument --steps: expected comma-separated steps"),
    (["--steps", "-4"], "argument --steps: expected comma-separated steps"),
    (["--steps", "8"], "no complete checkpoint for step(s) [8] (kept: 4)"),
    (["--run-dir", "/nonexistent/run"], "--run-dir /nonexistent/run: not a directory"),
    (["--recipe", "/nonexistent/r.yaml"], "/nonexistent/r.yaml: file not found"),
])
def test_sweep_refuses_bad_arguments(capsys, checkpoints, args, expected):
    one_line(*run(capsys, "sweep", str(checkpoints["full"].parent.parent), *args)[::2], expected)


# ---- inspect ------------------------------------------------------------------------------------

def test_inspect_refuses_files_that_are_not_safetensors(capsys, tiny_model, tmp_path):
    shard = next((tiny_model / "transformer").glob("*00001-of-*.safetensors"))
    files = {"garbage": os.urandom(1000), "empty": b"", "truncated-header": shard.read_bytes()[:300],
             "truncated-data": shard.read_bytes()[: shard.stat().st_size * 9 // 10]}
    for name, data in files.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        one_line(*run(capsys, "inspect", str(tmp_path / f"{name}.safetensors"))[::2],
                 f"{tmp_path / name}.safetensors: not a readable safetensors file ({len(data)} bytes")


@pytest.mark.parametrize("damage", ["shard missing", "shard truncated", "index names a missing shard"])
def test_inspect_reports_a_broken_model_folder(capsys, tiny_model, tmp_path, damage):
    folder = tmp_path / "transformer"
    shutil.copytree(tiny_model / "transformer", folder)
    shard = sorted(folder.glob("*.safetensors"))[1]
    if damage == "shard missing":
        shard.unlink()
        expected = f"{shard}: missing"
    elif damage == "shard truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
        expected = f"{shard}: not a readable safetensors file"
    else:
        index = folder / "diffusion_pytorch_model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"]["extra.weight"] = "diffusion_pytorch_model-00009-of-00009.safetensors"
        index.write_text(json.dumps(data))
        expected = "diffusion_pytorch_model-00009-of-00009.safetensors: missing"
    one_line(*run(capsys, "inspect", str(folder), "--summary")[::2], expected)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_inspect_reports_a_checkpoint_with_a_broken_shard_without_diff(capsys, checkpoints, tmp_path, damage):
    checkpoint = tmp_path / "step-00000004"
    shutil.copytree(checkpoints["full"], checkpoint)
    shard = next((checkpoint / "dcp").glob("*.distcp"))
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-64])
    err = one_line(*run(capsys, "inspect", str(checkpoint), "--summary")[::2],
                   f"{checkpoint}: broken checkpoint: {shard.name} is {damage}")
    assert err  # and the sound one is read: the damage is what is reported
    code, out, err = run(capsys, "inspect", str(checkpoints["full"]), "--summary")
    assert code == 0 and "checkpoint (fsdp2)" in out, err


# ---- export -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["diffusers", "single-file", "lora", "merge"])
def test_export_into_a_read_only_directory_is_one_line(capsys, checkpoints, read_only_dir, kind):
    checkpoint = checkpoints["full" if kind in ("diffusers", "single-file") else "lora"]
    flags = {"diffusers": [], "single-file": ["--format", "single-file"], "lora": [], "merge": ["--merge"]}[kind]
    target = read_only_dir / f"sd35dist-export-{kind}"
    one_line(*run(capsys, "export", str(checkpoint), "--out", str(target), *flags)[::2],
             f"--out {target}: {read_only_dir} is not writable")
    assert not target.exists()


def test_export_refuses_a_vae_that_is_a_transformer_and_a_merge_whose_base_moved(capsys, checkpoints, tiny_model,
                                                                                  tmp_path, monkeypatch):
    one_line(*run(capsys, "export", str(checkpoints["full"]), "--format", "single-file", "--out",
                  str(tmp_path / "m.safetensors"), "--vae", str(tiny_model / "transformer"))[::2],
             f"--vae {tiny_model / 'transformer'}: holds a SD3Transformer2DModel, not a VAE (AutoencoderKL)")
    one_line(*run(capsys, "export", str(checkpoints["full"]), "--format", "single-file", "--out",
                  str(tmp_path / "m.safetensors"), "--vae", str(tmp_path))[::2], "no readable config.json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # even so, no Hub lookup: a moved local path is not a repository id
    started = time.monotonic()
    err = one_line(*run(capsys, "export", str(checkpoints["lora-moved"]), "--merge", "--out", str(tmp_path / "m"))[::2],
                   "--merge needs the base transformer the LoRA was trained on", "which is not there (moved?)")
    assert "moved-base/transformer" in err and time.monotonic() - started < 30
    for out in ("m.safetensors", "m"):
        assert not (tmp_path / out).exists()
    code, _, err = run(capsys, "export", str(checkpoints["lora"]), "--out", str(tmp_path / "lora-out"))
    assert code == 0 and (tmp_path / "lora-out" / "pytorch_lora_weights.safetensors").is_file(), err


# ---- report, status and cancel, cache inspect, submit --output ----------------------------------

def test_report_of_a_directory_that_holds_no_run_is_one_line(capsys, tmp_path):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "metrics-rank00000.jsonl").write_text('[1, 2]\n{"step": "one"}\nnot json\n{"loss": 1.0}\n')
    (garbage / "metrics-rank00001.jsonl").write_bytes(os.urandom(200))
    for run_dir in (garbage, tmp_path):
        one_line(*run(capsys, "report", str(run_dir))[::2], "no training metrics", "not a run directory")
    assert not (garbage / "report.html").exists() and not (tmp_path / "report.html").exists()
    one_line(*run(capsys, "report", str(tmp_path / "nope"))[::2], "no such run directory")


@pytest.mark.parametrize("command", ["status", "cancel", "logs"])
@pytest.mark.parametrize(("content", "expected"), [
    (b'{"job_id": "12", "sched', "not a job record sd35dist can read (Unterminated string"),
    (b"\xff\xfe garbage", "not a job record sd35dist can read ("),
    (b"[1, 2]", "not a job record sd35dist wrote (a JSON list, not an object)"),
    (b'{"job_id": 12, "scheduler": "local"}', "not a job record sd35dist wrote (job_id is missing or not a string)"),
    (b'{"job_id": "1; rm -rf ~", "scheduler": "local", "run_dir": "/r", "submitit_folder": "/s"}',
     "not a job record sd35dist wrote (job_id '1; rm -rf ~' is not a number)"),
], ids=["cut", "binary", "a-list", "numbers", "not-a-pid"])
def test_a_corrupt_job_record_is_one_line(capsys, tmp_path, command, content, expected):
    (tmp_path / "job.json").write_bytes(content)
    one_line(*run(capsys, command, str(tmp_path))[::2], f"{tmp_path / 'job.json'}", expected)


@pytest.mark.parametrize("option", ["novalue", "=value", ""])
def test_cache_inspect_storage_option_without_a_key_is_one_line(capsys, tmp_path, option):
    one_line(*run(capsys, "cache", "inspect", str(tmp_path), "--storage-option", option)[::2],
             "argument --storage-option: expected KEY=VALUE")


@pytest.mark.parametrize("where", ["missing directory", "a directory itself", "under a file"])
def test_submit_output_where_no_script_can_be_written_leaves_no_run_directory(capsys, tmp_path, where):
    profile = tmp_path / "local.yaml"
    profile.write_text(yaml.safe_dump({"scheduler": "local", "run_root": str(tmp_path / "runs")}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "model": {"pretrained": "/m"}, "data": {"cache_url": "/c"},
                                      "output": {"dir": str(tmp_path / "out")}}))
    (tmp_path / "a-file").write_text("x")
    output = {"missing directory": tmp_path / "no" / "such" / "job.sh", "a directory itself": tmp_path,
              "under a file": tmp_path / "a-file" / "job.sh"}[where]
    one_line(*run(capsys, "submit", "--profile", str(profile), "--recipe", str(recipe), "--job", "preflight",
                  "--output", str(output))[::2], f"error: --output: {output}: ")
    assert not (tmp_path / "runs").exists(), "no orphan run directory"
