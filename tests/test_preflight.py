"""`sd35dist preflight`: what a user sees before a long job — one JSON report, one line per failure.

unit: the pure verdict (bandwidth formula, backend choice, failures, exit status, redaction)
and the storage probes on local paths. dist: real 2-rank torchrun runs on gloo. s3: the
same against an S3-protocol server on loopback.
"""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

import pytest

from sd35dist.config.loading import ConfigError
from sd35dist.jobs.preflight import (
    Bandwidth,
    DataCheck,
    OutputCheck,
    RankCheck,
    build_report,
    bus_bandwidth_gbps,
    check_data,
    check_output,
    exit_status,
    failure_line,
    find_failures,
    redact_url,
    slurm_facts,
)
from sd35dist.parallel.process_group import pick_backend, world_from_env
from sd35dist.runtime.job_env import JobEnvironment
from tests.preflight_runs import PreflightRun, run_preflight, write_recipe

SECRET = "s3cr3t-that-must-never-reach-the-report"


# ---- helpers -----------------------------------------------------------------------------


def rank_check(rank: int, node: str = "n1", **changes) -> RankCheck:
    fields = dict(
        rank=rank, local_rank=rank, node=node, pid=100 + rank, recipe_hash="a" * 64, config_error=None,
        allreduce_got=3, gpu=None,
        data=DataCheck("s3://b/cache", exists=True, reachable=True),
        output=OutputCheck("/out", writable=True),
    )
    fields.update(changes)
    return RankCheck(**fields)


def report_of(checks: list[RankCheck], storage_options: dict | None = None) -> dict:
    bandwidth = Bandwidth(bytes=16, iterations=1, seconds=1.0, busbw_GBps=0.0, latency_us=1.0)
    return build_report(
        checks, find_failures(checks), backend="gloo", bandwidth=bandwidth,
        slurm=slurm_facts(JobEnvironment.read({})), storage_options=storage_options or {},
    )


# ---- unit: pure verdict --------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("nbytes", "seconds", "world_size", "gbps"),
    [(10**9, 1.0, 2, 1.0), (10**9, 1.0, 8, 1.75), (10**9, 0.5, 4, 3.0), (10**9, 1.0, 1, 0.0)],
)
def test_bus_bandwidth_follows_nccl_tests_definition(nbytes, seconds, world_size, gbps):
    assert bus_bandwidth_gbps(nbytes, seconds, world_size) == pytest.approx(gbps)


@pytest.mark.unit
def test_bus_bandwidth_rejects_zero_time():
    with pytest.raises(ValueError):
        bus_bandwidth_gbps(1, 0.0, 2)


@pytest.mark.unit
def test_backend_is_nccl_on_gpus_and_gloo_on_cpu():
    assert pick_backend(cuda_available=True) == "nccl"
    assert pick_backend(cuda_available=False) == "gloo"


@pytest.mark.unit
def test_world_comes_from_torchrun_variables_and_slurm_node_name():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "n1", "MASTER_PORT": "29500", "SLURMD_NODENAME": "gpu-017"}
    world = world_from_env(env, "nccl")
    assert (world.rank, world.world_size, world.local_rank, world.local_world_size) == (5, 8, 1, 4)
    assert world.node == "gpu-017"
    assert str(world.device) == "cuda:1"


@pytest.mark.unit
def test_world_without_torchrun_is_one_cpu_process_on_this_host():
    world = world_from_env({}, "gloo")
    assert (world.rank, world.world_size, world.is_main) == (0, 1, True)
    assert world.node == socket.gethostname()
    assert str(world.device) == "cpu"


@pytest.mark.unit
def test_half_set_torchrun_environment_names_the_missing_variable():
    with pytest.raises(ConfigError, match="MASTER_PORT: not set"):
        world_from_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "n1"}, "gloo")


@pytest.mark.unit
def test_all_good_ranks_give_ok_report_and_exit_zero():
    checks = [rank_check(1, "n2"), rank_check(0, "n1")]
    report = report_of(checks)
    assert report["ok"] is True and report["failures"] == []
    assert report["nodes"] == ["n1", "n2"]
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert report["allreduce"] == {"expected": 3, "got": [3, 3], "ok": True}
    assert report["recipe_hash_ok"] is True
    assert exit_status(checks, find_failures(checks)) == 0


@pytest.mark.unit
def test_cache_not_built_under_reachable_parent_is_not_a_failure():
    checks = [rank_check(r, data=DataCheck("s3://b/cache", exists=False, reachable=True)) for r in (0, 1)]
    report = report_of(checks)
    assert report["ok"] is True
    assert report["data"] == {"url": "s3://b/cache", "exists": False, "reachable": True, "storage_options": {}}


@pytest.mark.unit
def test_unreachable_data_on_one_rank_fails_everyone_with_a_line_naming_that_rank():
    broken = DataCheck("s3://b/x", exists=False, reachable=False, error="EndpointConnectionError: no route")
    checks = [rank_check(0, "n1"), rank_check(1, "n2", data=broken)]
    failures = find_failures(checks)
    report = report_of(checks)
    assert report["ok"] is False and report["data"]["reachable"] is False
    assert report["failures"] == ["rank 1 (n2): data URL s3://b/x unreachable: EndpointConnectionError: no route"]
    expected_line = "preflight failed on rank 1 (n2): data URL s3://b/x unreachable: EndpointConnectionError: no route"
    assert failure_line(failures, 0, Path("r/preflight.json")) == expected_line
    assert failure_line(failures, 1, Path("r/preflight.json")) == expected_line
    assert exit_status(checks, failures) == 1


@pytest.mark.unit
def test_each_rank_reports_its_own_failure_first_and_counts_the_rest():
    checks = [
        rank_check(0, output=OutputCheck("/out", writable=False, error="PermissionError: denied")),
        rank_check(1, recipe_hash="b" * 64),
    ]
    failures = find_failures(checks)
    assert [f.rank for f in failures] == [0, 1]
    line = failure_line(failures, 1, Path("r/preflight.json"))
    assert line.startswith("preflight failed on rank 1 (n1): recipe hash bbbbbbbbbbbb differs from rank 0's aaaaaaaaaaaa")
    assert line.endswith("(+1 more in r/preflight.json)")
    assert report_of(checks)["recipe_hash_ok"] is False


@pytest.mark.unit
def test_wrong_allreduce_sum_is_a_failure():
    checks = [rank_check(0, allreduce_got=3), rank_check(1, allreduce_got=2)]
    report = report_of(checks)
    assert report["allreduce"] == {"expected": 3, "got": [3, 2], "ok": False}
    assert report["failures"] == ["rank 1 (n1): all-reduce returned 2, expected 3 (broken backend or interconnect)"]


@pytest.mark.unit
def test_config_error_exits_two_with_the_config_message():
    message = "recipe.yaml: data.cache_url: required key is missing"
    checks = [rank_check(0, config_error=message, recipe_hash=None, data=None, output=None),
              rank_check(1, config_error=message, recipe_hash=None, data=None, output=None)]
    failures = find_failures(checks)
    assert exit_status(checks, failures) == 2
    assert failure_line(failures, 0, Path("p")).startswith(f"preflight failed on rank 0 (n1): {message}")
    assert report_of(checks)["ok"] is False


@pytest.mark.unit
def test_report_never_carries_credentials():
    report = report_of([rank_check(0), rank_check(1)], storage_options={"endpoint_url": "http://s3", "secret": SECRET})
    assert SECRET not in json.dumps(report)
    assert report["data"]["storage_options"] == {"endpoint_url": "http://s3", "secret": "***"}
    assert redact_url(f"s3://user:{SECRET}@bucket/cache") == "s3://***@bucket/cache"


@pytest.mark.unit
def test_slurm_restart_count_defaults_to_zero():
    assert slurm_facts(JobEnvironment.read({})) == {"job_id": None, "restart_count": 0}
    job = JobEnvironment.read({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "3"})
    assert slurm_facts(job) == {"job_id": "42", "restart_count": 3}


# ---- unit: storage probes on local paths ---------------------------------------------------


@pytest.mark.unit
def test_output_dir_under_a_file_is_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = check_output(str(blocker / "out"), rank=3)
    assert result.writable is False
    assert "Error" in result.error


@pytest.mark.unit
def test_output_dir_is_created_and_the_probe_removed(tmp_path):
    out = tmp_path / "new" / "out"
    assert check_output(str(out), rank=3) == OutputCheck(str(out), writable=True)
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.unit
def test_local_data_exists_missing_and_unreachable(tmp_path):
    (tmp_path / "cache").mkdir()
    assert check_data(str(tmp_path / "cache"), {}) == DataCheck(str(tmp_path / "cache"), True, True)
    assert check_data(str(tmp_path / "later"), {}) == DataCheck(str(tmp_path / "later"), False, True)
    gone = check_data(str(tmp_path / "no" / "cache"), {})
    assert (gone.exists, gone.reachable) == (False, False)
    assert gone.error == f"{tmp_path / 'no'} does not exist"


# ---- dist: real 2-rank runs under torchrun ---------------------------------------------------


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory) -> PreflightRun:
    tmp_path = tmp_path_factory.mktemp("preflight-ok")
    (tmp_path / "cache").mkdir()
    recipe = write_recipe(tmp_path, str(tmp_path / "cache"), tmp_path / "out")
    return run_preflight(recipe, tmp_path / "run")


@pytest.mark.dist
def test_healthy_two_rank_preflight_passes(healthy_run):
    assert healthy_run.returncode == 0, healthy_run.stderr[-3000:]
    report = healthy_run.report
    assert report["ok"] is True and report["failures"] == []
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert sorted(r["rank"] for r in report["ranks"]) == [0, 1]
    assert len({r["pid"] for r in report["ranks"]}) == 2
    assert report["nodes"] == [socket.gethostname()]
    assert report["allreduce"] == {"expected": 3, "got": [3, 3], "ok": True}
    assert report["recipe_hash_ok"] is True
    assert report["data"]["exists"] is True and report["output"]["writable"] is True
    assert report["slurm"]["restart_count"] == 0
    assert healthy_run.failure_lines == []


@pytest.mark.dist
def test_healthy_run_measures_bandwidth_and_prints_a_summary(healthy_run):
    bandwidth = healthy_run.report["bandwidth"]
    assert bandwidth["bytes"] == 16 * 2**20 and bandwidth["iterations"] >= 1
    assert bandwidth["seconds"] > 0 and bandwidth["busbw_GBps"] > 0
    assert "preflight ok: 2 rank(s)" in healthy_run.stdout
    assert "GB/s bus" in healthy_run.stdout
    assert not list(healthy_run.report_path.parent.glob(".*.tmp")), "atomic write left its temp file"


@pytest.mark.dist
def test_output_failure_on_rank_one_fails_every_rank_without_hanging(tmp_path):
    (tmp_path / "cache").mkdir()
    out = tmp_path / "out"
    # A directory where rank 1's probe file must go: only rank 1 cannot write.
    (out / ".preflight-probe.rank1").mkdir(parents=True)
    run = run_preflight(write_recipe(tmp_path, str(tmp_path / "cache"), out), tmp_path / "run")

    assert run.returncode != 0
    report = run.report
    assert report["ok"] is False and report["output"]["writable"] is False
    assert len(report["failures"]) == 1 and report["failures"][0].startswith(f"rank 1 ({socket.gethostname()}):")
    assert len(run.failure_lines) == 2, run.stderr[-3000:]  # one line from each rank
    for line in run.failure_lines:
        assert line.startswith("preflight failed on rank 1 (") and f"output dir {out} not writable" in line


# ---- s3: the data URL on an S3-protocol server ------------------------------------------------


@pytest.mark.s3
@pytest.mark.dist
def test_s3_cache_in_existing_bucket_is_reachable(tmp_path, s3_server):
    bucket = f"preflight-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    recipe = write_recipe(tmp_path, f"s3://{bucket}/cache", tmp_path / "out", s3_server.storage_options)
    run = run_preflight(recipe, tmp_path / "run", **{**s3_server.env, "AWS_SECRET_ACCESS_KEY": SECRET})

    assert run.returncode == 0, run.stderr[-3000:]
    report = run.report
    assert report["data"]["url"] == f"s3://{bucket}/cache"
    assert (report["data"]["exists"], report["data"]["reachable"]) == (False, True)
    assert report["data"]["storage_options"] == s3_server.storage_options
    assert report["ok"] is True
    assert "not built yet" in run.stdout
    assert SECRET not in run.report_path.read_text()


@pytest.mark.s3
@pytest.mark.dist
def test_s3_missing_bucket_fails_naming_the_url(tmp_path, s3_server):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:12]}/cache"
    recipe = write_recipe(tmp_path, url, tmp_path / "out", s3_server.storage_options)
    run = run_preflight(recipe, tmp_path / "run", **s3_server.env)

    assert run.returncode == 1
    report = run.report
    assert report["ok"] is False and report["data"]["reachable"] is False
    assert len(run.failure_lines) == 2
    for line in run.failure_lines:
        assert f"data URL {url} unreachable" in line and "does not exist" in line
