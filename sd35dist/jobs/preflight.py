"""`sd35dist preflight`: on every rank, check what a long job will need before it needs it.

Run under torchrun like the trainer. Each rank joins the process group, checks a known
all-reduce result, times all-reduce bandwidth, hashes its recipe, notes its GPUs, probes the
data URL and the output directory. The results are gathered before anything is decided, so
every rank reaches the same verdict and no rank is left waiting in a collective; rank 0
writes `<run_dir>/preflight.json` and a short summary. Exit status: 0 ok, 1 a check failed,
2 a user config error; on failure every rank prints one line naming a rank, its host and
the cause.
"""

from __future__ import annotations

import json
import os
import posixpath
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import fsspec
import torch
import torch.distributed as dist

from sd35dist.config.loading import ConfigError
from sd35dist.config.recipe import is_url, load_recipe, looks_secret, recipe_hash, resolve_paths
from sd35dist.jobs.rank_failure import write_line
from sd35dist.jobs.save_probe import estimate_save
from sd35dist.parallel.process_group import World, destroy, init_process_group_from_env
from sd35dist.runtime.atomic_files import write_text_atomically
from sd35dist.runtime.job_env import JobEnvironment

PREFLIGHT_TIMEOUT_S = 300.0
"""Bounds every collective: longer than the slowest storage probe (botocore retries for ~10 s)."""
BANDWIDTH_BYTES = 16 * 2**20
BANDWIDTH_ITERATIONS = 5
LATENCY_ITERATIONS = 20
REPORT_NAME = "preflight.json"


@dataclass(frozen=True)
class DataCheck:
    url: str
    """The recipe's data.cache_url (credentials in the URL, if any, masked)."""
    exists: bool
    """The cache is there already."""
    reachable: bool
    """The cache or its parent (bucket, directory) answered: storage works even if the cache is not built yet."""
    error: str | None = None


@dataclass(frozen=True)
class OutputCheck:
    dir: str
    writable: bool
    """This rank created (if needed) the directory and wrote and deleted a probe file in it."""
    error: str | None = None


@dataclass(frozen=True)
class Bandwidth:
    bytes: int
    """Size of the all-reduced float32 buffer."""
    iterations: int
    seconds: float
    """Per all-reduce, on the slowest rank."""
    busbw_GBps: float
    """Bus bandwidth as nccl-tests defines it: 2(n-1)/n · bytes / seconds, in 1e9 bytes/s."""
    latency_us: float
    """Per one-element all-reduce, on the slowest rank."""


@dataclass(frozen=True)
class RankCheck:
    """What one rank found; gathered on every rank before any verdict."""

    rank: int
    local_rank: int
    node: str
    pid: int
    recipe_hash: str | None
    config_error: str | None
    allreduce_got: int
    gpu: dict[str, Any] | None
    data: DataCheck | None
    output: OutputCheck | None


class Failure(NamedTuple):
    rank: int
    node: str
    cause: str

    def __str__(self) -> str:
        return f"rank {self.rank} ({self.node}): {self.cause}"


# ---- pure core -------------------------------------------------------------------------


def bus_bandwidth_gbps(nbytes: int, seconds: float, world_size: int) -> float:
    """Ring all-reduce moves 2(n-1)/n of the buffer through each rank's link; 0 for one rank."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return 2 * (world_size - 1) / world_size * nbytes / seconds / 1e9


def expected_rank_sum(world_size: int) -> int:
    """Each rank contributes rank+1, so the all-reduced sum is n(n+1)/2."""
    return world_size * (world_size + 1) // 2


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {key: "***" if looks_secret(key) else value for key, value in options.items()}


def redact_url(url: str) -> str:
    """Mask `user:password@` in a URL so a report or log line never carries it."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def slurm_facts(job: JobEnvironment) -> dict[str, Any]:
    return {"job_id": job.slurm.job_id if job.slurm else None, "restart_count": job.slurm_restart_count}


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def rank_causes(check: RankCheck, expected_sum: int, reference_hash: str | None) -> list[str]:
    """Why this rank's results would make the job fail; empty when it is fine."""
    if check.config_error is not None:
        return [check.config_error]
    causes = []
    if check.allreduce_got != expected_sum:
        causes.append(f"all-reduce returned {check.allreduce_got}, expected {expected_sum} (broken backend or interconnect)")
    if check.recipe_hash != reference_hash:
        causes.append(
            f"recipe hash {str(check.recipe_hash)[:12]} differs from rank 0's {str(reference_hash)[:12]}"
            " (ranks read different recipe files)"
        )
    if check.data is not None and not check.data.reachable:
        causes.append(f"data URL {check.data.url} unreachable: {check.data.error}")
    if check.output is not None and not check.output.writable:
        causes.append(f"output dir {check.output.dir} not writable: {check.output.error}")
    return causes


def find_failures(checks: list[RankCheck]) -> list[Failure]:
    checks = sorted(checks, key=lambda c: c.rank)
    expected = expected_rank_sum(len(checks))
    reference = checks[0].recipe_hash
    return [Failure(c.rank, c.node, cause) for c in checks for cause in rank_causes(c, expected, reference)]


def exit_status(checks: list[RankCheck], failures: list[Failure]) -> int:
    if any(c.config_error is not None for c in checks):
        return 2
    return 1 if failures else 0


def failure_line(failures: list[Failure], rank: int, report_path: Path) -> str:
    """One line per rank: its own first failure, else the first failure of the job."""
    own = [f for f in failures if f.rank == rank]
    first = own[0] if own else failures[0]
    more = f" (+{len(failures) - 1} more in {report_path})" if len(failures) > 1 else ""
    return f"preflight failed on {first}{more}"


def build_report(
    checks: list[RankCheck],
    failures: list[Failure],
    *,
    backend: str,
    bandwidth: Bandwidth,
    slurm: dict[str, Any],
    storage_options: Mapping[str, Any],
) -> dict[str, Any]:
    checks = sorted(checks, key=lambda c: c.rank)
    expected = expected_rank_sum(len(checks))
    reference = checks[0].recipe_hash
    probed_data = [c.data for c in checks if c.data is not None]
    probed_output = [c.output for c in checks if c.output is not None]
    return {
        "ok": not failures,
        "world_size": len(checks),
        "backend": backend,
        "nodes": sorted({c.node for c in checks}),
        "ranks": [asdict(c) for c in checks],
        "gpus_per_node": {c.node: c.gpu["node_gpu_count"] for c in checks if c.gpu is not None},
        "allreduce": {
            "expected": expected,
            "got": [c.allreduce_got for c in checks],
            "ok": all(c.allreduce_got == expected for c in checks),
        },
        "bandwidth": asdict(bandwidth),
        "recipe_hash": reference,
        "recipe_hash_ok": reference is not None and all(c.recipe_hash == reference for c in checks),
        "data": {
            "url": probed_data[0].url if probed_data else None,
            "exists": bool(probed_data) and all(d.exists for d in probed_data),
            "reachable": bool(probed_data) and all(d.reachable for d in probed_data),
            "storage_options": redact_options(storage_options),
        },
        "output": {
            "dir": probed_output[0].dir if probed_output else None,
            "writable": bool(probed_output) and all(o.writable for o in probed_output),
        },
        "slurm": slurm,
        "failures": [str(f) for f in failures],
    }


def summary_lines(report: dict[str, Any], report_path: Path) -> list[str]:
    nodes = report["nodes"]
    verdict = "ok" if report["ok"] else f"FAILED ({len(report['failures'])} problem(s))"
    bw = report["bandwidth"]
    data = report["data"]
    if data["url"] is None:
        data_state = "not checked (recipe not loaded)"
    elif data["exists"]:
        data_state = "exists"
    elif data["reachable"]:
        data_state = "not built yet (its parent is reachable)"
    else:
        data_state = "UNREACHABLE"
    output = report["output"]
    if output["dir"] is None:
        output_state = "not checked (recipe not loaded)"
    else:
        output_state = "writable" if output["writable"] else "NOT WRITABLE"
    if report["recipe_hash"] is None:
        recipe_state = "NOT LOADED"
    elif report["recipe_hash_ok"]:
        recipe_state = f"same on every rank (sha256 {report['recipe_hash'][:12]})"
    else:
        recipe_state = f"DIFFERS between ranks (rank 0: sha256 {report['recipe_hash'][:12]})"
    if report["world_size"] > 1:
        bandwidth_state = (
            f"{bw['busbw_GBps']:.3f} GB/s bus, {bw['bytes'] / 2**20:.0f} MiB in {bw['seconds'] * 1e3:.1f} ms,"
            f" latency {bw['latency_us']:.0f} us"
        )
    else:
        bandwidth_state = "n/a with one rank"
    lines = [
        f"preflight {verdict}: {report['world_size']} rank(s) on {len(nodes)} node(s) "
        f"({', '.join(nodes)}), backend {report['backend']}",
        f"  all-reduce  {'ok' if report['allreduce']['ok'] else 'WRONG'} (expected {report['allreduce']['expected']})",
        f"  bandwidth   {bandwidth_state}",
        f"  recipe      {recipe_state}",
        "  data        " + " ".join(filter(None, [data["url"], data_state])),
        "  output      " + " ".join(filter(None, [output["dir"], output_state])),
    ]
    save = report.get("checkpoint_save") or {}
    if save.get("estimated"):
        lines.append(f"  checkpoint  ~{save['save_s']:.1f} s per save ({save['bytes_per_rank'] / 1e9:.2f} GB per rank "
                     f"at {save['write_mbps']:.0f} MB/s)")
    elif save:
        lines.append(f"  checkpoint  not estimated ({save.get('reason')})")
    for node, count in sorted(report["gpus_per_node"].items()):
        gpus = [r["gpu"] for r in report["ranks"] if r["node"] == node and r["gpu"] is not None]
        names = sorted({g["name"] for g in gpus})
        min_free = min(g["free_bytes"] for g in gpus) / 2**30
        lines.append(f"  gpus        {node}: {count} × {', '.join(names)} (least free {min_free:.1f} GiB)")
    lines.append(f"  report      {report_path}")
    return lines


# ---- edges: storage, devices, collectives, files --------------------------------------


def check_data(url: str, storage_options: Mapping[str, Any]) -> DataCheck:
    shown = redact_url(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        if fs.exists(path):
            return DataCheck(shown, exists=True, reachable=True)
        parent = posixpath.dirname(path.rstrip("/"))
        if parent and fs.exists(parent):
            return DataCheck(shown, exists=False, reachable=True)
        missing = redact_url(fs.unstrip_protocol(parent or path)) if is_url(url) else (parent or path)
        return DataCheck(shown, exists=False, reachable=False, error=f"{missing} does not exist")
    except Exception as exc:  # noqa: BLE001 — whatever storage raises (no route, auth, DNS) is the finding itself
        return DataCheck(shown, exists=False, reachable=False, error=one_line(exc))


def check_output(directory: str, rank: int) -> OutputCheck:
    try:
        fs, path = fsspec.core.url_to_fs(directory)
        fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.preflight-probe.rank{rank}"
        fs.pipe_file(probe, b"sd35dist preflight write probe\n")
        fs.rm_file(probe)
        return OutputCheck(redact_url(directory), writable=True)
    except Exception as exc:  # noqa: BLE001 — permission, read-only mount, a file in the way: all mean "not writable"
        return OutputCheck(redact_url(directory), writable=False, error=one_line(exc))


def gpu_facts(world: World) -> dict[str, Any] | None:
    if world.backend != "nccl":
        return None
    free, total = torch.cuda.mem_get_info(world.local_rank)
    return {
        "node_gpu_count": torch.cuda.device_count(),
        "index": world.local_rank,
        "name": torch.cuda.get_device_name(world.local_rank),
        "free_bytes": free,
        "total_bytes": total,
    }


def check_rank(world: World, recipe_path: Path, allreduce_got: int) -> RankCheck:
    facts = dict(rank=world.rank, local_rank=world.local_rank, node=world.node, pid=os.getpid(),
                 allreduce_got=allreduce_got, gpu=gpu_facts(world))
    try:
        recipe = load_recipe(recipe_path)
    except ConfigError as exc:
        return RankCheck(**facts, recipe_hash=None, config_error=str(exc), data=None, output=None)
    digest = recipe_hash(recipe)
    recipe = resolve_paths(recipe, Path.cwd(), recipe_path.resolve().parent)
    return RankCheck(
        **facts,
        recipe_hash=digest,
        config_error=None,
        data=check_data(recipe.data.cache_url, recipe.data.storage_options),
        output=check_output(recipe.output.dir, world.rank),
    )


def _synchronize(world: World) -> None:
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)


def allreduce_rank_sum(world: World) -> int:
    value = torch.tensor([world.rank + 1], dtype=torch.int64, device=world.device)
    dist.all_reduce(value)
    return int(value.item())


def _slowest_seconds_per_call(world: World, tensor: torch.Tensor, iterations: int) -> float:
    dist.all_reduce(tensor)  # warm-up: connection setup and allocation stay out of the timing
    _synchronize(world)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(tensor)
    _synchronize(world)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=world.device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item()) / iterations


def measure_bandwidth(world: World, nbytes: int = BANDWIDTH_BYTES, iterations: int = BANDWIDTH_ITERATIONS) -> Bandwidth:
    buffer = torch.zeros(nbytes // 4, dtype=torch.float32, device=world.device)
    seconds = _slowest_seconds_per_call(world, buffer, iterations)
    latency = _slowest_seconds_per_call(world, torch.zeros(1, device=world.device), LATENCY_ITERATIONS)
    return Bandwidth(
        bytes=buffer.numel() * 4,
        iterations=iterations,
        seconds=round(seconds, 6),
        busbw_GBps=round(bus_bandwidth_gbps(buffer.numel() * 4, seconds, world.world_size), 4),
        latency_us=round(latency * 1e6, 1),
    )


def _storage_options(checks: list[RankCheck], recipe_path: Path) -> Mapping[str, Any]:
    if checks[0].config_error is not None:
        return {}
    return load_recipe(recipe_path).data.storage_options


def _verdict(world: World, recipe_path: Path, run_dir: Path, started: float) -> int:
    got = allreduce_rank_sum(world)
    bandwidth = measure_bandwidth(world)
    mine = check_rank(world, recipe_path, got)
    checks: list[Any] = [None] * world.world_size
    dist.all_gather_object(checks, mine)
    failures = find_failures(checks)
    report_path = run_dir / REPORT_NAME
    save = _checkpoint_save(world, recipe_path, checks)

    write_error = [None]
    if world.is_main:
        report = build_report(
            checks, failures, backend=world.backend, bandwidth=bandwidth,
            slurm=slurm_facts(world.job), storage_options=_storage_options(checks, recipe_path),
        )
        report["checkpoint_save"] = save
        report["duration_s"] = round(time.monotonic() - started, 3)
        try:
            report_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(report_path, json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            write_error = [f"cannot write {report_path}: {one_line(exc)}"]
        write_line("\n".join(summary_lines(report, report_path)), sys.stdout)
    dist.broadcast_object_list(write_error, src=0)
    if write_error[0] is not None:
        failures.append(Failure(0, checks[0].node, write_error[0]))

    status = exit_status(checks, failures)
    if failures:
        write_line(failure_line(failures, world.rank, report_path))
    # torchrun kills the remaining ranks as soon as one exits non-zero: hold everyone until all have printed.
    dist.barrier()
    return status


def _checkpoint_save(world: World, recipe_path: Path, checks: list[Any]) -> dict[str, Any]:
    """How long a checkpoint of the recipe takes to write (every rank probes output.dir at once)."""
    if not all(c.output is not None and c.output.writable for c in checks):
        return {"estimated": False, "reason": "output dir not writable or recipe not loaded"}
    return estimate_save(world, resolve_paths(load_recipe(recipe_path), Path.cwd(), recipe_path.resolve().parent))


def main(args: Any) -> int:
    started = time.monotonic()
    try:
        # Mistakes in the command itself, before the process group: the report needs both.
        if not Path(args.recipe).is_file():
            raise ConfigError(str(args.recipe), "", "recipe file not found")
        run_dir = Path(args.run_dir)
        for candidate in (run_dir, *run_dir.parents):
            if candidate.exists():
                if not candidate.is_dir():
                    raise ConfigError("--run-dir", str(run_dir), f"{candidate} is a file: name a directory")
                break
        world = init_process_group_from_env(PREFLIGHT_TIMEOUT_S)
    except ConfigError as exc:
        print(f"error: preflight: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, OSError) as exc:
        job = JobEnvironment.read()
        where = f"rank {job.rank} ({job.node})"
        print(f"preflight failed on {where}: cannot join the process group: {one_line(exc)}", file=sys.stderr)
        return 1
    try:
        return _verdict(world, Path(args.recipe), Path(args.run_dir), started)
    except RuntimeError as exc:  # a collective timed out or a peer vanished: report it, don't hang or dump a trace
        print(
            f"preflight failed on rank {world.rank} ({world.node}): collective failed"
            f" (a peer died, hung, or the network dropped): {one_line(exc)}",
            file=sys.stderr,
        )
        return 1
    finally:
        destroy()
