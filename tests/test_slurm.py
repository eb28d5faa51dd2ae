"""Jobs on a real two-node Slurm cluster (slurm/devcluster.sh: n1 and n2 on this host).

The cluster starts once per test session; if it cannot start the tests fail with the
daemons' logs — they are never skipped.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli_runs import PROJECT, SECRET, all_text_under, sd35dist, tiny_recipe, wait_for

pytestmark = pytest.mark.slurm


def _assert_two_node_report(run_dir: Path) -> dict:
    report = json.loads((run_dir / "preflight.json").read_text())
    assert report["ok"] is True, report.get("failures")
    assert report["world_size"] == 2
    assert report["nodes"] == ["n1", "n2"]
    assert report["allreduce"]["ok"] is True
    assert report["slurm"]["job_id"]
    return report


def test_submitit_preflight_crosses_both_nodes(slurm_env, tmp_path):
    env = dict(slurm_env, SD35DIST_TEST_SECRET=SECRET)
    run_dir = tmp_path / "run"
    proc = sd35dist(
        "submit", "--profile", "slurm-dev", "--job", "preflight", "--recipe", str(tiny_recipe(tmp_path)),
        "--run-dir", str(run_dir), "--set", "env.passthrough=[SD35DIST_TEST_SECRET]", "--wait", env=env,
    )
    assert "ended: COMPLETED" in proc.stdout, proc.stdout + proc.stderr
    report = _assert_two_node_report(run_dir)
    job_id = json.loads((run_dir / "job.json").read_text())["job_id"]
    assert str(report["slurm"]["job_id"]) == job_id
    assert f"{job_id} COMPLETED" in sd35dist("status", job_id, env=env).stdout
    assert "rendezvous 127.0.0.1:" in sd35dist("logs", str(run_dir), env=env).stdout
    assert SECRET not in all_text_under(run_dir) + proc.stdout + proc.stderr


def test_rendered_script_runs_with_plain_sbatch(slurm_env, tmp_path):
    run_dir = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    sd35dist(
        "submit", "--profile", "slurm-dev", "--job", "preflight", "--recipe", str(tiny_recipe(tmp_path)),
        "--run-dir", str(run_dir), "--output", str(script), env=slurm_env,
    )
    assert not (run_dir / "job.json").exists(), "--output must not submit"
    proc = subprocess.run(["sbatch", "--parsable", "--wait", str(script)], capture_output=True, text=True,
                          env=slurm_env, cwd=tmp_path, timeout=300)
    job_id = proc.stdout.strip().split(";")[0]
    out = run_dir / "logs" / f"{job_id}.out"
    assert proc.returncode == 0, f"{proc.stderr}\n{out.read_text() if out.exists() else ''}"
    _assert_two_node_report(run_dir)
    # slurm-dev's rdzv_port is 29511; each job adds its id modulo the profile's port span.
    rendezvous = re.search(r"rendezvous 127\.0\.0\.1:(\d+)", out.read_text())
    assert rendezvous and int(rendezvous.group(1)) >= 29511, out.read_text()
    # Not recorded by `sd35dist submit`, but Slurm knows it: status and logs still find it.
    assert f"{job_id} COMPLETED" in sd35dist("status", job_id, env=slurm_env).stdout
    assert rendezvous.group(0) in sd35dist("logs", job_id, env=slurm_env).stdout


def test_unknown_job_ids_say_no_such_job(slurm_env, tmp_path):
    """Neither recorded here nor known to Slurm: one line and exit 2, never UNKNOWN, "no logs
    yet" or a scancel traceback."""
    for command in ("status", "logs", "cancel"):
        proc = sd35dist(command, "999999", env=slurm_env, check=False)
        assert (proc.returncode, proc.stdout) == (2, ""), proc.stdout + proc.stderr
        assert proc.stderr.splitlines() == [
            "error: 999999: no such job: not submitted from this account, and Slurm knows no job with this id"
        ]
        proc = sd35dist(command, str(tmp_path / "no-run"), env=slurm_env, check=False)
        assert proc.returncode == 2 and proc.stderr.splitlines() == [f"error: {tmp_path / 'no-run'}: no such run directory"]


def test_status_logs_cancel_on_a_running_job(slurm_env, tmp_path):
    run_dir = tmp_path / "run"
    sd35dist(
        "submit", "--profile", "slurm-dev", "--job", "preflight", "--recipe", str(tiny_recipe(tmp_path)),
        "--run-dir", str(run_dir), "--set", 'setup.lines=["echo setup-started-marker", "sleep 300"]', env=slurm_env,
    )
    job_id = json.loads((run_dir / "job.json").read_text())["job_id"]
    wait_for(lambda: "RUNNING" in sd35dist("status", job_id, env=slurm_env).stdout, 60, "RUNNING")
    wait_for(lambda: "setup-started-marker" in sd35dist("logs", job_id, env=slurm_env, check=False).stdout,
              30, "the job's log")
    assert "cancelled" in sd35dist("cancel", str(run_dir), env=slurm_env).stdout
    wait_for(lambda: "CANCELLED" in sd35dist("status", job_id, env=slurm_env).stdout, 60, "CANCELLED")
    squeue = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, env=slurm_env).stdout
    assert squeue.strip() == ""


def test_cache_job_builds_across_both_nodes(slurm_env, tiny_model, tmp_path):
    from sd35dist.data.manifest import read_manifest
    from sd35dist.data.storage import Store
    from tests.cache_runs import write_inputs, write_recipe
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, write_inputs(tmp_path / "images"),
                          str(tmp_path / "cache"))
    proc = sd35dist("submit", "--profile", "slurm-dev", "--job", "cache", "--recipe", str(recipe),
                    "--run-dir", str(tmp_path / "run"), "--wait", env=slurm_env)
    assert "ended: COMPLETED" in proc.stdout, proc.stdout + proc.stderr
    manifest = read_manifest(Store(str(tmp_path / "cache")))
    assert manifest.total_samples == 25 and manifest.rejected == 5
    journals = [json.loads(p.read_text()) for p in sorted((tmp_path / "cache" / "progress").iterdir())]
    assert len(journals) == 2 and all(j["complete"] for j in journals), journals
    assert sorted(j["built_by"]["node"] for j in journals) == ["n1", "n2"], "each node built one of the two input shards"
    assert sorted(j["built_by"]["rank"] for j in journals) == [0, 1], journals


@pytest.mark.s3
def test_requeued_training_job_resumes_and_ends_with_the_uninterrupted_loss(slurm_env, s3_server, cache, tmp_path):
    """Train the tiny recipe on n1+n2 streaming from the S3-protocol server, submitted with `--wait`;
    `scontrol requeue` mid-run (SIGTERM to the job, as a preemption): ranks save, the job comes back
    with SLURM_RESTART_COUNT=1, resumes from latest and ends with the uninterrupted run's loss, and
    `--wait` follows it through the requeue until it really ends (exit 0)."""
    from tests.train_runs import losses, train, train_recipe
    _, cache_dir = cache
    client = s3_server.client()
    client.create_bucket(Bucket="slurm-train")
    for path in sorted(cache_dir.rglob("*")):
        if path.is_file():
            client.put_object(Bucket="slurm-train", Key=f"cache/{path.relative_to(cache_dir)}", Body=path.read_bytes())

    def recipe(name: str) -> Path:
        path = train_recipe(tmp_path / f"{name}.yaml", cache, tmp_path / f"out-{name}",
                            max_train_steps=60, checkpointing_steps=20)
        data = yaml.safe_load(path.read_text())
        data["data"] = {"cache_url": "s3://slurm-train/cache", "storage_options": s3_server.storage_options}
        path.write_text(yaml.safe_dump(data))
        return path

    env = dict(slurm_env, **s3_server.env)
    reference = tmp_path / "reference-run"  # uninterrupted, the same world size (2), plain torchrun
    train(recipe("reference"), reference, env=env)
    expected = losses(reference)

    run_dir = tmp_path / "run"
    waiting = subprocess.Popen([sys.executable, "-m", "sd35dist", "submit", "--profile", "slurm-dev", "--recipe",
                                str(recipe("slurm")), "--run-dir", str(run_dir), "--wait"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=PROJECT)
    try:
        wait_for(lambda: (run_dir / "job.json").exists(), 60, "the submission")
        job_id = json.loads((run_dir / "job.json").read_text())["job_id"]
        metrics = run_dir / "metrics-rank00000.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, 120, "training to start")
        subprocess.run(["scontrol", "requeue", job_id], check=True, env=env)
        output, _ = waiting.communicate(timeout=300)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, output[-4000:]
    assert f"job {job_id} requeued" in output and f"job {job_id} ended: COMPLETED" in output, output[-4000:]
    assert "COMPLETED" in sd35dist("status", job_id, env=env).stdout
    logs = sd35dist("logs", job_id, env=env).stdout
    assert "requeued by Slurm (SIGTERM)" in logs, logs[-3000:]
    assert "SLURM_RESTART_COUNT=1" in logs
    got = losses(run_dir)
    assert got[60] == expected[60], "the requeued run ends with the uninterrupted run's loss"
    assert sorted(got) == list(range(1, 61))
