"""`sd35dist status | logs | cancel`: find a submitted job by id or run directory and act on it."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from launcher.local_process import ProcessIdentity, alive, descendants, is_running
from launcher.submission import JOB_RECORD, state_dir
from sd35dist.config import ConfigError
from sd35dist.runtime.slurm_query import accounting_exit_code, accounting_states, controller_restarts, slurm_output


def find_record(ref: str) -> dict[str, Any]:
    """A run directory, or a job id that `sd35dist submit` recorded; plain-sbatch ids fall back to Slurm.

    Anything else is a ConfigError saying there is no such job: a mistyped id must not look
    like a job in state UNKNOWN, nor reach scancel.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        record_file = path / JOB_RECORD
        if not record_file.is_file():
            raise ConfigError(ref, "", f"no {JOB_RECORD} here: not a submitted run directory")
        return read_record(record_file)
    if not ref.isdigit():
        if os.sep in ref or ref.startswith((".", "~")):
            raise ConfigError(ref, "", "no such run directory")
        raise ConfigError(ref, "", "no such job: give a job id or a run directory")
    index = state_dir() / "jobs"
    for scheduler in ("slurm", "local"):
        link = index / f"{scheduler}-{ref}"
        if link.is_file():
            run_dir = Path(link.read_text(errors="replace").strip())
            if (run_dir / JOB_RECORD).is_file():
                record = read_record(run_dir / JOB_RECORD)
                if record["job_id"] == ref and record["scheduler"] == scheduler:
                    return record
    if not _slurm_available():
        raise ConfigError(ref, "", "no such job: not submitted from this account (and no Slurm here to ask)")
    known, trouble = slurm_knows(ref)
    if known:
        return {"job_id": ref, "scheduler": "slurm", "run_dir": "", "submitit_folder": ""}
    if trouble:
        raise ConfigError(ref, "", f"no such job: not submitted from this account, and Slurm could not be asked ({trouble})")
    raise ConfigError(ref, "", "no such job: not submitted from this account, and Slurm knows no job with this id")


def read_record(path: Path) -> dict[str, Any]:
    """A job.json that `sd35dist submit` wrote; anything else (damaged, edited, another tool's) is a
    ConfigError, never a traceback, and never a PID to signal."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(str(path), "", f"not a job record sd35dist can read ({' '.join(str(err).split())})") from None
    problem = _record_problem(record)
    if problem:
        raise ConfigError(str(path), "", f"not a job record sd35dist wrote ({problem})")
    return record


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for key in ("job_id", "scheduler", "run_dir", "submitit_folder"):
        if not isinstance(record.get(key), str):
            return f"{key} is missing or not a string"
    if record["scheduler"] not in ("slurm", "local"):
        return f"scheduler {record['scheduler']!r} is neither slurm nor local"
    if not record["job_id"].isdigit():
        return f"job_id {record['job_id']!r} is not a number"
    if record["scheduler"] == "local" and "process" in record:
        try:
            ProcessIdentity.from_record(record["process"])
        except ValueError as err:
            return str(err)
    return None


def _slurm_available() -> bool:
    return shutil.which("squeue") is not None


def slurm_knows(job_id: str) -> tuple[bool, str]:
    """Whether the controller (squeue) or accounting (sacct) has a job with this id, and, when
    squeue could not answer, its last error line."""
    queue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False)
    if queue.returncode == 0 and queue.stdout.strip():
        return True, ""
    if queue.returncode != 0 and "invalid job id" not in queue.stderr.lower():
        return False, _last_line(queue.stderr)
    # Accounting keeps finished jobs after the controller forgets them; without it, this is empty.
    return bool(accounting_states(job_id)), ""


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no message")


ENDED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "INTERRUPTED")
"""States a job can end in. NODE_FAIL and PREEMPTED end a job only when Slurm does not requeue it."""


def slurm_state(job_id: str) -> str:
    """The job's state: squeue while Slurm holds it, else accounting's last run (sacct)."""
    state = _queued_state(job_id)
    if state:
        return state
    runs = accounting_states(job_id)
    return runs[-1].split()[0] if runs else "UNKNOWN"


def _queued_state(job_id: str) -> str:
    """The state while the job is pending, running or completing; '' once it has left the queue."""
    state = (slurm_output(["squeue", "-h", "-j", job_id, "-o", "%T"]) or "").strip()
    return state.splitlines()[0] if state else ""


def slurm_restarts(job_id: str) -> int:
    """How many times Slurm has requeued the job (scontrol's Restarts; accounting's runs)."""
    restarts = controller_restarts(job_id)
    return restarts if restarts is not None else max(0, len(accounting_states(job_id)) - 1)


def ended_state(record: dict[str, Any]) -> str | None:
    """The final state once the job has ended for good, else None.

    A requeued job is PENDING again in the queue, whatever its previous run ended with, so a
    Slurm job has ended only when it has left the queue and accounting shows a final state.
    """
    if record["scheduler"] != "slurm":
        state = local_state(record)
        return state if state in ENDED_STATES else None
    if _queued_state(record["job_id"]):
        return None
    state = slurm_state(record["job_id"])
    return state if state.split()[0] in ENDED_STATES else None


def recorded_process(record: dict[str, Any]) -> ProcessIdentity | None:
    """Who the local job's process was when it was submitted; None for a record without it
    (written before sd35dist recorded it, or the process had ended before it could be read)."""
    raw = record.get("process")
    return ProcessIdentity.from_record(raw) if raw is not None else None


def local_state(record: dict[str, Any]) -> str:
    """RUNNING only while the recorded process itself runs: a PID now held by another process
    means the job has ended (its result says how), never that it runs."""
    identity = recorded_process(record)
    if identity is not None and is_running(identity):
        return "RUNNING"
    pid = int(record["job_id"])
    result = Path(record["submitit_folder"]) / f"{pid}_0_result.pkl"
    if not result.is_file():
        # No identity to compare: a live PID may or may not be the job.
        return "UNKNOWN" if identity is None and alive(pid) else "INTERRUPTED"
    try:
        with result.open("rb") as handle:
            outcome = _PlainDataUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError):
        return "UNKNOWN"
    return "COMPLETED" if outcome == ("success", 0) else "FAILED"


def exit_code(record: dict[str, Any]) -> int | None:
    """The job's exit status once it has ended (a rank's 2 for a mistake), None when nobody recorded one."""
    if record["scheduler"] == "slurm":
        return accounting_exit_code(record["job_id"])
    result = Path(record["submitit_folder"]) / f"{record['job_id']}_0_result.pkl"
    try:
        with result.open("rb") as handle:
            outcome = _PlainDataUnpickler(handle).load()
    except (OSError, pickle.UnpicklingError, EOFError):
        return None
    if isinstance(outcome, tuple) and len(outcome) == 2 and outcome[0] == "success" and isinstance(outcome[1], int):
        return outcome[1]
    return 1


class _PlainDataUnpickler(pickle.Unpickler):
    """submitit's result of our node command is ("success", 0) or ("error", traceback text):
    plain data, so a result file that names any class or function is refused, never run."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: not a result sd35dist's job writes")


def job_state(record: dict[str, Any]) -> str:
    return slurm_state(record["job_id"]) if record["scheduler"] == "slurm" else local_state(record)


def log_files(record: dict[str, Any]) -> list[Path]:
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
        info = slurm_output(["scontrol", "show", "job", job_id]) or ""
        for word in info.split():
            key, _, value = word.partition("=")
            if key in ("StdOut", "StdErr") and Path(value).is_file() and Path(value) not in found:
                found.append(Path(value))
    return found


def cancel(record: dict[str, Any], grace_s: float = 10.0) -> None:
    if record["scheduler"] == "slurm":
        result = subprocess.run(["scancel", record["job_id"]], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ConfigError(record["job_id"], "", f"scancel refused: {_last_line(result.stderr)}")
        return
    identity = recorded_process(record)
    if identity is None:
        raise ConfigError(record["job_id"], "", "its record does not say which process it was (submitted by an older "
                          "sd35dist, or it ended at once): its process id may be another's now, so nothing was signalled")
    if not is_running(identity):
        raise ConfigError(record["job_id"], "", f"not running (state {local_state(record)}): nothing to cancel, "
                          "and nothing was signalled")
    pid = identity.pid
    # Freeze the tree parent-first so nothing forks or reparents while we look, then stop all
    # of it: submitit's local task ignores SIGTERM and would orphan torchrun otherwise.
    if not _signal(pid, signal.SIGSTOP):
        raise ConfigError(record["job_id"], "", "ended while being cancelled: nothing was signalled")
    if not is_running(identity):  # the PID changed hands between the check and the stop: undo
        _signal(pid, signal.SIGCONT)
        raise ConfigError(record["job_id"], "", "ended while being cancelled: nothing was signalled")
    tree: list[int] = [pid]
    for target in [*descendants(pid), *descendants(pid)]:
        if target not in tree and _signal(target, signal.SIGSTOP):
            tree.append(target)
    tree += [p for p in descendants(pid) if p not in tree and _signal(p, signal.SIGSTOP)]
    for target in reversed(tree):
        _signal(target, signal.SIGTERM)
        _signal(target, signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.2)
    for target in tree:
        if alive(target):
            _signal(target, signal.SIGKILL)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
