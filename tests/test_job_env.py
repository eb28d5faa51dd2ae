"""The job environment is read in one place (sd35dist/runtime/job_env.py) into a typed object."""

from __future__ import annotations

import os
import socket

import pytest

from sd35dist.config.loading import ConfigError
from sd35dist.runtime.job_env import JobEnvironment, submit_state_dir, torchrun_variables_for

pytestmark = pytest.mark.unit

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1",
            "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}


def test_a_rank_under_torchrun_in_a_requeued_slurm_job():
    job = JobEnvironment.read({**TORCHRUN, "SLURM_JOB_ID": "417", "SLURM_RESTART_COUNT": "1",
                               "SLURMD_NODENAME": "gpu-003", "SD35DIST_RUN_DIR": "/runs/a",
                               "SD35DIST_SIGNAL_GRACE_S": "300"})
    assert (job.rank, job.world_size, job.node, job.run_dir, job.signal_grace_s) == (3, 8, "gpu-003", "/runs/a", 300.0)
    assert job.torchrun.local_rank == 1 and job.torchrun.local_world_size == 2
    assert job.torchrun.restart_count == 2 and job.torchrun.agent_hosts_store is True
    assert job.slurm.job_id == "417" and job.slurm_restart_count == 1


def test_a_plain_process_outside_any_job():
    job = JobEnvironment.read({})
    assert job.torchrun is None and job.slurm is None and job.run_dir is None and job.signal_grace_s is None
    assert (job.rank, job.world_size, job.slurm_restart_count, job.node) == (0, 1, 0, socket.gethostname())


@pytest.mark.parametrize("env, key", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK"),
    ({**TORCHRUN, "RANK": "eight"}, "RANK"),
    ({**TORCHRUN, "RANK": "8"}, "RANK"),
    ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK"),
    ({**TORCHRUN, "MASTER_PORT": "port"}, "MASTER_PORT"),
    ({"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "-1"}, "SLURM_RESTART_COUNT"),
    ({"SD35DIST_SIGNAL_GRACE_S": "soon"}, "SD35DIST_SIGNAL_GRACE_S"),
])
def test_a_malformed_variable_is_one_line_naming_it(env, key):
    with pytest.raises(ConfigError) as caught:
        JobEnvironment.read(env)
    assert caught.value.key == key and "\n" not in str(caught.value)


def test_the_submit_state_dir_follows_the_override_then_xdg():
    assert submit_state_dir({"SD35DIST_STATE_DIR": "/s"}) == "/s"
    assert submit_state_dir({"XDG_STATE_HOME": "/x"}) == "/x/sd35dist"


def test_deepspeed_gets_the_torchrun_variables_only_inside_the_block(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with torchrun_variables_for(None, rank=0, local_rank=0, world_size=1):
        assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "1")
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE"} & set(os.environ), "left behind in the caller's environment"


def test_under_torchrun_the_variables_are_left_as_they_are(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    place = JobEnvironment.read(TORCHRUN).torchrun
    with torchrun_variables_for(place, rank=3, local_rank=1, world_size=8):
        assert os.environ["RANK"] == "5"
    assert os.environ["RANK"] == "5"
