"""How a rank-side job ends when it fails: one line, printed once; exit status 2 for a mistake.

Under torchrun every rank runs the same code, so a corrupt shard or a missing model
directory would otherwise print one traceback per rank (`[rank0]: …`, `[rank1]: …`), and
the ranks that only lost a peer would add tracebacks of their own. Instead:

- A mistake met before the ranks join their process group (a bad recipe, a model directory
  that is not there) is the same on every rank: rank 0 prints `error: FILE: key: message`.
  The other ranks wait before they exit: torchrun stops the whole group at the first rank
  that exits, and a rank 1 that exits before rank 0 has printed would leave the job with no
  line at all. A rank still alive after the wait (rank 0 did not meet the mistake) prints it.
- A mistake met while running (a corrupt or missing shard, a resume the recipe refuses)
  writes the rank's traceback to `<run_dir>/logs/rank<N>-traceback.log`; the first rank to
  fail claims the report in the job's rendezvous store and prints
  `error: <reason> (traceback: PATH)`; rank 0, which may host that store, stays until every rank
  has claimed or a few seconds have passed. Whoever fails after it (a peer's collective broke)
  writes its traceback file, prints nothing and exits with the first failure's kind: 2 after
  a mistake, so that no torchrun agent restarts the workers for it (jobs/torchrun.py).
- Anything else is a bug: the first rank to fail keeps its traceback on stderr.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from sd35dist.checkpoint.export import ExportError
from sd35dist.checkpoint.finite import NonFiniteTraining
from sd35dist.checkpoint.layout import CheckpointNotFound, CheckpointUnreadable
from sd35dist.config.loading import ConfigError
from sd35dist.config.validation_section import PromptsFileError
from sd35dist.data.manifest import ManifestError
from sd35dist.data.shard_fetcher import ShardCorrupt, ShardUnavailable
from sd35dist.jobs.torchrun import MISTAKE_EXIT
from sd35dist.models.lora import LoraTargetError
from sd35dist.models.sd3_components import ModelDirectoryIncomplete
from sd35dist.models.transformer_build import CheckpointMismatch
from sd35dist.runtime.job_env import JobEnvironment

PEER_FAILED_EXIT = 1
FIRST_FAILURE_KEY = "sd35dist/first-failure"
CLAIMS_KEY = "sd35dist/failure-claims"
RANK0_SPEAKS_WITHIN_S = 30.0
STORE_HOST_WAITS_S = 3.0
"""How long rank 0, which hosts the store of an attempt under restarts (parallel/process_group.py),
stays after reporting for the other failing ranks to read that a report was made: gone sooner, it
takes the store with it and they print the line again."""

MISTAKES: tuple[type[BaseException], ...] = (
    ConfigError, CheckpointNotFound, CheckpointUnreadable, ExportError, ManifestError, ShardCorrupt, ShardUnavailable,
    ModelDirectoryIncomplete, CheckpointMismatch, NonFiniteTraining, LoraTargetError, PromptsFileError,
)
"""Errors whose message tells the user what to fix: one line and exit 2, never a traceback."""


def is_mistake(error: BaseException) -> bool:
    return isinstance(error, MISTAKES)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a wrapped cause message may span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def failure_line(error: BaseException, traceback_file: Path | None = None) -> str:
    line = f"error: {one_line(error)}"
    return f"{line} (traceback: {traceback_file})" if traceback_file is not None else line


def traceback_path(run_dir: Path, rank: int) -> Path:
    return run_dir / "logs" / f"rank{rank:05d}-traceback.log"


def write_traceback(error: BaseException, path: Path) -> Path | None:
    """The full traceback, for whoever needs more than the one line; None if it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(error)))
    except OSError:
        return None
    return path


def rank_from_env(env: Mapping[str, str] | None = None) -> int:
    """This process's rank before any process group exists (torchrun's RANK; 0 when run alone or
    when the environment itself is the mistake being reported)."""
    try:
        return JobEnvironment.read(env).rank
    except ConfigError:
        return 0


def claim_report(rank: int, mistake: bool) -> tuple[bool, bool]:
    """(whether this rank is the job's first to fail, whether that first failure was a mistake).

    The job's store keeps the first failure, set once for all ranks (compare_set). Without a
    process group (or with a store that is gone) every rank is first: a line printed twice beats
    a failure printed by nobody.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True, mistake
    mine = f"{'mistake' if mistake else 'bug'} rank {rank}"
    try:
        store = dist.distributed_c10d._get_default_store()
        first = store.compare_set(FIRST_FAILURE_KEY, "", mine).decode()
        store.add(CLAIMS_KEY, 1)
    except Exception:  # noqa: BLE001 — the store is only a courtesy here
        return True, mistake
    return first == mine, first.startswith("mistake")


def let_peers_claim(wait_s: float = STORE_HOST_WAITS_S) -> None:
    """On rank 0, after its report: until every rank has claimed (claim_report) or `wait_s` has passed
    (a rank that did not fail never claims)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() != 0:
        return
    deadline = time.monotonic() + wait_s
    try:
        store = dist.distributed_c10d._get_default_store()
        while store.add(CLAIMS_KEY, 0) < dist.get_world_size() and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 — the store is only a courtesy here
        return


def write_line(text: str, out: TextIO | None = None) -> None:
    """One write for the text and its newline: ranks share one stderr pipe, and print()'s separate
    write of the newline lets two ranks' lines run together into one."""
    stream = out or sys.stderr
    stream.write(text + "\n")
    stream.flush()


def report_before_group(error: BaseException, rank: int, out: TextIO | None = None,
                        wait_for_rank0_s: float = RANK0_SPEAKS_WITHIN_S) -> int:
    """A mistake every rank meets alike before the process group: rank 0 prints it; the
    others give rank 0 `wait_for_rank0_s` to print and end the group, then print it themselves."""
    if rank != 0:
        time.sleep(wait_for_rank0_s)
    write_line(failure_line(error), out)
    return MISTAKE_EXIT


def report_failure(error: BaseException, rank: int, run_dir: Path | None, out: TextIO | None = None) -> int:
    """End this rank after `error`: print one line at most, write the traceback, return the exit
    status — or re-raise a bug when this rank is the first to fail."""
    out = out or sys.stderr
    first, first_was_mistake = claim_report(rank, is_mistake(error))
    if not is_mistake(error) and first:
        raise error
    written = None
    if run_dir is not None and not isinstance(error, ConfigError):
        written = write_traceback(error, traceback_path(run_dir, rank))
    if first:
        write_line(failure_line(error, written), out)
    let_peers_claim()
    if not first:
        return MISTAKE_EXIT if first_was_mistake or is_mistake(error) else PEER_FAILED_EXIT
    return MISTAKE_EXIT
