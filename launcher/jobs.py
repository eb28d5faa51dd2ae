"""`sd35dist status | logs | cancel`: find a submitted job by id or run directory and act on it."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

from launcher.submission import JOB_RECORD, state_dir
from sd35dist.config import ConfigError


def find_record(ref: str) -> dict[str, str]:
    """A run directory, or a job id that `sd35dist submit` recorded; plain-sbatch ids fall back to Slurm."""
    path = Path(ref)
    if path.is_dir():
        record_file = path / JOB_RECORD
        if not record_file.is_file():
            raise ConfigError(ref, "", f"no {JOB_RECORD} here: not a submitted run directory")
        return json.loads(record_file.read_text())
    index = state_dir() / "jobs"
    for scheduler in ("slurm", "local"):
        link = index / f"{scheduler}-{ref}"
        if link.is_file():
            run_dir = Path(link.read_text().strip())
            if (run_dir / JOB_RECORD).is_file():
                return json.loads((run_dir / JOB_RECORD).read_text())
    if ref.isdigit() and _slurm_available():
        return {"job_id": ref, "scheduler": "slurm", "run_dir": "", "submitit_folder": ""}
    raise ConfigError(ref, "", "neither a run directory nor a job id submitted from this account")


def _slurm_available() -> bool:
    return subprocess.run(["sh", "-c", "command -v squeue"], capture_output=True).returncode == 0


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()


def slurm_state(job_id: str) -> str:
    """The job's state: squeue while Slurm holds it, else accounting (sacct)."""
    state = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    if state:
        return state.splitlines()[0]
    rows = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]).splitlines()
    # After a requeue sacct lists every attempt; the last row is the current one.
    return rows[-1].split()[0] if rows else "UNKNOWN"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def local_state(record: dict[str, str]) -> str:
    pid = int(record["job_id"])
    if _alive(pid):
        return "RUNNING"
    result = Path(record["submitit_folder"]) / f"{pid}_0_result.pkl"
    if not result.is_file():
        return "INTERRUPTED"
    with result.open("rb") as handle:
        outcome = pickle.load(handle)
    return "COMPLETED" if outcome[0] == "success" else "FAILED"


def job_state(record: dict[str, str]) -> str:
    return slurm_state(record["job_id"]) if record["scheduler"] == "slurm" else local_state(record)


def log_files(record: dict[str, str]) -> list[Path]:
    """Every log the job wrote: submitit's per-task logs, or the sbatch script's own."""
    job_id = record["job_id"]
    found: list[Path] = []
    if record.get("submitit_folder"):
        folder = Path(record["submitit_folder"])
        found += sorted(folder.glob(f"{job_id}_*_log.out")) + sorted(folder.glob(f"{job_id}_*_log.err"))
    if record.get("run_dir"):
        logs = Path(record["run_dir"]) / "logs"
        found += [p for p in (logs / f"{job_id}.out", logs / f"{job_id}.err") if p.is_file()]
    if not found and record["scheduler"] == "slurm":
        info = _run(["scontrol", "show", "job", job_id])
        for word in info.split():
            key, _, value = word.partition("=")
            if key in ("StdOut", "StdErr") and Path(value).is_file() and Path(value) not in found:
                found.append(Path(value))
    return found


def cancel(record: dict[str, str], grace_s: float = 10.0) -> None:
    if record["scheduler"] == "slurm":
        subprocess.run(["scancel", record["job_id"]], check=True)
        return
    pid = int(record["job_id"])
    # Freeze the tree parent-first so nothing forks or reparents while we look, then stop all
    # of it: submitit's local task ignores SIGTERM and would orphan torchrun otherwise.
    tree: list[int] = []
    for target in [pid, *_descendants(pid), *_descendants(pid)]:
        if target not in tree and _signal(target, signal.SIGSTOP):
            tree.append(target)
    tree += [p for p in _descendants(pid) if p not in tree and _signal(p, signal.SIGSTOP)]
    for target in reversed(tree):
        _signal(target, signal.SIGTERM)
        _signal(target, signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.2)
    for target in tree:
        if _alive(target):
            _signal(target, signal.SIGKILL)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
