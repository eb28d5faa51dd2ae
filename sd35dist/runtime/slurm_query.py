"""What Slurm says of a job or of the cluster, read through its own commands (no torch here).

The launcher (status, `--wait`), the trainer (why a SIGTERM came) and the save budget
(KillWait) all ask the same questions; the answers are parsed here once. A command that is
missing, fails or hangs answers None: Slurm without accounting, or no Slurm at all.
"""

from __future__ import annotations

import subprocess

QUERY_TIMEOUT_S = 20


def slurm_output(argv: list[str]) -> str | None:
    """stdout of a Slurm command, or None when it is missing, fails or does not answer in time."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def accounting_states(job_id: str) -> list[str]:
    """sacct's State of every run of the job, oldest first (a requeued job has one row per run);
    empty without accounting."""
    out = slurm_output(["sacct", "-n", "-X", "-P", "-D", "-j", job_id, "-o", "State"]) or ""
    return [row.strip() for row in out.splitlines() if row.strip()]


def accounting_exit_code(job_id: str) -> int | None:
    """The batch script's exit status of the job's last run (sacct's ExitCode `2:0`); None without accounting."""
    out = slurm_output(["sacct", "-n", "-X", "-P", "-D", "-j", job_id, "-o", "ExitCode"]) or ""
    rows = [row.strip() for row in out.splitlines() if row.strip()]
    code, _, signal = rows[-1].partition(":") if rows else ("", "", "")
    if not code.isdigit():
        return None
    return int(code) if int(code) or not signal.isdigit() or not int(signal) else 128 + int(signal)


def controller_restarts(job_id: str) -> int | None:
    """scontrol's Restarts counter of the job (None once slurmctld has forgotten it)."""
    for word in (slurm_output(["scontrol", "show", "job", "-o", job_id]) or "").split():
        key, _, value = word.partition("=")
        if key == "Restarts" and value.isdigit():
            return int(value)
    return None


def kill_wait_s() -> float | None:
    """The cluster's KillWait: seconds from Slurm's SIGTERM to its SIGKILL."""
    for line in (slurm_output(["scontrol", "show", "config"]) or "").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "KillWait":
            number = value.strip().split(" ")[0]
            return float(number) if number.isdigit() else None
    return None
