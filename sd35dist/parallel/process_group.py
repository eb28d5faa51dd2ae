"""Joining the job's process group from the torchrun environment, once per rank.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT
for every worker; sd35dist/runtime/job_env.py reads them, and this module turns them into a
`World` and an initialised default process group (NCCL on GPUs, gloo on CPU). The preflight,
the trainer and the cache builder all start here, so every job agrees on backend, device and timeout rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from sd35dist.runtime.job_env import JobEnvironment, TorchrunPlace


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
    job: JobEnvironment = field(default_factory=lambda: JobEnvironment.read({}), compare=False)
    """The job environment this place was read from (Slurm job, run directory, restart counts)."""

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


def world_from_job(job: JobEnvironment, backend: str) -> World:
    """Where this process sits: torchrun's place, or a single-process world (plain `python`)."""
    place = job.torchrun
    if place is None:
        return World(0, 1, 0, 1, job.node, backend, job)
    return World(place.rank, place.world_size, place.local_rank, place.local_world_size, job.node, backend, job)


def world_from_env(env: Mapping[str, str], backend: str) -> World:
    return world_from_job(JobEnvironment.read(env), backend)


def init_process_group_from_env(timeout_s: float, env: Mapping[str, str] | None = None) -> World:
    """Initialise the default process group for this rank and return where it sits.

    `timeout_s` bounds every collective as well as the rendezvous, so a rank that died or
    hangs turns into an error on its peers instead of a job that waits forever; the profile's
    gpu_env.collective_timeout_s (SD35DIST_COLLECTIVE_TIMEOUT_S), when the job script sets it, replaces it.
    """
    job = JobEnvironment.read(env)
    backend = pick_backend(torch.cuda.is_available())
    world = world_from_job(job, backend)
    timeout = timedelta(seconds=collective_timeout_s(job, timeout_s))
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
        device_id = world.device
    if job.torchrun is not None:
        dist.init_process_group(
            backend, store=attempt_store(job.torchrun, timeout), rank=world.rank, world_size=world.world_size,
            timeout=timeout, device_id=device_id,
        )
    else:
        # No torchrun: a one-process group on an in-memory store, so the same code runs unchanged.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, device_id=device_id
        )
    return world


def collective_timeout_s(job: JobEnvironment, default_s: float) -> float:
    """The profile's collective timeout when the job script exported one, else the job's own default."""
    return job.collective_timeout_s if job.collective_timeout_s is not None else default_s


def attempt_store(place: TorchrunPlace, timeout: timedelta) -> dist.Store:
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
    store = dist.TCPStore(place.master_addr, place.master_port, place.world_size,
                          is_master=not place.agent_hosts_store and place.rank == 0, timeout=timeout)
    if not place.agent_hosts_store:
        return store
    return dist.PrefixStore(f"sd35dist/attempt-{place.restart_count}", store)


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
