"""Cluster profiles: *where* a job runs (scheduler, resources, setup, environment, rendezvous).

A profile is a YAML file in cluster_configs/ (or any path). What to run is the recipe's
business; the two are validated together in launcher/plan.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field

from launcher.gpu_env import GpuEnvSection
from sd35dist.config.loading import ConfigError, StrictModel, load_mapping, validate_mapping
from sd35dist.config.resource_plan import GPU_PRESETS, Hardware

PROFILE_DIR = Path(__file__).resolve().parent.parent / "cluster_configs"

# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME_FORMS = (
    (re.compile(r"^(\d+)$"), ("m",)),
    (re.compile(r"^(\d+):(\d{1,2})$"), ("m", "s")),
    (re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})$"), ("h", "m", "s")),
    (re.compile(r"^(\d+)-(\d{1,2})$"), ("d", "h")),
    (re.compile(r"^(\d+)-(\d{1,2}):(\d{1,2})$"), ("d", "h", "m")),
    (re.compile(r"^(\d+)-(\d{1,2}):(\d{1,2}):(\d{1,2})$"), ("d", "h", "m", "s")),
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def slurm_time_minutes(text: str) -> int:
    """Minutes in a Slurm time limit (rounded up); ValueError for anything Slurm would reject."""
    for pattern, units in _TIME_FORMS:
        match = pattern.match(text.strip())
        if match:
            seconds = sum(int(v) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[u] for v, u in zip(match.groups(), units))
            if seconds <= 0:
                raise ValueError(f"time limit '{text}' must be positive")
            return -(-seconds // 60)
    raise ValueError(f"malformed time '{text}': use HH:MM:SS, D-HH:MM:SS or minutes")


class SlurmSection(StrictModel):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    """GPUs requested per node (0 on CPU-only partitions)."""
    cpus_per_task: int = Field(1, ge=1)
    """CPUs for the one task per node (torchrun and all its workers)."""
    mem: str = "0"
    """Memory per node in Slurm's form (64G, 500000M); 0 means all of the node's memory."""
    time: str = "1:00:00"
    constraint: str | None = None
    exclusive: bool = False
    requeue: bool = True
    """Requeue the job after preemption or a node failure; the trainer resumes from `latest`."""
    signal_grace_s: int = Field(120, ge=1)
    """Slurm sends USR1 to the batch shell this many seconds before the time limit; the ranks
    then save and the job requeues. Must exceed one checkpoint save plus one step."""

    @pydantic.field_validator("time")
    @classmethod
    def _time(cls, value: str) -> str:
        slurm_time_minutes(value)
        return value

    @pydantic.field_validator("mem")
    @classmethod
    def _mem(cls, value: str) -> str:
        if not re.fullmatch(r"\d+[KMGT]?", str(value)):
            raise ValueError(f"malformed memory '{value}': use e.g. 64G, 500000M or 0 (all)")
        return str(value)


class LocalSection(StrictModel):
    gpus: int = Field(0, ge=0)
    """GPUs this machine offers to the job (0: CPU with gloo)."""
    time: str = "24:00:00"
    """Wall-clock limit for the local job."""

    @pydantic.field_validator("time")
    @classmethod
    def _time(cls, value: str) -> str:
        slurm_time_minutes(value)
        return value


class LaunchSection(StrictModel):
    procs_per_node: int | None = Field(None, ge=1)
    """torchrun workers per node; default: one per GPU, or 1 without GPUs."""
    rdzv_port: int = Field(29500, ge=1024, le=65535)
    """First port of the c10d rendezvous range on the first node; a Slurm job takes
    `rdzv_port + job id % rdzv_port_span`, so jobs sharing a node never share a port."""
    rdzv_port_span: int = Field(1000, ge=1, le=20000)
    """How many ports the rendezvous range holds."""
    max_restarts: int = Field(3, ge=0, le=100)
    """torchrun restarts of the workers after a crash (a killed rank, a lost device), inside the
    allocation, from the latest checkpoint. A mistake (exit status 2) is never restarted."""
    network_interface: str | None = None
    """Sets NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME (e.g. ib0, eth0)."""
    warm_ranks: bool = True
    """Each node imports torch, diffusers and the job once, in a fork server, and forks its ranks
    (and restarted ranks) from it (torchrun --start-method=forkserver); false: one fresh interpreter
    per rank (--start-method=spawn). sd35dist/jobs/warm_ranks.py."""

    @pydantic.model_validator(mode="after")
    def _port_range(self) -> LaunchSection:
        if self.rdzv_port + self.rdzv_port_span - 1 > 65535:
            raise ValueError(f"rdzv_port {self.rdzv_port} + rdzv_port_span {self.rdzv_port_span} runs past port 65535")
        return self


class EnvSection(StrictModel):
    values: dict[str, str] = Field(default_factory=dict)
    """Non-secret variables exported on every node (written into the script); credential-looking names are refused."""
    passthrough: list[str] = Field(default_factory=list)
    """Secrets passed by name from the submitting shell (e.g. WANDB_API_KEY); values are never written."""

    @pydantic.field_validator("values", mode="before")
    @classmethod
    def _values(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name, item in value.items():
                if not _ENV_NAME.match(str(name)):
                    raise ValueError(f"'{name}' is not a valid environment variable name")
                if isinstance(item, (dict, list)):
                    raise ValueError(f"{name}: value must be a string or number")
            return {str(k): str(v) for k, v in value.items()}
        return value

    @pydantic.field_validator("passthrough")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"'{name}' is not a valid environment variable name")
        return value


class SetupSection(StrictModel):
    modules: list[str] = Field(default_factory=list)
    """Environment modules to `module load` on every node."""
    lines: list[str] = Field(default_factory=list)
    """Shell lines run before launch (e.g. `source ~/venvs/sd35/bin/activate`)."""


class HardwareSection(StrictModel):
    """The GPU and links `sd35dist plan` and submit's fit check compute with (sd35dist/config/resource_plan.py)."""

    gpu: Literal["h100", "h200", "a100"] | None = None
    """A preset for every value below: h100 (SXM 80 GB: 79.6 GiB, 989 TFLOP/s bf16, 60% of it reached,
    NVLink 360 GB/s, 50 GB/s NIC per GPU, FP8), h200 (the same with 140.4 GiB) or a100 (SXM 80 GB:
    79.2 GiB, 312 TFLOP/s, NVLink 240 GB/s, 25 GB/s NIC, no FP8). None: no GPU declared, so no fit
    check, no step time and no FP8 check."""
    memory_gib: float | None = Field(None, gt=0)
    peak_bf16_tflops: float | None = Field(None, gt=0)
    matmul_efficiency: float | None = Field(None, gt=0, le=1)
    """Share of the peak the training kernels reach."""
    intra_node_gb_s: float | None = Field(None, gt=0)
    """Collective bandwidth per GPU inside a node, GB/s."""
    inter_node_gb_s: float | None = Field(None, gt=0)
    """Network bandwidth per GPU between nodes, GB/s (400 Gb/s = 50)."""
    fp8: bool | None = None
    """Whether the GPU has FP8 tensor cores (train.fp8 is refused without); a preset says it."""

    def resolved(self) -> Hardware | None:
        """The preset with this section's values over it; None when neither a preset nor every value is given."""
        values = {k: v for k, v in self.model_dump().items() if k != "gpu" and v is not None}
        if self.gpu is not None:
            return Hardware(**{**GPU_PRESETS[self.gpu].__dict__, **values})
        # Every value but the name (and fp8, which defaults to yes) makes a custom GPU.
        if len(set(values) - {"fp8"}) == len(Hardware.__dataclass_fields__) - 2:
            return Hardware(name="custom", **values)
        return None


class Profile(StrictModel):
    scheduler: Literal["slurm", "local"]
    slurm: SlurmSection | None = None
    local: LocalSection | None = None
    launch: LaunchSection = Field(default_factory=LaunchSection)
    env: EnvSection = Field(default_factory=EnvSection)
    setup: SetupSection = Field(default_factory=SetupSection)
    hardware: HardwareSection = Field(default_factory=HardwareSection)
    gpu_env: GpuEnvSection = Field(default_factory=GpuEnvSection)
    """Variables large GPU jobs need (allocator, NCCL timeouts and error handling), exported with why."""
    hf_home: str | None = None
    """Where Hugging Face ids in model.pretrained are downloaded (HF_HOME: its hub/ is the cache), on
    storage every node sees; default: the submitting shell's HF_HOME, else ~/.cache/huggingface."""
    run_root: str = "./runs"
    """Run directories (frozen recipe, logs, reports) are created under this; on a cluster, shared storage."""
    default_recipe: str | None = None
    """Recipe used when `--recipe` is not given; relative to the project root."""

    @pydantic.model_validator(mode="after")
    def _scheduler_section(self) -> Profile:
        if self.scheduler == "slurm" and self.slurm is None:
            raise ValueError("scheduler is slurm but there is no slurm: section")
        if self.scheduler == "local" and self.slurm is not None:
            raise ValueError("scheduler is local: remove the slurm: section or set scheduler: slurm")
        return self

    @property
    def nodes(self) -> int:
        return self.slurm.nodes if self.slurm else 1

    @property
    def gpus_per_node(self) -> int:
        if self.slurm:
            return self.slurm.gpus_per_node
        return self.local.gpus if self.local else 0

    @property
    def procs_per_node(self) -> int:
        return self.launch.procs_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def time_minutes(self) -> int:
        section = self.slurm or self.local or LocalSection()
        return slurm_time_minutes(section.time)


PROFILE_KEYS = frozenset(Profile.model_fields)


def available_profiles(profile_dir: Path = PROFILE_DIR) -> list[str]:
    return sorted(p.stem for p in profile_dir.glob("*.yaml"))


def profile_path(name_or_path: str, profile_dir: Path = PROFILE_DIR) -> Path:
    """A name from cluster_configs/ or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if not candidate.is_file():
            raise ConfigError(name_or_path, "", "profile file not found")
        return candidate
    path = profile_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(available_profiles(profile_dir)) or "none"
        raise ConfigError("--profile", name_or_path, f"unknown profile (available: {names})")
    return path


def load_profile(path: Path, overrides: list[tuple[list[str], Any]] = ()) -> Profile:  # type: ignore[assignment]
    return validate_mapping(Profile, load_mapping(path, list(overrides)), path.name)
