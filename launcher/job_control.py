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

from launcher.submission import JOB_RECORD, state_dir
from sd35dist.config import ConfigError
from sd35dist.runtime.slurm_query import accounting_exit_code, accounting_states, controller_restarts, slurm_output


def find_record(ref: str) -> dict[str, str]:
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
            run_dir = Path(link.read_text().strip())
            if (run_dir / JOB_RECORD).is_file():
                return read_record(run_dir / JOB_RECORD)
    if not _slurm_available():
        raise ConfigError(ref, "", "no such job: not submitted from this account (and no Slurm here to ask)")
    known, trouble = slurm_knows(ref)
    if known:
        return {"job_id": ref, "scheduler": "slurm", "run_dir": "", "submitit_folder": ""}
    if trouble:
        raise ConfigError(ref, "", f"no such job: not submitted from this account, and Slurm could not be asked ({trouble})")
    raise ConfigError(ref, "", "no such job: not submitted from this account, and Slurm knows no job with this id")


RECORD_KEYS = ("job_id", "scheduler")


def read_record(path: Path) -> dict[str, str]:
    """A job.json that `sd35dist submit` wrote; anything else (cut short, edited, not ours) is one line."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(str(path), "", f"not a job record sd35dist wrote ({type(exc).__name__}): "
                          "pass the job id instead, or resubmit") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(key), str) and record[key] for key in RECORD_KEYS):
        raise ConfigError(str(path), "", f"not a job record sd35dist wrote (needs {' and '.join(RECORD_KEYS)}): "
                          "pass the job id instead, or resubmit")
    if record["scheduler"] == "local" and not record["job_id"].isdigit():
        raise ConfigError(str(path), "job_id", f"{record['job_id']!r} is not a process id: the record is damaged")
    return record


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


def ended_state(record: dict[str, str]) -> str | None:
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
    try:
        with result.open("rb") as handle:
            outcome = _PlainDataUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError):
        return "UNKNOWN"
    return "COMPLETED" if outcome == ("success", 0) else "FAILED"


def exit_code(record: dict[str, str]) -> int | None:
    """The job's exit status once it has ended (a rank's 2 for a mistake), None when nobody recorded one."""
    if record["scheduler"] == "slurm":
        return accounting_exit_code(record["job_id"])
    result = Path(record["submitit_folder"]) / f"{record['job_id']}_0_result.pkl"
    try:
        with result.open("rb") as handle:
            outcome = _PlainDataUnpickler(handle).load()
    except (OSError, pickle.UnpicklingError, EOFError):
        return None
    if outcome[0] == "success" and isinstance(outcome[1], int):
        return outcome[1]
    return 1


class _PlainDataUnpickler(pickle.Unpickler):
    """submitit's result of our node command is ("success", 0) or ("error", traceback text):
    plain data, so a result file that names any class or function is refused, never run."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: not a result sd35dist's job writes")


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
        info = slurm_output(["scontrol", "show", "job", job_id]) or ""
        for word in info.split():
            key, _, value = word.partition("=")
            if key in ("StdOut", "StdErr") and Path(value).is_file() and Path(value) not in found:
                found.append(Path(value))
    return found


def cancel(record: dict[str, str], grace_s: float = 10.0) -> None:
    if record["scheduler"] == "slurm":
        result = subprocess.run(["scancel", record["job_id"]], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ConfigError(record["job_id"], "", f"scancel refused: {_last_line(result.stderr)}")
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
