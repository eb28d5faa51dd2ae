"""How long a checkpoint save takes, against the time Slurm gives one (no torch here).

Two deadlines bound a save that is not on the trainer's own schedule:
- the time-limit warning comes `slurm.signal_grace_s` before the limit: the ranks finish
  the step they are in, then save — both must fit;
- on cancel, requeue and preemption Slurm sends SIGKILL `KillWait` seconds after its
  SIGTERM: a save that does not fit is skipped (the previous checkpoint stays `latest`).

`sd35dist preflight` estimates the save time from the checkpoint's bytes and the measured
write bandwidth of `output.dir`; the trainer replaces the estimate by what its saves really
took. Both write `<output.dir>/save_estimate.json`, which `submit` and the job's first log
line read to warn before hours are lost.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sd35dist.runtime.atomic_files import write_text_atomically
from sd35dist.runtime.job_env import JobEnvironment
from sd35dist.runtime.slurm_query import kill_wait_s

SAVE_ESTIMATE_FILE = "save_estimate.json"


@dataclass(frozen=True)
class SaveEstimate:
    save_s: float
    """Seconds one checkpoint save takes on this output directory."""
    step_s: float | None
    """Seconds one optimizer step takes, once a run has measured it."""
    source: str
    """How it was obtained, for the warning: 'preflight: 2.1 GB per rank at 410 MB/s' or 'measured at step 400'."""


def grace_warnings(*, signal_grace_s: float | None, kill_wait_s: float | None, save_s: float | None,
                   step_s: float | None) -> list[str]:
    """One line per deadline that a save (plus, for the time limit, a step) does not fit."""
    if save_s is None:
        return []
    out = []
    needed = save_s + (step_s or 0.0)
    if signal_grace_s is not None and signal_grace_s < needed:
        what = "a checkpoint save plus a step" if step_s else "a checkpoint save"
        out.append(
            f"slurm.signal_grace_s ({signal_grace_s:g} s) is shorter than {what} (~{needed:.0f} s): the save at the "
            "time-limit warning will not finish and the run goes back to its last periodic checkpoint; "
            "raise slurm.signal_grace_s in the profile"
        )
    if kill_wait_s is not None and kill_wait_s < save_s:
        out.append(
            f"the cluster's KillWait ({kill_wait_s:g} s) is shorter than a checkpoint save (~{save_s:.0f} s): on "
            "cancel, requeue or preemption the ranks skip the final save and resume from the last periodic checkpoint"
        )
    return out


def _local_dir(output_dir: str) -> Path | None:
    if "://" in output_dir and not output_dir.startswith("file://"):
        return None
    return Path(output_dir.removeprefix("file://")).expanduser()


def read_save_estimate(output_dir: str) -> SaveEstimate | None:
    """The recorded estimate, or None when there is none (or the directory is not local)."""
    directory = _local_dir(output_dir)
    if directory is None:
        return None
    try:
        data = json.loads((directory / SAVE_ESTIMATE_FILE).read_text())
        return SaveEstimate(save_s=float(data["save_s"]),
                            step_s=None if data.get("step_s") is None else float(data["step_s"]),
                            source=str(data["source"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_save_estimate(output_dir: str, estimate: SaveEstimate) -> None:
    """Replace the recorded estimate atomically (a reader never sees half a file)."""
    directory = _local_dir(output_dir)
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomically(directory / SAVE_ESTIMATE_FILE, json.dumps(asdict(estimate)))


@dataclass
class SaveBudget:
    """One job's deadlines and what a save costs; rank 0 keeps it and warns from it."""

    output_dir: str
    signal_grace_s: float | None
    kill_wait_s: float | None
    estimate: SaveEstimate | None
    measured_once: bool = False

    @classmethod
    def for_this_job(cls, output_dir: str, last_save_s: float | None, job: JobEnvironment) -> SaveBudget:
        estimate = read_save_estimate(output_dir)
        if last_save_s is not None:
            estimate = SaveEstimate(last_save_s, estimate.step_s if estimate else None, "measured by the last run")
        return cls(output_dir=output_dir, signal_grace_s=job.signal_grace_s,
                   kill_wait_s=kill_wait_s() if job.slurm else None, estimate=estimate)

    def warnings(self, step_s: float | None) -> list[str]:
        if self.estimate is None:
            return []
        return grace_warnings(signal_grace_s=self.signal_grace_s, kill_wait_s=self.kill_wait_s,
                              save_s=self.estimate.save_s, step_s=step_s or self.estimate.step_s)

    def measured(self, save_s: float | None, step_s: float, step: int) -> bool:
        """Record a save this run timed; True the first time, when the caller warns with real numbers."""
        if save_s is None:
            return False
        self.estimate = SaveEstimate(round(save_s, 3), round(step_s, 3), f"measured at step {step}")
        write_save_estimate(self.output_dir, self.estimate)
        first, self.measured_once = not self.measured_once, True
        return first
