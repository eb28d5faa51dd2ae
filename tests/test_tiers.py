"""The tier markers mean what pyproject.toml says: a unit test that starts a process or opens a socket
fails, a test without a tier is refused, a session server's tests carry its tier, and only a missing
GPU may skip. Each rule is run on a small generated test module by pytest itself (pytester, in process)."""

from __future__ import annotations

import importlib
import tomllib

import pytest

from tests.cli_runs import PROJECT
from tests.tiers import TIERS

pytest_plugins = ["pytester"]

# An in-process pytester run drops the modules first imported during it, and torch must not be imported
# twice in one process: what the generated tests import is imported here, before any run.
for _module in ("torch.distributed", "torch.testing._internal.distributed.fake_pg", "multiprocessing"):
    importlib.import_module(_module)

CONFTEST = """
from tests.tiers import TierRules

def pytest_configure(config):
    config.pluginmanager.register(TierRules(), "sd35dist-tiers")
"""

INI = "[pytest]\nmarkers =\n" + "".join(f"    {tier}: the tier\n" for tier in TIERS)

VIOLATIONS = """
import multiprocessing
import socket
import subprocess

import pytest


@pytest.fixture(scope="module")
def built_by_a_child_process():
    subprocess.run(["true"], check=True)


@pytest.mark.unit
def test_runs_a_program():
    subprocess.run(["true"], check=True)


@pytest.mark.unit
def test_connects_to_loopback():
    socket.create_connection(("127.0.0.1", 9), timeout=1)


@pytest.mark.unit
def test_listens():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))


@pytest.mark.unit
def test_forks_a_worker():
    multiprocessing.get_context("fork").Process(target=print).start()


@pytest.mark.unit
def test_starts_a_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


@pytest.mark.unit
def test_may_use_the_fake_process_group():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=8)
    try:
        assert dist.get_world_size() == 8
    finally:
        dist.destroy_process_group()


@pytest.mark.unit
def test_uses_a_fixture_built_by_a_process(built_by_a_child_process):
    pass


@pytest.mark.unit
def test_pure():
    assert sorted([3, 1, 2]) == [1, 2, 3]


@pytest.mark.process
def test_a_process_test_may_run_a_program():
    subprocess.run(["true"], check=True)
"""


def run_inner(pytester: pytest.Pytester, module: str, *args: str) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST)
    pytester.makefile(".ini", pytest=INI)
    pytester.makepyfile(test_inner=module)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", *args)


@pytest.mark.unit
def test_pyproject_describes_exactly_the_tiers():
    markers = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert tuple(line.split(":", 1)[0] for line in markers) == TIERS


@pytest.mark.process  # the inner process-tier test runs `true`
def test_a_unit_test_that_starts_a_process_or_opens_a_socket_fails(pytester):
    result = run_inner(pytester, VIOLATIONS)
    outcomes = {report.nodeid.split("::")[1]: report.outcome for report in _reports(result)}
    assert outcomes == {
        "test_runs_a_program": "failed", "test_connects_to_loopback": "failed", "test_listens": "failed",
        "test_forks_a_worker": "failed", "test_starts_a_process_group": "failed",
        "test_uses_a_fixture_built_by_a_process": "failed", "test_pure": "passed",
        "test_may_use_the_fake_process_group": "passed",
        "test_a_process_test_may_run_a_program": "passed",
    }
    text = result.stdout.str()
    for name, what in (("test_runs_a_program", "starts a process"), ("test_connects_to_loopback", "opens a socket"),
                       ("test_listens", "opens a socket"), ("test_forks_a_worker", "starts a process"),
                       ("test_starts_a_process_group", "starts a process group"),
                       ("test_uses_a_fixture_built_by_a_process", "starts a process")):
        assert f"test_inner.py::{name} is marked unit but {what}" in text, name


@pytest.mark.unit
def test_every_test_needs_one_tier_and_unit_stands_alone(pytester):
    result = run_inner(pytester, """
import pytest

def test_without_a_tier():
    pass

@pytest.mark.unit
@pytest.mark.dist
def test_unit_and_dist():
    pass
""")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = result.stderr.str()
    assert "test_inner.py::test_without_a_tier: every test needs a tier marker" in errors
    assert "test_inner.py::test_unit_and_dist: unit cannot be combined with dist" in errors


@pytest.mark.unit
def test_the_session_servers_tests_carry_their_tier(pytester):
    pytester.makeconftest(CONFTEST + """
import pytest

@pytest.fixture(scope="session")
def slurm_env():
    return {}

@pytest.fixture(scope="session")
def s3_server():
    return None
""")
    pytester.makefile(".ini", pytest=INI)
    pytester.makepyfile(test_inner="""
import pytest

@pytest.mark.dist
def test_uses_the_cluster_unmarked(slurm_env):
    pass

@pytest.mark.slurm
def test_marked_slurm_without_the_cluster():
    pass

@pytest.mark.dist
def test_uses_the_s3_server_unmarked(s3_server):
    pass

@pytest.mark.slurm
def test_a_cluster_test_outside_the_slurm_files(slurm_env):
    pass
""")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = result.stderr.str()
    assert "test_uses_the_cluster_unmarked: a test uses the slurm_env fixture exactly when it is marked slurm" in errors
    assert "test_marked_slurm_without_the_cluster: a test uses the slurm_env fixture exactly when" in errors
    assert "test_uses_the_s3_server_unmarked: uses the s3_server fixture, so it is marked s3" in errors
    assert "test_a_cluster_test_outside_the_slurm_files: a slurm test lives in a tests/test_slurm*.py file" in errors


@pytest.mark.unit
def test_only_a_missing_gpu_may_skip(pytester):
    result = run_inner(pytester, """
import pytest

@pytest.mark.unit
def test_gives_up():
    pytest.skip("the server did not start")
""")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "skipped for a reason other than a missing GPU" in result.stdout.str()


def _reports(result: pytest.RunResult) -> list[pytest.TestReport]:
    """One report per test: its call's, or its setup's when setup did not pass."""
    return [r for r in result.reprec.getreports("pytest_runtest_logreport")
            if r.when == "call" or (r.when == "setup" and not r.passed)]


@pytest.mark.unit
def test_workers_take_the_longest_modules_first_then_the_launching_tiers():
    from tests.run_order import MODULE_SECONDS, SLURM_UNIT, longest_first, unit_of

    assert unit_of("tests/test_slurm_lifecycle.py", "tests/test_slurm") == SLURM_UNIT
    assert unit_of("tests/test_train.py", "tests/test_slurm") == "tests/test_train.py"
    units = [("tests/test_cli_help.py", "unit"), ("tests/new_unit.py", "unit"), ("tests/new_dist.py", "dist"),
             ("tests/test_demo.py", "process"), (SLURM_UNIT, "slurm"), ("tests/test_train_zero.py", "dist")]
    order = longest_first(units)
    assert order[:3] == ["tests/test_train_zero.py", SLURM_UNIT, "tests/test_demo.py"], order
    assert order[3:] == ["tests/new_dist.py", "tests/test_cli_help.py", "tests/new_unit.py"], order
    assert MODULE_SECONDS["tests/test_train_zero.py"] > MODULE_SECONDS["tests/test_demo.py"]

