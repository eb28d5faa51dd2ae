"""`sd35dist submit --profile local` through submitit's local executor, end to end; what `--wait` prints."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import yaml

from tests.cli_runs import SECRET, all_text_under, sd35dist, tiny_recipe, venv_env


@pytest.fixture(scope="module")
def finished_local_job(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("local")
    env = venv_env(SD35DIST_STATE_DIR=str(tmp_path / "state"), SD35DIST_TEST_SECRET=SECRET)
    run_dir = tmp_path / "run"
    proc = sd35dist(
        "submit", "--profile", "local", "--job", "preflight", "--recipe", str(tiny_recipe(tmp_path)),
        "--run-dir", str(run_dir), "--set", "env.passthrough=[SD35DIST_TEST_SECRET]", "--wait", env=env,
    )
    return tmp_path, env, run_dir, proc


@pytest.mark.dist
def test_local_preflight_report(finished_local_job):
    _, _, run_dir, proc = finished_local_job
    assert "submitted job" in proc.stdout and "ended: COMPLETED" in proc.stdout
    report = json.loads((run_dir / "preflight.json").read_text())
    assert report["ok"] is True
    assert report["world_size"] == 2
    assert report["allreduce"]["ok"] is True
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "job.sh").is_file()


@pytest.mark.dist
def test_status_and_logs_by_id_and_by_run_dir(finished_local_job):
    _, env, run_dir, _ = finished_local_job
    job_id = json.loads((run_dir / "job.json").read_text())["job_id"]
    for ref in (job_id, str(run_dir)):
        status = sd35dist("status", ref, env=env).stdout
        assert f"{job_id} COMPLETED" in status
        logs = sd35dist("logs", ref, env=env).stdout
        assert "preflight" in logs.lower()


@pytest.mark.dist
def test_secret_value_is_written_nowhere(finished_local_job):
    tmp_path, _, run_dir, proc = finished_local_job
    assert "SD35DIST_TEST_SECRET" in (run_dir / "job.sh").read_text()  # passed by name...
    assert SECRET not in all_text_under(run_dir, tmp_path / "state")  # ...never by value
    assert SECRET not in proc.stdout + proc.stderr


@pytest.mark.dist
def test_cancel_stops_the_whole_process_tree(tmp_path):
    env = venv_env(SD35DIST_STATE_DIR=str(tmp_path / "state"))
    run_dir = tmp_path / "run"
    sd35dist(
        "submit", "--profile", "local", "--job", "preflight", "--recipe", str(tiny_recipe(tmp_path)),
        "--run-dir", str(run_dir), "--set", 'setup.lines=["sleep 300"]', env=env,
    )
    record = json.loads((run_dir / "job.json").read_text())
    job_id = record["job_id"]
    assert record["process"]["pid"] == int(job_id) and record["process"]["cmdline"], "the id is bound to its process"
    try:
        assert "RUNNING" in sd35dist("status", job_id, env=env).stdout
        deadline = time.monotonic() + 60
        while not (sleepers := _processes_under(int(job_id), "sleep 300")):
            assert time.monotonic() < deadline, "the job's setup line never started"
            time.sleep(0.2)
    finally:
        assert "cancelled" in sd35dist("cancel", job_id, env=env).stdout
    assert "RUNNING" not in sd35dist("status", job_id, env=env).stdout
    again = sd35dist("cancel", job_id, env=env, check=False)
    assert again.returncode == 2 and "nothing was signalled" in again.stderr, "an ended job is not signalled again"
    for pid in sleepers:
        assert not _running(pid), f"process {pid} of the cancelled job is still running"


def _running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _processes_under(root: int, cmdline: str) -> list[int]:
    from launcher.local_process import descendants

    found = []
    for pid in descendants(root):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip().decode() == cmdline:
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.dist
def test_a_failing_job_with_wait_is_its_line(tmp_path, tiny_model):
    """A mistake the ranks meet (here: a cache that was never built) ends `submit --wait` with the
    ranks' one line and the job's own exit status, 2 — no submitit traceback after it."""
    env = venv_env(SD35DIST_STATE_DIR=str(tmp_path / "state"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "tiny", "model": {"pretrained": str(tiny_model)},
                                      "data": {"cache_url": str(tmp_path / "no-cache"),
                                               "datasets": [{"id": "d", "source": str(tmp_path)}]},
                                      "output": {"dir": str(tmp_path / "out")}, "logging": {"report_to": "none"}}))
    proc = sd35dist("submit", "--profile", "local", "--recipe", str(recipe), "--run-dir", str(tmp_path / "run"),
                    "--wait", env=env, check=False)
    everything = proc.stdout + proc.stderr
    assert proc.returncode == 2, everything
    assert "Traceback" not in everything and "RuntimeError" not in everything, everything
    errors = [line for line in everything.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no manifest" in errors[0], everything
    assert proc.stdout.rstrip().splitlines()[-1].endswith("ended: FAILED (exit status 2)"), proc.stdout
    job_id = json.loads((tmp_path / "run" / "job.json").read_text())["job_id"]
    assert f"{job_id} FAILED" in sd35dist("status", job_id, env=env).stdout


@pytest.mark.unit
def test_wait_prints_whole_lines_of_the_two_logs(tmp_path, monkeypatch):
    """`--wait` prints the job's .out and .err logs in turn as they grow: a line cut at one read (a progress
    bar, which ends its lines with \r) must not run into the other log's next line."""
    from launcher import cli, job_control

    out_log, err_log = tmp_path / "7_0_log.out", tmp_path / "7_0_log.err"
    out_log.write_bytes(b"")
    err_log.write_bytes(b"caching: 10img\rcaching: 36img")  # the bar so far; its line is not ended yet
    polls = iter([None, "grown", "COMPLETED"])

    def ended_state(record):
        state = next(polls)
        if state == "grown":
            out_log.write_bytes(b"cache runs/demo/cache: 32 samples\n")
            err_log.write_bytes(err_log.read_bytes() + b"\rcaching: 38img\n")
            return None
        if state == "COMPLETED":
            out_log.write_bytes(out_log.read_bytes() + b"done, unterminated")
        return state

    monkeypatch.setattr(job_control, "ended_state", ended_state)
    printed = io.StringIO()
    record = {"job_id": "7", "scheduler": "local", "submitit_folder": str(tmp_path)}
    assert cli._follow(record, out=printed, poll_s=0) == "COMPLETED"
    assert printed.getvalue().splitlines() == [
        "caching: 10img", "cache runs/demo/cache: 32 samples", "caching: 36img", "caching: 38img", "done, unterminated"]
