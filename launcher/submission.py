"""Files and processes of a submission: the run directory, submitit, and the job record.

The plan is already validated and rendered; this module only writes the run directory
(atomically), hands the plan to submitit, and records what was submitted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher.local_process import read_identity
from launcher.plan import JobPlan
from launcher.render import render_script
from sd35dist.runtime.atomic_files import staged_directory, write_text_atomically
from sd35dist.runtime.job_env import submit_state_dir

JOB_RECORD = "job.json"


def state_dir() -> Path:
    """Where job id → run directory links live (SD35DIST_STATE_DIR overrides, for tests)."""
    return Path(submit_state_dir())


@dataclasses.dataclass(frozen=True)
class NodeCommand:
    """What submitit's local executor runs: one bash command, output straight to the log.

    Holds only text from the plan (no secret values): submitit pickles it into the run directory.
    Its result is the command's exit status, which job_control reads (0: COMPLETED, else FAILED):
    an exception here would add submitit's traceback to a log whose ranks already said what failed.
    """

    command: str

    def __call__(self) -> int:
        bash = shutil.which("bash") or "/bin/bash"
        # torchrun lives beside the interpreter submitit started, even when PATH lacks the venv.
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        return subprocess.run([bash, "-c", self.command], env=env, check=False).returncode


def prepare_run_dir(plan: JobPlan, recipe_yaml: str, profile_yaml: str) -> Path:
    """Create the run directory complete or not at all: frozen recipe, profile, script, logs/."""
    run_dir = Path(plan.run_dir)
    if run_dir.exists():
        raise FileExistsError(f"run directory {run_dir} already exists: pass another --run-dir")
    with staged_directory(run_dir) as staging:
        (staging / "logs").mkdir()
        (staging / "recipe.yaml").write_text(recipe_yaml)
        (staging / "profile.yaml").write_text(profile_yaml)
        (staging / script_name(plan)).write_text(render_script(plan))
    return run_dir


def script_name(plan: JobPlan) -> str:
    return "job.sbatch" if plan.scheduler == "slurm" else "job.sh"


def _rendered_script_executor(folder: Path, script: str):  # -> submitit.SlurmExecutor
    """A submitit Slurm executor whose batch script is ours, byte for byte.

    submitit calls sbatch, records the job and tracks its state; the script Slurm runs is
    the one in the run directory (and the one a user can `sbatch` by hand), so signals,
    requeue and logs behave the same whichever way the job was submitted. submitit's own
    script would run a pickled callable under its own USR1 handler instead (docs/lifecycle.md).
    """
    import submitit

    class RenderedScriptExecutor(submitit.SlurmExecutor):
        def _make_submission_file_text(self, command: str, uid: str) -> str:
            return script

    return RenderedScriptExecutor(folder=folder)


@contextlib.contextmanager
def _stdio_detached():
    """submitit's local controller inherits our stdin/stdout/stderr; point them at /dev/null
    while it starts, so `sd35dist submit | tee` or a captured run returns when we exit."""
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in zip((0, 1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


@contextlib.contextmanager
def _quiet_submitit():
    """The local job's submitit wrapper logs INFO lines into the job's log, which `--wait` and
    `sd35dist logs` print: keep it to warnings unless the user set SUBMITIT_LOG_LEVEL."""
    before = os.environ.get("SUBMITIT_LOG_LEVEL")
    os.environ.setdefault("SUBMITIT_LOG_LEVEL", "WARNING")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SUBMITIT_LOG_LEVEL", None)


def submit(plan: JobPlan, run_dir: Path) -> dict[str, Any]:
    """Submit through submitit and write the job record; returns it."""
    import submitit

    folder = run_dir / "submitit"
    if plan.scheduler == "slurm":
        executor = _rendered_script_executor(folder, (run_dir / script_name(plan)).read_text())
        folder.mkdir(parents=True, exist_ok=True)
        # submitit's command-submission path: it runs sbatch on the file it writes (our script).
        job = executor._submit_command(command="")
        stdout, stderr = (f"{plan.log_dir}/{job.job_id}.{ext}" for ext in ("out", "err"))
    else:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=plan.time_minutes, tasks_per_node=1, nodes=1)
        with _stdio_detached(), _quiet_submitit():
            job = executor.submit(NodeCommand(f"exec bash {shlex.quote(str(run_dir / script_name(plan)))}"))
        stdout, stderr = str(job.paths.stdout), str(job.paths.stderr)
    record = {
        "job_id": str(job.job_id),
        "scheduler": plan.scheduler,
        "profile": plan.profile_name,
        "recipe": plan.recipe_name,
        "job": plan.job,
        "run_dir": str(run_dir),
        "submitit_folder": str(folder),
        "stdout": stdout,
        "stderr": stderr,
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if plan.scheduler == "local":
        # Bind the id to this process: once it ends, its PID may be anyone's (launcher/local_process.py).
        identity = read_identity(int(job.job_id))
        if identity is not None:
            record["process"] = identity.to_record()
    write_record(run_dir, record)
    return record


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_text_atomically(run_dir / JOB_RECORD, json.dumps(record, indent=2) + "\n")
    index = state_dir() / "jobs"
    index.mkdir(parents=True, exist_ok=True)
    write_text_atomically(index / f"{record['scheduler']}-{record['job_id']}", str(run_dir) + "\n")
