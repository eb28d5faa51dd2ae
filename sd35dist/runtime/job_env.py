"""The job's environment, read once into a typed object: torchrun's variables, Slurm's and ours.

Nothing else in sd35dist or the launcher reads these variables from `os.environ`
(tests/test_import_hygiene.py checks it): code that needs the rank, the Slurm job id or the run
directory is given a `JobEnvironment` (or the `World` built from one). Reading is pure —
`JobEnvironment.read(env)` takes any mapping — so every rule here is unit-tested without
processes. No torch here: the launcher reads the same object on the submit host.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from sd35dist.config.loading import ConfigError

# Our own variables: the job script exports them (launcher/plan.py), the ranks read them here.
RUN_DIR_VAR = "SD35DIST_RUN_DIR"
"""The run directory, exported by the job script to every node (agents and ranks)."""
SIGNAL_GRACE_VAR = "SD35DIST_SIGNAL_GRACE_S"
"""Seconds between Slurm's time-limit warning and the limit (the profile's slurm.signal_grace_s)."""
RDZV_HOST_VAR = "SD35DIST_RDZV_HOST"
"""The first node of the allocation: the c10d rendezvous endpoint's host."""
RDZV_PORT_VAR = "SD35DIST_RDZV_PORT"
"""The rendezvous port, per job (two jobs sharing a node must not share it)."""
COLLECTIVE_TIMEOUT_VAR = "SD35DIST_COLLECTIVE_TIMEOUT_S"
"""Seconds a collective may wait for a peer (the profile's gpu_env.collective_timeout_s); unset: the job's own."""
STATE_DIR_VAR = "SD35DIST_STATE_DIR"
"""Where the submit host keeps job id → run directory records (default ~/.local/state/sd35dist)."""

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets for every worker; all or none of them must be present."""
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURMD_NODENAME")
"""The Slurm variables sd35dist reads (on the ranks and in the batch shell)."""
TORCHELASTIC_VARIABLES = ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")
"""torchrun's agent's own variables: the restart attempt and whether the agent hosts the store."""
READ_HERE = TORCHRUN_VARIABLES + ("LOCAL_WORLD_SIZE",) + SLURM_VARIABLES + TORCHELASTIC_VARIABLES + (
    RUN_DIR_VAR, SIGNAL_GRACE_VAR, STATE_DIR_VAR, COLLECTIVE_TIMEOUT_VAR)
"""Every variable this module owns; the hygiene test refuses a read of one anywhere else."""


@dataclass(frozen=True, kw_only=True)
class TorchrunPlace:
    """Where a worker sits, as torchrun's variables say."""

    rank: int
    """Global rank, 0 … world_size-1."""
    world_size: int
    local_rank: int
    """Rank among the workers on this node; also the CUDA device index."""
    local_world_size: int
    master_addr: str
    master_port: int
    restart_count: int
    """TORCHELASTIC_RESTART_COUNT: how many times this node's agent restarted its workers."""
    agent_hosts_store: bool
    """TORCHELASTIC_USE_AGENT_STORE: the agent's rendezvous store is shared with the workers."""


@dataclass(frozen=True, kw_only=True)
class SlurmPlace:
    """The Slurm job a process runs in."""

    job_id: str
    restart_count: int
    """SLURM_RESTART_COUNT: how many times the job was requeued (0 on the first run)."""


@dataclass(frozen=True, kw_only=True)
class JobEnvironment:
    torchrun: TorchrunPlace | None
    """None outside torchrun (a plain one-process `python -m sd35dist …`)."""
    slurm: SlurmPlace | None
    """None outside a Slurm job."""
    run_dir: str | None
    """The run directory the job script exported (None for a hand-started process)."""
    signal_grace_s: float | None
    collective_timeout_s: float | None = None
    """The profile's collective timeout (SD35DIST_COLLECTIVE_TIMEOUT_S); None: each job's own default."""
    node: str
    """Slurm's name for this node (SLURMD_NODENAME: what sacct and scontrol show), else the hostname."""

    @classmethod
    def read(cls, env: Mapping[str, str] | None = None) -> JobEnvironment:
        """Read `env` (default: this process's environment); a malformed value is a ConfigError."""
        env = os.environ if env is None else env
        job_id = env.get("SLURM_JOB_ID", "").strip()
        slurm = None
        if job_id:
            slurm = SlurmPlace(job_id=job_id, restart_count=_count(env, "SLURM_RESTART_COUNT"))
        grace = env.get(SIGNAL_GRACE_VAR, "").strip()
        timeout = env.get(COLLECTIVE_TIMEOUT_VAR, "").strip()
        return cls(torchrun=_torchrun_place(env), slurm=slurm, run_dir=env.get(RUN_DIR_VAR) or None,
                   signal_grace_s=_number(SIGNAL_GRACE_VAR, grace) if grace else None,
                   collective_timeout_s=_number(COLLECTIVE_TIMEOUT_VAR, timeout) if timeout else None,
                   node=env.get("SLURMD_NODENAME") or socket.gethostname())

    @property
    def rank(self) -> int:
        return self.torchrun.rank if self.torchrun else 0

    @property
    def world_size(self) -> int:
        return self.torchrun.world_size if self.torchrun else 1

    @property
    def slurm_restart_count(self) -> int:
        return self.slurm.restart_count if self.slurm else 0


def submit_state_dir(env: Mapping[str, str] | None = None) -> str:
    """Where the submit host records its jobs: SD35DIST_STATE_DIR, else $XDG_STATE_HOME/sd35dist."""
    env = os.environ if env is None else env
    return env.get(STATE_DIR_VAR) or os.path.join(
        env.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "sd35dist")


@contextmanager
def torchrun_variables_for(place: TorchrunPlace | None, rank: int, local_rank: int,
                           world_size: int) -> Iterator[None]:
    """RANK, LOCAL_RANK and WORLD_SIZE set for the duration of the block, then removed again.

    DeepSpeed's initialize reads them from os.environ (it asserts LOCAL_RANK): under torchrun
    they are there already and nothing changes; a one-process run without torchrun gets them
    only while DeepSpeed is being set up, in front of the caller, never behind its back.
    """
    if place is not None:
        yield
        return
    added = {name: str(value) for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank),
                                                  ("WORLD_SIZE", world_size)) if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _torchrun_place(env: Mapping[str, str]) -> TorchrunPlace | None:
    present = [name for name in TORCHRUN_VARIABLES if name in env]
    if not present:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in env]
    if missing:
        raise ConfigError("environment", missing[0],
                          "not set; start ranks with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR …)")
    rank, world_size = _integer(env, "RANK"), _integer(env, "WORLD_SIZE")
    local_rank = _integer(env, "LOCAL_RANK")
    local_world_size = _integer(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else local_rank + 1
    if not 0 <= rank < world_size:
        raise ConfigError("environment", "RANK", f"must be in [0, WORLD_SIZE={world_size}), got {rank}")
    if not 0 <= local_rank < local_world_size:
        raise ConfigError("environment", "LOCAL_RANK",
                          f"must be in [0, LOCAL_WORLD_SIZE={local_world_size}), got {local_rank}")
    return TorchrunPlace(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size,
                         master_addr=env["MASTER_ADDR"], master_port=_integer(env, "MASTER_PORT"),
                         restart_count=_count(env, "TORCHELASTIC_RESTART_COUNT"),
                         agent_hosts_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == str(True))


def _integer(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise ConfigError("environment", name, f"expected an integer, got {raw!r}") from None


def _count(env: Mapping[str, str], name: str) -> int:
    """A non-negative counter that may be unset or empty (0 then)."""
    raw = env.get(name, "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise ConfigError("environment", name, f"expected a count (0, 1, …), got {raw!r}")
    return int(raw)


def _number(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError("environment", name, f"expected a number of seconds, got {raw!r}") from None
