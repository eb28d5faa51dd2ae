"""Preemption: a signal becomes a flag; ranks agree on it at a step boundary with one all-reduce.

Who receives Slurm's signal differs by site (the batch shell, torchrun's agent, the
workers; see the profile's `--signal=USR1@grace`), so besides the signal itself a file
`<run dir>/PREEMPT` counts too: a batch-shell trap or a user can create it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

PREEMPT_FILE = "PREEMPT"


class PreemptionWatch:
    def __init__(self, run_dir: str | None, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        self._event = threading.Event()
        self.received: str | None = None
        self._flag_file = Path(run_dir) / PREEMPT_FILE if run_dir else None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        self._event.set()

    def requested_here(self) -> bool:
        return self._event.is_set() or bool(self._flag_file and self._flag_file.exists())

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank saw the signal (one all-reduce, at a step boundary)."""
        flag = torch.tensor([1.0 if self.requested_here() else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def request_requeue(env: dict[str, str] | os._Environ = os.environ) -> str:
    """After saving: ask Slurm to requeue this job (its time limit is near, or it was told to
    stop). With SIGTERM from `scontrol requeue` or preemption Slurm requeues by itself; asking
    again is harmless. Returns what was done, for the log."""
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return "not under Slurm: exiting; resume with `resume: latest`"
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if proc.returncode:
        return f"scontrol requeue {job_id} failed ({proc.stderr.strip()}); resume with `resume: latest`"
    return f"requeued Slurm job {job_id}"
