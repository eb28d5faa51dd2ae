"""A job's ranks as a profile's script starts them (sd35dist's torchrun with the profile's default
restarts), and what a user sees when they stop on a mistake: one `error:` line, exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from launcher.profile import LaunchSection
from sd35dist.config.commands import rank_start_method
from tests.cli_runs import PROJECT, torch_extensions_dir, venv_env

WARM_TORCHRUN = (sys.executable, "-m", "sd35dist", "torchrun",
                 f"--start-method={rank_start_method(LaunchSection().warm_ranks)}")
"""`sd35dist torchrun` as the tests start it: the ranks forked from one warm interpreter when that is the
profile's default (launch.warm_ranks), as a submitted job's are."""


def torchrun(job: str, recipe: Path, run_dir: Path | None = None, nproc: int = 2,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """The job as a profile's script starts it: sd35dist's torchrun, one agent, `nproc` ranks, with
    the profile's default restarts (a mistake must not be restarted)."""
    cmd = [*WARM_TORCHRUN, "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={LaunchSection().max_restarts}",
           "-m", "sd35dist", job, "--recipe", str(recipe)] + (["--run-dir", str(run_dir)] if run_dir else [])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT, env=venv_env(OMP_NUM_THREADS="1"),
                          timeout=timeout)


def run_driver(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """A test driver (tests/*_check.py, run as `module`) on 2 gloo ranks under sd35dist's torchrun
    without restarts, the ranks forked from one warm interpreter (sd35dist/jobs/warm_ranks.py), with
    DeepSpeed on its CPU accelerator and its ops built in the venv's own folder; a failed run fails
    the test with the tail of its output."""
    env = venv_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=torch_extensions_dir())
    proc = subprocess.run(
        [*WARM_TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", module, *args],
        capture_output=True, text=True, cwd=PROJECT, env=env, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def rank_processes(agent: int, job: str = "train") -> list[int]:
    """The ranks of `sd35dist JOB` under a torchrun agent. Forked warm they are its grandchildren,
    with the fork server (titled "sd35dist torchrun fork server") between, so they are found by the
    command line they show."""
    from launcher.local_process import descendants

    ranks = []
    for pid in descendants(agent):
        try:
            if f"sd35dist {job} ".encode() in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "):
                ranks.append(pid)
        except OSError:
            continue
    return ranks


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    text = (proc.stdout + proc.stderr).replace("\r", "\n")
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_quiet_line(proc: subprocess.CompletedProcess) -> str:
    everything = proc.stdout + proc.stderr
    assert proc.returncode == 2, everything[-4000:]
    lines = error_lines(proc)
    assert len(lines) == 1, everything[-4000:]
    assert "Traceback" not in everything and "[rank" not in everything, everything[-4000:]
    assert "will restart worker group" not in everything, "a mistake is not restarted"
    return lines[0]
