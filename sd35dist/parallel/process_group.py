"""Joining the job's process group from the torchrun environment, once per rank.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT
for every worker; this module turns them into a `World` and an initialised default process
group (NCCL on GPUs, gloo on CPU). The preflight, the trainer and the cache builder all start
here, so every job agrees on backend, device and timeout rules.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sd35dist.config.loading import ConfigError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """Where this process sits in the job."""

    rank: int
    """Global rank, 0 … world_size-1."""
    world_size: int
    """Processes in the job (one per GPU, or per CPU worker)."""
    local_rank: int
    """Rank among the processes on this node; also the CUDA device index."""
    local_world_size: int
    """Processes on this node."""
    node: str
    """Slurm's name for this node (SLURMD_NODENAME), else the hostname."""
    backend: str
    """Process-group backend: nccl or gloo."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """The device collectives run on: this rank's GPU under NCCL, the CPU under gloo."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def pick_backend(cuda_available: bool) -> str:
    return "nccl" if cuda_available else "gloo"


def node_name(env: Mapping[str, str]) -> str:
    """Slurm's node name when running under Slurm (matches `scontrol` and sacct), else the hostname."""
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def _int_variable(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise ConfigError("environment", name, f"expected an integer, got {raw!r}") from None


def world_from_env(env: Mapping[str, str], backend: str) -> World:
    """Read the torchrun variables; with none of them set, a single-process world (plain `python`)."""
    present = [name for name in TORCHRUN_VARIABLES if name in env]
    if not present:
        return World(0, 1, 0, 1, node_name(env), backend)
    missing = [name for name in TORCHRUN_VARIABLES if name not in env]
    if missing:
        raise ConfigError(
            "environment", missing[0], "not set; start ranks with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR …)"
        )
    rank = _int_variable(env, "RANK")
    world_size = _int_variable(env, "WORLD_SIZE")
    local_rank = _int_variable(env, "LOCAL_RANK")
    local_world_size = _int_variable(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else local_rank + 1
    if not 0 <= rank < world_size:
        raise ConfigError("environment", "RANK", f"must be in [0, WORLD_SIZE={world_size}), got {rank}")
    if not 0 <= local_rank < local_world_size:
        raise ConfigError(
            "environment", "LOCAL_RANK", f"must be in [0, LOCAL_WORLD_SIZE={local_world_size}), got {local_rank}"
        )
    return World(rank, world_size, local_rank, local_world_size, node_name(env), backend)


def init_process_group_from_env(timeout_s: float, env: Mapping[str, str] | None = None) -> World:
    """Initialise the default process group for this rank and return where it sits.

    `timeout_s` bounds every collective as well as the rendezvous, so a rank that died or
    hangs turns into an error on its peers instead of a job that waits forever.
    """
    env = os.environ if env is None else env
    backend = pick_backend(torch.cuda.is_available())
    world = world_from_env(env, backend)
    timeout = timedelta(seconds=timeout_s)
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
        device_id = world.device
    if "MASTER_ADDR" in env:
        dist.init_process_group(
            backend, store=attempt_store(env, world, timeout), rank=world.rank, world_size=world.world_size,
            timeout=timeout, device_id=device_id,
        )
    else:
        # No torchrun: a one-process group on an in-memory store, so the same code runs unchanged.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, device_id=device_id
        )
    return world


def attempt_store(env: Mapping[str, str], world: World, timeout: timedelta) -> dist.Store:
    """The rendezvous store as this attempt of the workers sees it.

    Under `sd35dist torchrun` (what job scripts run) with restarts on (`launch.max_restarts`,
    default 3) each attempt's rank 0 hosts a fresh store on the port the agents' rendezvous
    round chose (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), so a
    restarted group (`--max-restarts`) starts from empty keys. Under plain torchrun the agent's
    store lives through every restart and keeps the previous attempt's keys (the killed rank's gloo
    address, barrier counters); a prefix per restart count is the best that can be done there,
    and it is not enough across nodes: an agent whose own workers did not fail restarts without
    counting it (torch's "membership change"), so the nodes' counts, and their prefixes, differ and
    the group waits for peers that write under another prefix.
    """
    agent_hosts_it = env.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world.world_size,
                          is_master=not agent_hosts_it and world.rank == 0, timeout=timeout)
    if not agent_hosts_it:
        return store
    return dist.PrefixStore(f"sd35dist/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
