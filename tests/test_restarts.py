"""torchrun's restarts through `sd35dist torchrun`: a crash restarts the workers, a mistake does not.

The workers here are small scripts that count their attempts in a file, so each test sees how
many times the agent started them — not only how the run ended.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd35dist.jobs.torchrun import (
    Rendezvous,
    failure_summary,
    multi_node_rendezvous,
    rendezvous_outlives_its_agents,
    restart_cures,
)
from sd35dist.runtime.run_files import MISTAKE_FILE
from tests.cli_runs import PROJECT, venv_env

WORKER = """\
import os, signal, sys
from pathlib import Path
attempts = Path(sys.argv[1]) / f"rank{os.environ['RANK']}"
attempts.parent.mkdir(parents=True, exist_ok=True)
warm = "diffusers" in sys.modules  # imported before this script's first line: a warm fork
with attempts.open("a") as f:
    f.write(f"{os.environ['TORCHELASTIC_RESTART_COUNT']} {os.getppid()} {warm}\\n")
n = len(attempts.read_text().splitlines())
plan = sys.argv[2].split(",")  # what this rank does on attempt 1, 2, …: ok | exit<N> | kill
what = plan[min(n, len(plan)) - 1] if os.environ["RANK"] == "1" else "ok"
if what == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(what[4:]) if what.startswith("exit") else 0)
"""


def run_workers(tmp_path: Path, plan: str, max_restarts: int,
                warm: bool = False) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Two ranks under one `sd35dist torchrun` agent; rank 1 follows `plan`. Returns the run and
    how many times each rank was started. `warm`: the worker runs as a module (`-m worker`) with
    --start-method=forkserver, so every attempt is forked from one warm interpreter."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    counts = tmp_path / "attempts"
    entry = ["--start-method=forkserver", "-m", "worker"] if warm else [str(script)]
    proc = subprocess.run(
        [sys.executable, "-m", "sd35dist", "torchrun", "--standalone", "--nproc-per-node=2",
         f"--max-restarts={max_restarts}", "--monitor-interval=0.2", *entry, str(counts), plan],
        capture_output=True, text=True, cwd=tmp_path if warm else PROJECT,
        env=venv_env(OMP_NUM_THREADS="1", SD35DIST_RUN_DIR=str(tmp_path)), timeout=180)
    started = [len(attempts(counts, rank)) for rank in (0, 1)]
    return proc, started


def attempts(counts: Path, rank: int) -> list[list[str]]:
    """Each start of `rank`: its restart count, its parent's pid, whether torch and diffusers were already imported."""
    path = counts / f"rank{rank}"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.dist
@pytest.mark.parametrize("warm", [False, True], ids=["spawned", "warm"])
def test_a_killed_rank_restarts_the_workers_and_the_job_succeeds(tmp_path, warm):
    proc, started = run_workers(tmp_path, "kill,ok", max_restarts=3, warm=warm)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert started == [2, 2], "both ranks were started again after rank 1 was killed"
    assert not (tmp_path / MISTAKE_FILE).exists()
    starts = attempts(tmp_path / "attempts", 0) + attempts(tmp_path / "attempts", 1)
    assert {warm_start for _, _, warm_start in starts} == {str(warm)}, starts
    if warm:
        assert len({parent for _, parent, _ in starts}) == 1, "every attempt forked from the one fork server"


@pytest.mark.dist
def test_exhausted_restarts_fail_the_job_with_the_reason(tmp_path):
    proc, started = run_workers(tmp_path, "exit1", max_restarts=2)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert started == [3, 3], "the first attempt and two restarts"
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("sd35dist: stopped: rank 1 on ") and last.endswith(
        " exited with status 1 after 2 of 2 restarts inside the allocation"), proc.stderr


@pytest.mark.dist
def test_a_mistake_is_not_restarted_even_after_a_crash(tmp_path):
    """The restart after a crash meets a mistake (the crash left something broken): it is the last attempt,
    with restarts to spare. (A mistake on the first attempt takes the same decision, restart_cures, on the
    same agent path: test_restart_decision_and_summary has it.)"""
    proc, started = run_workers(tmp_path, "kill,exit2,ok", max_restarts=5)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert started[1] == 2, "a mistake meets every attempt again: no restart after it"
    assert proc.stderr.splitlines()[-1].endswith("exited with status 2 (a mistake: not restarted)"), proc.stderr
    assert (tmp_path / MISTAKE_FILE).exists(), "the batch script ends the job with status 2 on this mark"


@pytest.mark.unit
def test_restart_decision_and_summary():
    assert restart_cures([-9]) and restart_cures([1, 1]) and not restart_cures([1, 2])
    assert failure_summary(1, "n2", -9, restarts=3, max_restarts=3) == (
        "sd35dist: stopped: rank 1 on n2 was killed by signal 9 after 3 of 3 restarts inside the allocation")
    assert failure_summary(0, "n1", 2, max_restarts=3) == (
        "sd35dist: stopped: rank 0 on n1 exited with status 2 (a mistake: not restarted)")
    assert failure_summary(0, "n1", 2) == "sd35dist: stopped: rank 0 on n1 exited with status 2"


# ---- the rendezvous store's host waits for every agent at the end --------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.unit
def test_which_jobs_have_a_rendezvous_to_keep():
    from torch.distributed.run import parse_args

    def rendezvous(*argv: str):
        return multi_node_rendezvous(parse_args([*argv, "worker.py"]))

    assert rendezvous("--standalone", "--nproc-per-node=2") is None
    assert rendezvous("--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29511") is None
    here = rendezvous("--nnodes=2", "--rdzv-id=7", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29511")
    assert here == Rendezvous("127.0.0.1", 29511, "7", 2, hosted_here=True)
    elsewhere = rendezvous("--nnodes=4", "--rdzv-id=7", "--rdzv-backend=c10d", "--rdzv-endpoint=192.0.2.1:29511")
    assert elsewhere is not None and not elsewhere.hosted_here and elsewhere.nodes == 4


@pytest.mark.process
def test_the_host_keeps_the_store_until_every_agent_is_done():
    """torchrun's own store (multi-tenant, same port) goes when its run ends; the host's stays until
    the other agent has said it is done."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    port = free_port()
    host = Rendezvous("127.0.0.1", port, "job1", nodes=2, hosted_here=True)
    peer = Rendezvous("127.0.0.1", port, "job1", nodes=2, hosted_here=False)
    peer_done_at: list[float] = []

    def other_agent():
        time.sleep(1.0)  # still closing its rendezvous when the host's run has ended
        with rendezvous_outlives_its_agents(peer):
            pass
        peer_done_at.append(time.monotonic())

    thread = threading.Thread(target=other_agent)
    thread.start()
    with rendezvous_outlives_its_agents(host, wait_s=20):
        torchruns = dist.TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, timeout=timedelta(seconds=5))
        torchruns.set("round", "1")
        del torchruns
    host_left_at = time.monotonic()
    thread.join()
    assert peer_done_at and host_left_at >= peer_done_at[0] - 0.05, "the host left before the other agent was done"


@pytest.mark.process
def test_the_host_does_not_wait_for_ever_for_an_agent_that_is_gone():
    started = time.monotonic()
    with rendezvous_outlives_its_agents(Rendezvous("127.0.0.1", free_port(), "job2", 2, True), wait_s=0.5):
        pass
    assert 0.5 <= time.monotonic() - started < 5
