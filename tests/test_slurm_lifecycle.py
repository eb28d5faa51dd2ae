"""Every Slurm lifecycle event a training job meets, on the real two-node cluster.

The cluster tracks processes by cgroup (as production clusters do), so a save finished by
orphaned workers after their step ended cannot pass; each test also checks that no process
of the job is left once Slurm says it ended. Expected end states:

| event                         | Slurm's final state | checkpoint                    | log says        |
|-------------------------------|---------------------|-------------------------------|-----------------|
| scancel / sd35dist cancel     | CANCELLED, no requeue | latest complete (maybe a final one) | cancelled |
| time-limit warning (USR1)     | REQUEUED by the batch shell; the next run resumes | saved at the warning | time limit |
| node failure                  | NODE_FAIL, requeued, COMPLETED | resumed from latest  | SLURM_RESTART_COUNT=1 |
| kill -9 of a rank (default max_restarts 3) | COMPLETED (torchrun restarts the workers) | resumed from latest | uninterrupted loss |
| a rank killed more often than max_restarts | FAILED | latest complete | after 1 of 1 restarts |
| a mistake (corrupt shard)     | FAILED, exit code 2, no restart | — | one error line, not restarted |
| two jobs sharing nodes        | both COMPLETED, each on its own rendezvous port | — | — |

`scontrol requeue` of a running job (and `submit --wait` following it): test_slurm.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sd35dist.checkpoint.layout import CheckpointDir
from sd35dist.data.manifest import read_manifest
from sd35dist.data.storage import Store
from tests.cli_runs import sd35dist, tiny_recipe, wait_for
from tests.train_runs import losses, train, train_recipe

pytestmark = pytest.mark.slurm


def sacct_states(job_id: str, env: dict[str, str]) -> list[str]:
    """Every attempt of the job (a requeued job has one row per run), oldest first."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", job_id, "-o", "State"], capture_output=True,
                         text=True, env=env).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def final_state(job_id: str, env: dict[str, str], timeout_s: float = 240) -> str:
    """Slurm's state once the job has left the queue for good."""
    def ended():
        queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, env=env).stdout
        states = sacct_states(job_id, env)
        return not queued.strip() and states and states[-1].split()[0] not in ("RUNNING", "PENDING", "REQUEUED")
    wait_for(ended, timeout_s, f"job {job_id} to end")
    return sacct_states(job_id, env)[-1]


def node_state(node: str, env: dict[str, str]) -> str:
    return subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], capture_output=True, text=True,
                          env=env).stdout.strip()


def job_processes(run_dir: Path) -> list[int]:
    """PIDs whose command line names the run directory (torchrun agents and ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(run_dir) in cmdline:
            found.append(int(entry.name))
    return found


def rank_pids(run_dir: Path) -> list[int]:
    """Training ranks only (not their torchrun agents)."""
    pids = []
    for pid in job_processes(run_dir):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # A rank forked warm (sd35dist/jobs/warm_ranks.py) shows its command line as one title.
        words = " ".join(w.decode(errors="replace") for w in cmdline).split()
        if "sd35dist" in words and "train" in words and not any(w.endswith("torchrun") for w in words):
            pids.append(pid)
    return pids


def what_the_job_is_doing(run_dir: Path, job_id: str) -> str:
    """For a failure message: each process of the job with the kernel function it waits in, and the logs' tails."""
    rows = []
    for pid in job_processes(run_dir):
        try:
            wchan = Path(f"/proc/{pid}/wchan").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
        except OSError:
            continue
        rows.append(f"  {pid} waits in {wchan or '-'}: {cmd}")
    return "processes:\n" + "\n".join(rows) + "\nlog tail:\n" + logs(run_dir, job_id)[-4000:]


def logs(run_dir: Path, job_id: str) -> str:
    return "".join(p.read_text(errors="replace") for p in (run_dir / "logs" / f"{job_id}.out",
                                                           run_dir / "logs" / f"{job_id}.err") if p.exists())


def metric_steps(run_dir: Path) -> int:
    path = run_dir / "metrics-rank00000.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def submit_training(tmp_path: Path, cache, env, name: str, *sets: str, **train_settings) -> tuple[str, Path, Path]:
    settings = {"max_train_steps": 400, "checkpointing_steps": 4, "checkpoints_total_limit": 2,
                "gradient_checkpointing": False, "ema": {"enabled": False}, **train_settings}
    recipe = train_recipe(tmp_path / f"{name}.yaml", cache, tmp_path / f"out-{name}", **settings)
    run_dir = tmp_path / f"run-{name}"
    args = ["submit", "--profile", "slurm-dev", "--recipe", str(recipe), "--run-dir", str(run_dir)]
    for item in sets:
        args += ["--set", item]
    sd35dist(*args, env=env)
    job_id = json.loads((run_dir / "job.json").read_text())["job_id"]
    return job_id, run_dir, tmp_path / f"out-{name}"


def assert_nothing_left(run_dir: Path) -> None:
    """Slurm has ended the job: within a moment no process of it may remain."""
    deadline = time.monotonic() + 10
    while job_processes(run_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not job_processes(run_dir), f"processes outlived the job: {job_processes(run_dir)}"


def test_the_cluster_tracks_processes_by_cgroup(slurm_env):
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, env=slurm_env).stdout
    assert re.search(r"ProctrackType\s*=\s*proctrack/cgroup", config), "orphans must not be able to finish a save"


def test_cancel_ends_a_training_job_for_good(slurm_env, cache, tmp_path):
    """`scancel` and `sd35dist cancel`, each on its own training job (both running at once on n1+n2):
    each ends CANCELLED, is not requeued, keeps a complete checkpoint, and leaves no process."""
    jobs = {how: submit_training(tmp_path, cache, slurm_env, name) for how, name in
            (("scancel", "cancel-scancel"), ("sd35dist cancel", "cancel-sd35dist"))}
    for job_id, run_dir, _ in jobs.values():
        wait_for(lambda run_dir=run_dir: metric_steps(run_dir) >= 6, 180, f"job {job_id} to pass step 6")
    subprocess.run(["scancel", jobs["scancel"][0]], check=True, env=slurm_env)
    assert "cancelled" in sd35dist("cancel", jobs["sd35dist cancel"][0], env=slurm_env).stdout
    for job_id, _, _ in jobs.values():
        state = final_state(job_id, slurm_env)
        assert state.startswith("CANCELLED"), (job_id, state)
    time.sleep(8)  # longer than the cluster's requeue delay: a requeued job would be back by now
    for how, (job_id, run_dir, out) in jobs.items():
        assert sacct_states(job_id, slurm_env)[-1].startswith("CANCELLED"), f"{how}: a cancelled job must not come back"
        text = logs(run_dir, job_id)
        assert "cancelled" in text, (how, text[-3000:])
        assert "SLURM_RESTART_COUNT=1" not in text and "requeue" not in text.lower(), (how, text[-3000:])
        latest = CheckpointDir(out).latest()
        assert latest is not None and (latest / "COMPLETE").exists(), how
        assert_nothing_left(run_dir)


def test_time_limit_warning_saves_requeues_and_the_job_finishes(slurm_env, cache, tmp_path):
    """`--time=1` with a 30 s warning: USR1 reaches the batch shell alone, the ranks save at a step
    boundary and exit 0, the shell requeues; the second run resumes and (given more time) completes."""
    job_id, run_dir, out = submit_training(tmp_path, cache, slurm_env, "timelimit", "slurm.time=00:01:00",
                                           "slurm.signal_grace_s=30", max_train_steps=100000, checkpointing_steps=100000)
    try:
        text = wait_for(lambda: "SLURM_RESTART_COUNT=1" in logs(run_dir, job_id) and logs(run_dir, job_id), 240,
                        "the job to come back after the time-limit save")
    except AssertionError as late:  # Slurm's view too: a job that ended (TIMEOUT, FAILED) or one still running
        raise AssertionError(f"{late}\nsacct: {sacct_states(job_id, slurm_env)}\n"
                             f"{what_the_job_is_doing(run_dir, job_id)}") from None
    saved = re.search(r"time limit: saved step (\d+)", text)
    assert saved, text[-4000:]
    step = int(saved.group(1))
    assert f"resumed from {CheckpointDir(out).path(step)}" in text
    # The first run's step ended cleanly: no signal reached srun or torchrun.
    assert "User defined signal" not in text and "status -10" not in text, text[-4000:]
    assert sacct_states(job_id, slurm_env)[0] == "REQUEUED"
    # Let the second run finish: a short recipe end instead of another minute of training.
    subprocess.run(["scancel", job_id], check=True, env=slurm_env)
    assert final_state(job_id, slurm_env).startswith("CANCELLED")
    assert (CheckpointDir(out).path(step) / "COMPLETE").exists()
    assert_nothing_left(run_dir)


def test_node_failure_requeues_and_resumes(slurm_env, cache, tmp_path):
    job_id, run_dir, out = submit_training(tmp_path, cache, slurm_env, "nodefail", max_train_steps=40)
    wait_for(lambda: CheckpointDir(out).latest() is not None and metric_steps(run_dir) >= 6, 180, "a checkpoint")
    subprocess.run(["scontrol", "update", "nodename=n2", "state=down", "reason=sd35dist-test"], check=True,
                   env=slurm_env)
    try:
        wait_for(lambda: any(s.startswith("NODE_FAIL") for s in sacct_states(job_id, slurm_env)), 60, "NODE_FAIL")
    finally:
        # slurmd on n2 is alive, so Slurm may return the node by itself (ReturnToService=2); resume it otherwise.
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], capture_output=True, env=slurm_env)
        wait_for(lambda: "idle" in node_state("n2", slurm_env) or "alloc" in node_state("n2", slurm_env)
                 or "mix" in node_state("n2", slurm_env), 60, "n2 back in service")
    assert final_state(job_id, slurm_env, timeout_s=300) == "COMPLETED"
    text = logs(run_dir, job_id)
    assert "SLURM_RESTART_COUNT=1" in text and "resumed from " + str(CheckpointDir(out).root) in text, text[-4000:]
    assert sorted(losses(run_dir)) == list(range(1, 41))
    assert_nothing_left(run_dir)


def test_a_killed_rank_restarts_inside_the_allocation(slurm_env, cache, tmp_path):
    reference = tmp_path / "reference"
    recipe = train_recipe(tmp_path / "reference.yaml", cache, tmp_path / "out-reference", max_train_steps=30,
                          checkpointing_steps=4, gradient_checkpointing=False, ema={"enabled": False})
    train(recipe, reference)
    job_id, run_dir, out = submit_training(tmp_path, cache, slurm_env, "crash", max_train_steps=30)
    wait_for(lambda: (CheckpointDir(out).latest() is not None and metric_steps(run_dir) >= 10), 180, "step 10")
    victim = rank_pids(run_dir)[-1]
    os.kill(victim, signal.SIGKILL)
    try:  # a restart that works ends in ~90 s here; a hung one would hold CI for the whole wait
        state = final_state(job_id, slurm_env, timeout_s=180)
    except AssertionError as hung:
        raise AssertionError(f"{hung}\n{what_the_job_is_doing(run_dir, job_id)}") from None
    assert state == "COMPLETED", what_the_job_is_doing(run_dir, job_id)
    assert len(sacct_states(job_id, slurm_env)) == 1, "restarted inside the allocation, not requeued"
    got = losses(run_dir)
    assert got[30] == losses(reference)[30], "the restarted workers end with the uninterrupted run's loss"
    assert "restart" in logs(run_dir, job_id).lower()
    assert_nothing_left(run_dir)


def parent_pid(pid: int) -> int:
    """The process's parent, or -1 once it has gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def test_a_rank_that_keeps_crashing_fails_the_job_once_the_restarts_are_used_up(slurm_env, cache, tmp_path):
    job_id, run_dir, out = submit_training(tmp_path, cache, slurm_env, "crashes", "launch.max_restarts=1")
    wait_for(lambda: metric_steps(run_dir) >= 2, 180, "step 2")
    victim = rank_pids(run_dir)[-1]
    agent = parent_pid(victim)  # restarts are counted per node: kill this agent's rank each time
    os.kill(victim, signal.SIGKILL)
    again = wait_for(lambda: [p for p in rank_pids(run_dir) if p != victim and parent_pid(p) == agent], 120,
                     "the restarted rank")
    os.kill(again[0], signal.SIGKILL)
    state = final_state(job_id, slurm_env, timeout_s=180)
    text = logs(run_dir, job_id)
    assert state == "FAILED", text[-4000:]
    assert len(sacct_states(job_id, slurm_env)) == 1, "failed, not requeued"
    assert re.search(r"sd35dist: stopped: rank \d+ on \S+ was killed by signal 9 after 1 of 1 restarts inside the "
                     r"allocation", text), text[-4000:]
    assert (CheckpointDir(out).latest() is None) or (CheckpointDir(out).latest() / "COMPLETE").exists()
    assert_nothing_left(run_dir)


def test_a_mistake_fails_the_job_at_once_without_restarts(slurm_env, cache, tmp_path):
    """A corrupt shard is met again by every attempt: with the default restarts on, the job ends on the
    first, with one line, exit code 2."""
    model, cache_dir = cache
    broken = tmp_path / "cache"
    shutil.copytree(cache_dir, broken)
    shard = broken / read_manifest(Store(str(broken))).shards[0].path
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    job_id, run_dir, _ = submit_training(tmp_path, (model, broken), slurm_env, "mistake", max_train_steps=8)
    state = final_state(job_id, slurm_env, timeout_s=180)
    text = logs(run_dir, job_id)
    assert state == "FAILED", text[-4000:]
    exit_code = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "ExitCode"], capture_output=True,
                               text=True, env=slurm_env).stdout.strip()
    assert exit_code == "2:0", (exit_code, text[-4000:])
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt shard" in errors[0] and str(shard) in errors[0], text[-4000:]
    assert "will restart worker group" not in text and "(a mistake: not restarted)" in text, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert_nothing_left(run_dir)


def test_two_jobs_sharing_nodes_use_their_own_rendezvous_ports(slurm_env, cache, tmp_path):
    short_id, short_dir, _ = submit_training(tmp_path, cache, slurm_env, "short", max_train_steps=6)
    long_id, long_dir, _ = submit_training(tmp_path, cache, slurm_env, "long", max_train_steps=30)
    assert final_state(short_id, slurm_env, timeout_s=300) == "COMPLETED"
    assert final_state(long_id, slurm_env, timeout_s=300) == "COMPLETED"
    ports = []
    for job_id, run_dir in ((short_id, short_dir), (long_id, long_dir)):
        text = logs(run_dir, job_id)
        ports.append(re.search(r"rendezvous [\d.]+:(\d+)", text).group(1))
        assert "SLURM_RESTART_COUNT=1" not in text and "RendezvousConnectionError" not in text, text[-3000:]
        # The harmless-looking TCPStore traceback of a job whose store host left first: not any more.
        assert "recvVector" not in text and "recvValue" not in text and "Traceback" not in text, text[-3000:]
    assert ports[0] != ports[1]
    nodes = {job: subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "NodeList"], capture_output=True,
                                 text=True, env=slurm_env).stdout.strip() for job in (short_id, long_id)}
    assert nodes[short_id] == nodes[long_id] == "n[1-2]", "both jobs ran on both nodes at once"
    assert sorted(losses(long_dir)) == list(range(1, 31))


def test_the_script_slurm_runs_is_the_one_in_the_run_directory(slurm_env, tmp_path):
    """Submitted through submitit or by plain sbatch, Slurm holds the run directory's script byte for byte."""
    env = slurm_env
    submitted = tmp_path / "submitit-run"
    sd35dist("submit", "--profile", "slurm-dev", "--job", "preflight", "--recipe", str(tiny_recipe(tmp_path)),
             "--run-dir", str(submitted), env=env)
    job_a = json.loads((submitted / "job.json").read_text())["job_id"]
    script = tmp_path / "plain.sbatch"
    plain = tmp_path / "plain-run"
    sd35dist("submit", "--profile", "slurm-dev", "--job", "preflight", "--recipe", str(tiny_recipe(tmp_path)),
             "--run-dir", str(plain), "--output", str(script), env=env)
    job_b = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env,
                           check=True).stdout.strip().split(";")[0]
    for job_id, run_dir in ((job_a, submitted), (job_b, plain)):
        held = tmp_path / f"held-{job_id}.sh"
        subprocess.run(["scontrol", "write", "batch_script", job_id, str(held)], check=True, env=env,
                       capture_output=True)
        assert held.read_text() == (run_dir / "job.sbatch").read_text()
        assert final_state(job_id, env) == "COMPLETED"
    assert script.read_text() == (plain / "job.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@" in script.read_text()
    # plain sbatch and submitit write their logs to the same place
    assert (submitted / "logs" / f"{job_a}.out").exists() and (plain / "logs" / f"{job_b}.out").exists()
    assert not list((submitted / "submitit").glob("*_log.out")), "no second set of logs from submitit's runner"
