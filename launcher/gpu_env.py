"""The environment large GPU jobs need, each variable with the reason it is set: pure.

A profile whose nodes have GPUs gets these exported in its job script, each under a comment
saying why (the profile's `gpu_env:` section turns them off one by one; a name the profile sets
itself in `env.values` wins). docs/gpu.md is the user's view of the same table.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field

from sd35dist.config.loading import StrictModel
from sd35dist.runtime.job_env import COLLECTIVE_TIMEOUT_VAR, RUN_DIR_VAR


class GpuEnvSection(StrictModel):
    """Settings for jobs on GPUs (NCCL), rendered into the job script with why (launcher/gpu_env.py)."""

    enabled: bool | Literal["auto"] = "auto"
    """auto: when the profile's nodes have GPUs (slurm.gpus_per_node or local.gpus); true or false forces it."""
    expandable_segments: bool = True
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: no fragmentation from shapes that change per bucket."""
    collective_timeout_s: int = Field(1800, ge=60)
    """How long any collective may wait for a peer before the rank fails (the process group's timeout)."""
    async_error_handling: bool = True
    """TORCH_NCCL_ASYNC_ERROR_HANDLING=3: a failed or timed-out NCCL collective ends the rank instead of hanging."""
    flight_recorder: bool = True
    """On a collective timeout, every rank writes its last collectives to <run dir>/logs/nccl-trace-rank<N>."""
    nccl_debug: Literal["WARN", "INFO", "VERSION"] | None = "WARN"
    """NCCL_DEBUG: WARN puts NCCL's own warnings (a link down, a fallback to sockets) in the job log."""


@dataclasses.dataclass(frozen=True)
class EnvSetting:
    name: str
    value: str
    why: str


def gpu_environment(section: GpuEnvSection, *, has_gpus: bool) -> tuple[EnvSetting, ...]:
    """The variables the section asks for, in the order the script exports them; () when it is off."""
    if not (has_gpus if section.enabled == "auto" else section.enabled):
        return ()
    out: list[EnvSetting] = []
    if section.expandable_segments:
        out.append(EnvSetting("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True",
                              "activation shapes change with every aspect bucket: growable segments instead of "
                              "cached blocks per shape, so fragmentation cannot run a job that fits out of memory"))
    out.append(EnvSetting(COLLECTIVE_TIMEOUT_VAR, str(section.collective_timeout_s),
                          "a collective waits at most this long for a peer (the first step compiles and loads "
                          "weights for minutes: longer than torch's 10-minute default)"))
    if section.async_error_handling:
        out.append(EnvSetting("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3",
                              "a failed or timed-out NCCL collective ends the rank, so torchrun restarts the "
                              "workers (launch.max_restarts) instead of the job hanging until its time limit"))
    if section.flight_recorder:
        out.append(EnvSetting("TORCH_NCCL_DUMP_ON_TIMEOUT", "1",
                              "on a timeout each rank dumps its last collectives (torch's flight recorder) ..."))
        out.append(EnvSetting("TORCH_FR_DUMP_TEMP_FILE", f"${RUN_DIR_VAR}/logs/nccl-trace-rank",
                              "... into the run's logs, one file per rank: which rank was stuck in which collective"))
    if section.nccl_debug:
        out.append(EnvSetting("NCCL_DEBUG", section.nccl_debug,
                              "NCCL's own warnings (a link down, a fallback to sockets) reach the job log"))
    return tuple(out)
