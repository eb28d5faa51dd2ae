"""Why a job is being stopped, agreed by every rank at a step boundary.

Three different events reach a training job, and each wants its own ending:

- **time limit**: Slurm sends `USR1` to the batch shell `signal_grace_s` before the limit
  (`--signal=B:USR1@grace`); the shell writes the run directory's PREEMPT file (a user may
  write it too). Ranks save, exit 0, and the batch shell requeues the job once nothing of
  the step is left running.
- **requeue**: `scontrol requeue`, preemption or a node failure. Slurm sends SIGTERM to
  every process of the step and requeues the job by itself; ranks save if the save fits
  before Slurm's SIGKILL (KillWait), and exit.
- **cancel**: `scancel` / `sd35dist cancel` also sends SIGTERM, but the job ends for good:
  no requeue, a final checkpoint only if it fits, and the log says "cancelled".

A SIGTERM alone cannot tell requeue from cancel; Slurm's own view of the job can: its
accounting state reads `CANCELLED by <uid>` or `REQUEUED`, and without accounting
`scontrol`'s restart counter has already moved past this run's SLURM_RESTART_COUNT when
the job is being requeued.
"""

from __future__ import annotations

import enum
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

from sd35dist.runtime.job_env import JobEnvironment
from sd35dist.runtime.run_files import PREEMPT_FILE
from sd35dist.runtime.slurm_query import accounting_states, controller_restarts

REQUEUE_STATES = ("REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "PREEMPTED", "NODE_FAIL")


class StopKind(enum.IntEnum):
    """Ordered by precedence: when ranks saw different things, the larger wins."""

    NONE = 0
    TIME_LIMIT = 1
    REQUEUE = 2
    CANCEL = 3


@dataclass(frozen=True)
class SlurmJobView:
    """What Slurm says of this job while it is being terminated."""

    accounting_state: str | None
    """sacct's State of the job (`CANCELLED by 0`, `REQUEUED`, `RUNNING`…); None without accounting."""
    restarts: int | None
    """scontrol's Restarts counter; None when scontrol did not answer."""
    restart_count: int
    """SLURM_RESTART_COUNT of this run (0 on the first)."""


def classify_termination(view: SlurmJobView) -> StopKind:
    """SIGTERM received: was the job requeued (preemption, node failure, scontrol requeue) or cancelled?"""
    state = (view.accounting_state or "").strip().upper()
    if state.startswith("CANCELLED"):
        return StopKind.CANCEL
    if state.split(" ")[0] in REQUEUE_STATES:
        return StopKind.REQUEUE
    if state.startswith("TIMEOUT"):
        return StopKind.TIME_LIMIT
    if view.restarts is not None and view.restarts > view.restart_count:
        return StopKind.REQUEUE
    # A SIGTERM that Slurm does not explain as a requeue ends the job for good: requeueing a
    # job someone meant to stop is the worse mistake.
    return StopKind.CANCEL


def save_fits(*, elapsed_s: float, save_s: float | None, kill_wait_s: float | None) -> bool:
    """Whether a save started now ends before Slurm's SIGKILL (KillWait after its SIGTERM).

    Unknown timings count as fitting: a save cut short never replaces `latest`, so trying
    costs nothing but the attempt.
    """
    if save_s is None or kill_wait_s is None:
        return True
    return elapsed_s + save_s < kill_wait_s


def read_slurm_view(job_id: str, restart_count: int) -> SlurmJobView:
    """Ask accounting (sacct) and slurmctld (scontrol) about `job_id`."""
    states = accounting_states(job_id)
    return SlurmJobView(accounting_state=states[-1] if states else None, restarts=controller_restarts(job_id),
                        restart_count=restart_count)


class PreemptionWatch:
    """Signals and the PREEMPT file become a `StopKind` that every rank agrees on."""

    def __init__(self, run_dir: str | None, job: JobEnvironment) -> None:
        self._time_limit = threading.Event()
        self._terminate = threading.Event()
        self.received: str | None = None
        self.terminate_at: float | None = None
        self._job = job
        self._flag_file = Path(run_dir) / PREEMPT_FILE if run_dir else None
        self._previous = {
            signal.SIGUSR1: signal.signal(signal.SIGUSR1, self._on_time_limit),
            signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_terminate),
        }

    def _on_time_limit(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum).name
        self._time_limit.set()

    def _on_terminate(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        if self.terminate_at is None:
            self.terminate_at = time.monotonic()
        self._terminate.set()

    def seen_here(self) -> StopKind:
        """What this rank alone has seen; a SIGTERM is classified later, on rank 0."""
        if self._terminate.is_set():
            return StopKind.REQUEUE
        if self._time_limit.is_set() or bool(self._flag_file and self._flag_file.exists()):
            return StopKind.TIME_LIMIT
        return StopKind.NONE

    def _classify_here(self) -> StopKind:
        slurm = self._job.slurm
        if slurm is None:
            return StopKind.CANCEL  # SIGTERM outside Slurm: someone stopped the run
        view = read_slurm_view(slurm.job_id, slurm.restart_count)
        return classify_termination(view)

    def agreed(self, device: torch.device) -> StopKind:
        """The same answer on every rank (one all-reduce, plus one broadcast after a SIGTERM)."""
        code = torch.tensor([int(self.seen_here())], dtype=torch.int64, device=device)
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
        kind = StopKind(int(code.item()))
        if kind != StopKind.REQUEUE:
            return kind
        # Some rank got SIGTERM: rank 0 asks Slurm whether the job is being requeued or cancelled.
        if not distributed or dist.get_rank() == 0:
            code.fill_(int(self._classify_here()))
        if distributed:
            dist.broadcast(code, src=0)
        return StopKind(int(code.item()))

    def seconds_since_terminate(self) -> float:
        return 0.0 if self.terminate_at is None else time.monotonic() - self.terminate_at

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
