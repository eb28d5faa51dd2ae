"""Stop reasons: signals and the PREEMPT file, and Slurm's view telling requeue from cancel."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from sd35dist.runtime.job_env import JobEnvironment
from sd35dist.trainer.preemption import (
    PREEMPT_FILE,
    PreemptionWatch,
    SlurmJobView,
    StopKind,
    classify_termination,
    save_fits,
)

pytestmark = pytest.mark.unit


# What the two-node test cluster's sacct and scontrol said inside a task that had just
# received SIGTERM (Slurm 22.05): scancel → "CANCELLED by 0", Restarts unchanged;
# scontrol requeue → "REQUEUED", Restarts already incremented.
@pytest.mark.parametrize(
    ("state", "restarts", "restart_count", "kind"),
    [
        ("CANCELLED by 0", 0, 0, StopKind.CANCEL),
        ("CANCELLED by 1000", 3, 2, StopKind.CANCEL),
        ("REQUEUED", 1, 0, StopKind.REQUEUE),
        ("PREEMPTED", 0, 0, StopKind.REQUEUE),
        ("NODE_FAIL", 2, 1, StopKind.REQUEUE),
        ("TIMEOUT", 0, 0, StopKind.TIME_LIMIT),
        # No accounting: the restart counter alone.
        (None, 1, 0, StopKind.REQUEUE),
        (None, 0, 0, StopKind.CANCEL),
        ("RUNNING", 4, 4, StopKind.CANCEL),
        # Nothing known: never requeue a job someone may have meant to stop.
        (None, None, 0, StopKind.CANCEL),
    ],
)
def test_sigterm_is_classified_by_slurms_view(state, restarts, restart_count, kind):
    assert classify_termination(SlurmJobView(state, restarts, restart_count)) is kind


def test_a_save_is_attempted_only_when_it_ends_before_the_kill():
    assert save_fits(elapsed_s=1.0, save_s=2.0, kill_wait_s=5.0)
    assert not save_fits(elapsed_s=1.0, save_s=4.5, kill_wait_s=5.0)
    assert not save_fits(elapsed_s=0.0, save_s=30.0, kill_wait_s=30.0)
    assert save_fits(elapsed_s=10.0, save_s=None, kill_wait_s=5.0), "unknown save time: try, latest stays intact"
    assert save_fits(elapsed_s=10.0, save_s=3.0, kill_wait_s=None)


def test_usr1_and_the_preempt_file_mean_time_limit(tmp_path):
    watch = PreemptionWatch(str(tmp_path), JobEnvironment.read({}))
    try:
        assert watch.agreed(torch.device("cpu")) is StopKind.NONE
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.agreed(torch.device("cpu")) is StopKind.TIME_LIMIT
    finally:
        watch.restore()
    other = PreemptionWatch(str(tmp_path), JobEnvironment.read({}))
    try:
        assert other.seen_here() is StopKind.NONE
        (tmp_path / PREEMPT_FILE).write_text("")
        assert other.agreed(torch.device("cpu")) is StopKind.TIME_LIMIT
    finally:
        other.restore()


def test_sigterm_outside_slurm_is_a_cancel_and_is_timed(tmp_path):
    watch = PreemptionWatch(str(tmp_path), JobEnvironment.read({}))
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.received == "SIGTERM"
        assert watch.agreed(torch.device("cpu")) is StopKind.CANCEL
        assert 0.0 <= watch.seconds_since_terminate() < 5.0
    finally:
        watch.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
