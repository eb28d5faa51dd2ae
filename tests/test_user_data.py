"""User data is sacred (issue 19, data loss): a reused PID is never signalled, a cache belongs to the
dataset list that built it, an older checkpoint never overwrites the newer branch, no command
replaces a user's file unless asked, and files others read get the user's umask modes.

Pure or single-process parts; the real 2-rank runs are in test_train.py and test_cache_build.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from launcher.local_process import ProcessIdentity, read_identity
from sd35dist.checkpoint.layout import BRANCH, BranchConflict, CheckpointDir, branch_record
from sd35dist.cli import main
from sd35dist.config.recipe import DataSection
from sd35dist.data.cache_identity import dataset_identity, differences, foreign_cache
from sd35dist.data.manifest import MANIFEST_FORMAT
from sd35dist.data.storage import Store
from sd35dist.runtime.atomic_files import staged_directory

# ---- local job ids are bound to their process -------------------------------------------------


@pytest.fixture
def bystander():
    """A live process that is not ours to stop: the PID a finished job's id now names."""
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _local_record(tmp_path: Path, pid: int, process: dict | None) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"job_id": str(pid), "scheduler": "local", "run_dir": str(run_dir),
              "submitit_folder": str(run_dir / "submitit")}
    if process is not None:
        record["process"] = process
    (run_dir / "job.json").write_text(json.dumps(record))
    return run_dir


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


@pytest.mark.process
@pytest.mark.parametrize("case", ["pid-reused", "recorded-before-identities"])
def test_a_pid_that_now_names_another_process_is_never_signalled(tmp_path, capsys, bystander, case):
    real = read_identity(bystander.pid)
    assert real is not None
    # The job that had this PID started earlier and ran python; the bystander is `sleep`.
    earlier = ProcessIdentity(real.pid, real.start_ticks - 100, real.pgid, ("python", "-m", "submitit"))
    run_dir = _local_record(tmp_path, bystander.pid, earlier.to_record() if case == "pid-reused" else None)
    code, out, err = _cli(capsys, "status", str(run_dir))
    assert code == 0 and "RUNNING" not in out
    assert out.split()[1] == ("INTERRUPTED" if case == "pid-reused" else "UNKNOWN"), out
    code, out, err = _cli(capsys, "cancel", str(run_dir))
    assert code == 2 and len(err.splitlines()) == 1 and "nothing was signalled" in err, err
    time.sleep(0.3)
    assert bystander.poll() is None, "the unrelated process was signalled"
    assert read_identity(bystander.pid) == real, "and not even stopped"


@pytest.mark.process
def test_the_recorded_process_itself_is_running_and_cancelled(tmp_path, capsys, bystander):
    """The same check passes for the process the record names: status says RUNNING, cancel stops it."""
    run_dir = _local_record(tmp_path, bystander.pid, read_identity(bystander.pid).to_record())
    code, out, _ = _cli(capsys, "status", str(run_dir))
    assert code == 0 and out.split()[1] == "RUNNING"
    code, out, _ = _cli(capsys, "cancel", str(run_dir))
    assert code == 0 and "cancelled" in out
    assert bystander.wait(timeout=15) == -signal.SIGTERM


CORRUPT_RECORDS = {
    "not-json": "{job_id: 12",
    "a-list": "[1, 2]",
    "not-utf8": b"\xff\xfe\x00garbage",
    "job-id-not-a-number": json.dumps({"job_id": "rm -rf", "scheduler": "local", "run_dir": "", "submitit_folder": ""}),
    "unknown-scheduler": json.dumps({"job_id": "12", "scheduler": "pbs", "run_dir": "", "submitit_folder": ""}),
    "missing-keys": json.dumps({"job_id": "12"}),
    "bad-process": json.dumps({"job_id": "12", "scheduler": "local", "run_dir": "", "submitit_folder": "",
                               "process": {"pid": "x"}}),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", list(CORRUPT_RECORDS))
@pytest.mark.parametrize("command", ["status", "cancel", "logs"])
def test_a_corrupt_job_record_is_one_line(tmp_path, capsys, monkeypatch, case, command):
    monkeypatch.setenv("SD35DIST_STATE_DIR", str(tmp_path / "state"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    content = CORRUPT_RECORDS[case]
    (run_dir / "job.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    index = tmp_path / "state" / "jobs"
    index.mkdir(parents=True)
    (index / "local-12").write_text(f"{run_dir}\n")
    for ref in (str(run_dir), "12"):
        code, out, err = _cli(capsys, command, ref)
        assert code == 2 and out == "" and len(err.splitlines()) == 1, (ref, err)
        assert err.startswith(f"error: {run_dir / 'job.json'}: not a job record sd35dist"), err


# ---- a cache belongs to the dataset list that built it -----------------------------------------


def _data(tmp_path: Path, **changes) -> DataSection:
    datasets = [{"id": "photos", "source": str(tmp_path / "photos"), "repeats": 2},
                {"id": "art", "source": str(tmp_path / "art"), "caption_strategy": "filename"}]
    return DataSection.model_validate({"cache_url": str(tmp_path / "cache"), "datasets": datasets, **changes})


@pytest.mark.unit
def test_the_identity_names_what_differs(tmp_path):
    base = dataset_identity(_data(tmp_path))
    assert differences(base, dataset_identity(_data(tmp_path))) == []
    assert differences(base, dataset_identity(_data(tmp_path, shuffle_seed=7, cache_dtype="fp32"))) == [
        "shuffle_seed", "cache_dtype"]
    other = _data(tmp_path)
    other = other.model_copy(update={"datasets": [other.datasets[0].model_copy(update={"source": "/elsewhere"}),
                                                  other.datasets[1]]})
    assert differences(base, dataset_identity(other)) == ["datasets.0.source"]
    fewer = _data(tmp_path).model_copy(update={"datasets": _data(tmp_path).datasets[:1]})
    assert differences(base, dataset_identity(fewer)) == ["datasets (2 entries, now 1)"]
    # Settings that change how shards are cut, not what a sample holds, are not part of it.
    assert differences(base, dataset_identity(_data(tmp_path, shard_target_mb=1.0, cache_batch_size=9))) == []


def _manifest(identity: dict | None) -> bytes:
    entry = {"path": "empty_prompt.safetensors", "bucket": "", "samples": 1, "bytes": 1, "sha256": "0" * 64,
             "dtype": "bf16"}
    data = {"format": MANIFEST_FORMAT, "shards": [], "empty_prompt": entry, "dtype": "bf16", "max_sequence_length": 256}
    if identity is not None:
        data["dataset_identity"] = identity
    return json.dumps(data).encode()


@pytest.mark.unit
def test_a_built_or_half_built_cache_of_another_list_is_foreign(tmp_path):
    mine, theirs = dataset_identity(_data(tmp_path)), dataset_identity(_data(tmp_path, shuffle_seed=3))
    store = Store(str(tmp_path / "cache"))
    assert foreign_cache(store, mine) is None, "an empty place is anyone's"
    store.write_bytes("progress/w0002-r00001.json", json.dumps({"dataset_identity": theirs}).encode())
    assert "differs in shuffle_seed" in foreign_cache(store, mine) and "under way" in foreign_cache(store, mine)
    assert foreign_cache(store, theirs) is None, "resuming its own build"
    store.write_bytes("manifest.json", _manifest(theirs))
    assert "differs in shuffle_seed" in foreign_cache(store, mine)
    assert foreign_cache(store, theirs) is None, "rebuilding the same datasets"
    store.write_bytes("manifest.json", _manifest(None))
    assert "did not record which datasets built it" in foreign_cache(store, theirs)


# ---- an older checkpoint never overwrites the newer branch -------------------------------------


def _checkpoint(ckpts: CheckpointDir, step: int, **info) -> Path:
    (ckpts.begin(step) / "payload").write_text(str(step))
    return ckpts.commit(step, {"world_size": 2, **info})


@pytest.mark.unit
def test_resuming_an_older_checkpoint_in_place_is_refused(tmp_path):
    ckpts = CheckpointDir(tmp_path / "out")
    two, four = _checkpoint(ckpts, 2), _checkpoint(ckpts, 4)
    with pytest.raises(BranchConflict, match=r"would overwrite step-00000004 and rotation would then remove "
                                             r"step-00000002; to branch from it, set output.dir to a new directory"):
        ckpts.branch_start(two, run_dir=str(tmp_path / "run"))
    assert ckpts.branch_start(four, run_dir=None) == four, "the newest: an ordinary continuation"
    fresh = CheckpointDir(tmp_path / "branch")
    assert fresh.branch_start(two, run_dir=None) == two, "an empty output.dir: a new branch"
    elsewhere = CheckpointDir(tmp_path / "other")
    _checkpoint(elsewhere, 1)
    with pytest.raises(BranchConflict, match="already holds checkpoints up to step-00000001 of another run"):
        elsewhere.branch_start(four, run_dir=None)


@pytest.mark.unit
def test_a_restart_of_the_branching_run_continues_its_branch(tmp_path):
    origin = _checkpoint(CheckpointDir(tmp_path / "out"), 2)
    run_dir = str(tmp_path / "run")
    branch = CheckpointDir(tmp_path / "branch")
    newest = _checkpoint(branch, 4, **{BRANCH: branch_record(origin, run_dir)})
    assert branch.branch_start(origin, run_dir=run_dir) == newest, "a restart or requeue of the same run"
    with pytest.raises(BranchConflict):
        branch.branch_start(origin, run_dir=str(tmp_path / "another-run"))  # a new submission: refused


@pytest.mark.unit
def test_submit_refuses_a_resume_that_would_overwrite_newer_checkpoints(tmp_path, capsys):
    ckpts = CheckpointDir(tmp_path / "out")
    two = _checkpoint(ckpts, 2)
    _checkpoint(ckpts, 4)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    profile, recipe = _submit_inputs(tmp_path, resume=str(two))
    code, out, err = _cli(capsys, "submit", "--profile", str(profile), "--recipe", str(recipe), "--dry-run")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: myrecipe.yaml: train.resume: ") and "set output.dir to a new directory" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before
    profile, recipe = _submit_inputs(tmp_path, resume=str(two), output=tmp_path / "branch")
    code, out, err = _cli(capsys, "submit", "--profile", str(profile), "--recipe", str(recipe), "--dry-run")
    assert code == 0, err


# ---- no command replaces a user's file unless asked ---------------------------------------------


def _submit_inputs(tmp_path: Path, resume: str = "latest", output: Path | None = None) -> tuple[Path, Path]:
    profile = tmp_path / "mycluster.yaml"
    profile.write_text(yaml.safe_dump({"scheduler": "slurm", "run_root": str(tmp_path / "runs"),
                                       "slurm": {"partition": "dev", "nodes": 1, "time": "00:10:00"}}))
    recipe = tmp_path / "myrecipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "model": {"pretrained": str(tmp_path / "model")},
                                      "data": {"cache_url": "s3://bucket/cache"},  # not checked from here
                                      "train": {"resume": resume},
                                      "output": {"dir": str(output or tmp_path / "out")}}))
    return profile, recipe


@pytest.mark.unit
def test_submit_output_replaces_nothing_unless_forced(tmp_path, capsys):
    profile, recipe = _submit_inputs(tmp_path)
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes\n")
    recipe_text = recipe.read_text()
    base = ["submit", "--profile", str(profile), "--recipe", str(recipe), "--job", "preflight"]
    refusals = {
        str(mine): "already exists: pass --force",
        str(recipe): "is a file this submission reads",
        str(tmp_path / "missing" / "job.sbatch"): "does not exist",
        str(tmp_path): "is a directory",
    }
    for target, expected in refusals.items():
        code, out, err = _cli(capsys, *base, "--output", target)
        assert code == 2 and len(err.splitlines()) == 1 and expected in err, (target, err)
        assert not (tmp_path / "runs").exists(), "a refusal leaves no run directory behind"
    code, _, err = _cli(capsys, *base, "--output", str(recipe), "--force")
    assert code == 2 and "is a file this submission reads" in err, "not even with --force"
    assert mine.read_text() == "my notes\n" and recipe.read_text() == recipe_text
    code, out, err = _cli(capsys, *base, "--output", str(mine), "--force")
    assert code == 0, err
    assert mine.read_text().startswith("#!/bin/bash") and len(list((tmp_path / "runs").iterdir())) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".notes.txt")], "no temporary left"


@pytest.mark.unit
def test_report_out_replaces_nothing_unless_forced(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics-rank00000.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4}) + "\n" for s in range(1, 5)))
    out = tmp_path / "shared"
    out.mkdir()
    (out / "report.html").write_text("someone's report")
    code, _, err = _cli(capsys, "report", str(run_dir), "--out", str(out))
    assert code == 2 and len(err.splitlines()) == 1 and "already exists: pass --force" in err, err
    assert (out / "report.html").read_text() == "someone's report" and not (out / "plots").exists()
    (tmp_path / "afile").write_text("x")
    code, _, err = _cli(capsys, "report", str(run_dir), "--out", str(tmp_path / "afile"))
    assert code == 2 and "is a file" in err
    code, _, err = _cli(capsys, "report", str(run_dir), "--out", str(out), "--force")
    assert code == 0, err
    assert "<html" in (out / "report.html").read_text() and (out / "plots" / "loss.png").stat().st_size > 0


@pytest.mark.unit
def test_sample_and_sweep_out_replace_no_earlier_grid_unless_forced(tmp_path, capsys):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "grid.png").write_bytes(b"someone's grid")
    commands = {"sample": ["sample", str(tmp_path), "--prompt", "a fox", "--out", str(out)],
                "sweep": ["sweep", str(tmp_path), "--out", str(out)]}
    for argv in commands.values():
        code, _, err = _cli(capsys, *argv)
        assert code == 2 and err == f"error: --out {out}: holds an earlier grid.png: pass --force to replace it, " \
                                    "or choose another --out", err
        code, _, err = _cli(capsys, *argv, "--force")
        assert code == 2 and "grid.png" not in err, "--force passes the check (this SOURCE fails the next one)"
    assert (out / "grid.png").read_bytes() == b"someone's grid"


# ---- files others read get the user's umask modes ------------------------------------------------


@contextlib.contextmanager
def _umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


@pytest.mark.unit
@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_published_files_get_the_umask_modes_not_0600(tmp_path, mask, file_mode, dir_mode):
    """Libraries that write through a private temporary (safetensors: 0600) do not decide who reads
    exports and checkpoints; the umask does, as for any file the user writes."""
    with _umask(mask):
        with staged_directory(tmp_path / "export") as staging:
            (staging / "weights.safetensors").write_bytes(b"w")
            (staging / "weights.safetensors").chmod(0o600)
            (staging / "sub").mkdir(mode=0o700)
            (staging / "tool.py").write_text("#!")
            (staging / "tool.py").chmod(0o744)
        ckpts = CheckpointDir(tmp_path / "out")
        partial = ckpts.begin(2)
        (partial / "ema-rank00000.safetensors").write_bytes(b"e")
        (partial / "ema-rank00000.safetensors").chmod(0o600)
        published = ckpts.commit(2, {"world_size": 1})
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "export" / "weights.safetensors") == file_mode
    assert mode(tmp_path / "export") == dir_mode and mode(tmp_path / "export" / "sub") == dir_mode
    assert mode(tmp_path / "export" / "tool.py") == dir_mode, "an executable stays executable"
    assert mode(published / "ema-rank00000.safetensors") == file_mode
    assert mode(published / "COMPLETE") == file_mode
