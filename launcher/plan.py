"""JobPlan: everything a submission needs, computed purely from (profile, recipe, job, run dir).

Both ways of submitting read the same plan: the rendered sbatch script (launcher/render.py)
and submitit (launcher/submission.py). Nothing here touches files, clocks or processes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from launcher.gpu_env import EnvSetting, gpu_environment
from launcher.profile import PROFILE_KEYS, Profile
from sd35dist.config import ConfigError, Recipe, parse_override
from sd35dist.config.commands import SUBMITTABLE_JOBS, rank_start_method
from sd35dist.config.mesh_layout import MeshLayout, refuse_zero3_across_gpu_nodes, resolve_mesh
from sd35dist.config.recipe import RECIPE_KEYS
from sd35dist.runtime.job_env import RDZV_HOST_VAR, RDZV_PORT_VAR, RUN_DIR_VAR, SIGNAL_GRACE_VAR


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobPlan:
    """A job ready to render or submit. Shell variables ($SLURM_NNODES…) stay unexpanded:
    they are expanded on the cluster, by the batch shell or on each node."""

    scheduler: str
    profile_name: str
    recipe_name: str
    job: str
    job_name: str
    run_dir: str
    frozen_recipe: str
    log_dir: str
    nodes: int
    procs_per_node: int
    gpus_per_node: int
    mesh: str
    """Which mesh the ranks build (FSDP, HSDP replicas × shards, ZeRO): the job's first log line."""
    time_minutes: int
    directives: tuple[tuple[str, str | None], ...]
    """(#SBATCH option, value) in order; value None for flags such as --requeue."""
    setup_lines: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    """Non-secret variables exported before launch."""
    gpu_env: tuple[EnvSetting, ...] = ()
    """The GPU environment (launcher/gpu_env.py), exported after `env`, each with why; none that `env` sets."""
    secret_names: tuple[str, ...]
    """Variables passed by name from the submitting environment; their values are never written."""
    rdzv_port: int
    """First port of the rendezvous range; a Slurm job adds its id modulo `rdzv_port_span`."""
    rdzv_port_span: int
    launch_argv: tuple[str, ...]
    """sd35dist torchrun … -m sd35dist <job> --recipe <frozen> --run-dir <dir>: torchrun's own agent,
    which sums a failed job up in one line instead of torchrun's traceback and table."""


def split_overrides(texts: list[str]) -> tuple[list[tuple[list[str], Any]], list[tuple[list[str], Any]]]:
    """`--set` values → (profile overrides, recipe overrides), routed by their first key."""
    profile_overrides, recipe_overrides = [], []
    for text in texts:
        parts, value = parse_override(text)
        if parts[0] in PROFILE_KEYS:
            profile_overrides.append((parts, value))
        elif parts[0] in RECIPE_KEYS:
            recipe_overrides.append((parts, value))
        else:
            known = ", ".join(sorted(PROFILE_KEYS | RECIPE_KEYS))
            raise ConfigError("--set", parts[0], f"unknown key (profile and recipe keys: {known})")
    return profile_overrides, recipe_overrides


def check_fit(profile: Profile, recipe: Recipe, profile_file: str, recipe_file: str) -> None:
    """Refuse a recipe the profile cannot hold, before anything is written or submitted."""
    gpus = profile.nodes * profile.gpus_per_node
    if recipe.parallel.min_gpus > gpus:
        raise ConfigError(
            recipe_file,
            "parallel.min_gpus",
            f"recipe needs {recipe.parallel.min_gpus} GPUs but profile {profile_file} has {gpus} "
            f"({profile.nodes} node(s) × {profile.gpus_per_node})",
        )
    degree = recipe.parallel.shard_degree
    if degree is not None and (degree > profile.world_size or profile.world_size % degree):
        raise ConfigError(
            recipe_file,
            "parallel.shard_degree",
            f"{degree} must divide the world size {profile.world_size} of profile {profile_file}",
        )
    refuse_zero3_across_gpu_nodes(recipe.parallel.strategy, profile.nodes, profile.gpus_per_node, recipe_file)
    hardware = profile.hardware.resolved()
    if recipe.train.fp8 != "none" and hardware is not None and not hardware.fp8:
        raise ConfigError(recipe_file, "train.fp8", f"profile {profile_file} declares {hardware.name} GPUs, which have "
                          "no FP8 tensor cores; set fp8: none (or use an H100/H200 profile)")
    if profile.gpus_per_node and profile.procs_per_node > profile.gpus_per_node:
        raise ConfigError(
            profile_file,
            "launch.procs_per_node",
            f"{profile.procs_per_node} workers per node but only {profile.gpus_per_node} GPUs per node",
        )


def mesh_layout(profile: Profile, recipe: Recipe, recipe_file: str = "recipe") -> MeshLayout:
    """The mesh the ranks of this profile will build for this recipe (they resolve it the same way)."""
    return resolve_mesh(strategy=recipe.parallel.strategy, shard_degree=recipe.parallel.shard_degree,
                        nodes=profile.nodes, procs_per_node=profile.procs_per_node, recipe_file=recipe_file)


def _directives(profile: Profile, job_name: str, log_dir: str) -> tuple[tuple[str, str | None], ...]:
    slurm = profile.slurm
    assert slurm is not None
    out: list[tuple[str, str | None]] = [
        ("job-name", job_name),
        ("nodes", str(slurm.nodes)),
        ("ntasks-per-node", "1"),
    ]
    if slurm.gpus_per_node:
        out.append(("gpus-per-node", str(slurm.gpus_per_node)))
    out += [("cpus-per-task", str(slurm.cpus_per_task)), ("mem", slurm.mem), ("time", slurm.time)]
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(slurm, key)
        if value:
            out.append((key, value))
    if slurm.exclusive:
        out.append(("exclusive", None))
    out += [
        ("output", f"{log_dir}/%j.out"),
        ("error", f"{log_dir}/%j.err"),
        ("open-mode", "append"),
    ]
    if slurm.requeue:
        out.append(("requeue", None))
    else:
        out.append(("no-requeue", None))
    # B: the batch shell alone gets the warning; it asks the ranks to save (PREEMPT file), so
    # no signal ever reaches torchrun or srun.
    out.append(("signal", f"B:USR1@{slurm.signal_grace_s}"))
    return tuple(out)


def _env(profile: Profile, run_dir: str) -> tuple[tuple[str, str], ...]:
    values: dict[str, str] = {}
    if profile.launch.network_interface:
        values["NCCL_SOCKET_IFNAME"] = profile.launch.network_interface
        values["GLOO_SOCKET_IFNAME"] = profile.launch.network_interface
    cpus = profile.slurm.cpus_per_task if profile.slurm else 0
    if cpus:
        values["OMP_NUM_THREADS"] = str(max(1, cpus // profile.procs_per_node))
    values.update(profile.env.values)
    values[RUN_DIR_VAR] = run_dir
    if profile.slurm:
        values[SIGNAL_GRACE_VAR] = str(profile.slurm.signal_grace_s)
    return tuple(values.items())


def _launch_argv(profile: Profile, job: str, frozen_recipe: str, run_dir: str) -> tuple[str, ...]:
    if profile.scheduler == "slurm":
        rendezvous = (
            "--nnodes=$SLURM_NNODES",
            f"--nproc-per-node={profile.procs_per_node}",
            "--rdzv-id=$SLURM_JOB_ID",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=${RDZV_HOST_VAR}:${RDZV_PORT_VAR}",
        )
    else:
        # --standalone picks a free local port, so two local jobs never collide.
        rendezvous = ("--standalone", "--nnodes=1", f"--nproc-per-node={profile.procs_per_node}")
    # A crashed worker restarts every worker of the job inside the allocation; they resume from latest.
    rendezvous += (f"--max-restarts={profile.launch.max_restarts}",)
    rendezvous += (f"--start-method={rank_start_method(profile.launch.warm_ranks)}",)
    return ("sd35dist", "torchrun", *rendezvous, "-m", "sd35dist", job, "--recipe", frozen_recipe, "--run-dir", run_dir)


def build_plan(
    *,
    profile: Profile,
    recipe: Recipe,
    profile_name: str,
    job: str,
    run_dir: str,
    profile_file: str = "profile",
    recipe_file: str = "recipe",
) -> JobPlan:
    """The pure core of `sd35dist submit`: validated inputs in, a JobPlan out."""
    if job not in SUBMITTABLE_JOBS:
        raise ConfigError("--job", job, f"unknown job (available: {', '.join(SUBMITTABLE_JOBS)})")
    check_fit(profile, recipe, profile_file, recipe_file)
    job_name = f"{recipe.name}-{job}"
    log_dir = f"{run_dir}/logs"
    frozen = f"{run_dir}/recipe.yaml"
    setup = [f"module load {m}" for m in profile.setup.modules] + list(profile.setup.lines)
    return JobPlan(
        scheduler=profile.scheduler,
        profile_name=profile_name,
        recipe_name=recipe.name,
        job=job,
        job_name=job_name,
        run_dir=run_dir,
        frozen_recipe=frozen,
        log_dir=log_dir,
        nodes=profile.nodes,
        procs_per_node=profile.procs_per_node,
        gpus_per_node=profile.gpus_per_node,
        mesh=mesh_layout(profile, recipe, recipe_file).describe(),
        time_minutes=profile.time_minutes,
        directives=_directives(profile, job_name, log_dir) if profile.scheduler == "slurm" else (),
        setup_lines=tuple(setup),
        env=_env(profile, run_dir),
        gpu_env=tuple(s for s in gpu_environment(profile.gpu_env, has_gpus=profile.gpus_per_node > 0)
                      if s.name not in profile.env.values),
        secret_names=tuple(profile.env.passthrough),
        rdzv_port=profile.launch.rdzv_port,
        rdzv_port_span=profile.launch.rdzv_port_span,
        launch_argv=_launch_argv(profile, job, frozen, run_dir),
    )
