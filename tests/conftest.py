"""Shared test wiring: tier markers, the gpu skip, paths to the project and its venv, and the
session-wide servers (one S3-protocol server, one two-node Slurm cluster) every tier shares."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
TIERS = ("unit", "dist", "slurm", "s3", "gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = _cuda_available()
    for item in items:
        tiers = [m.name for m in item.iter_markers() if m.name in TIERS]
        if not tiers:
            raise pytest.UsageError(f"{item.nodeid}: every test needs a tier marker ({', '.join(TIERS)})")
        if "gpu" in tiers and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


class OnlyGpuSkips:
    """Only a missing GPU may skip a test: any other skip fails the run (a Slurm or S3 server that
    cannot start, a fixture that gives up) instead of passing it quietly."""

    def __init__(self) -> None:
        self.others: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail") and "needs CUDA" not in str(report.longrepr):
            self.others.append(f"{report.nodeid}: {report.longrepr}")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.others and exitstatus == 0:
            print("\nskipped for a reason other than a missing GPU (a failure here):\n  " + "\n  ".join(self.others))
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(OnlyGpuSkips(), "sd35dist-only-gpu-skips")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture
def project() -> Path:
    return PROJECT


def wait_for(predicate, timeout_s: float, what: str):
    """Poll `predicate` until it returns something true (returned), failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.5)


def venv_env(**extra: str) -> dict[str, str]:
    """The environment a user has after activating the project's venv."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def s3_server():
    """One S3-protocol server (moto) on 127.0.0.1 for the whole run; tests use their own buckets."""
    from tests.s3_server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slurm_env():
    """Start the dev cluster; yield the environment a user has after `export SLURM_CONF=…`."""
    # Not under pytest's tmp: that is mode 0700 and munged runs as the munge user.
    cluster_dir = Path(tempfile.mkdtemp(prefix="sd35dist-slurm-"))
    cluster_dir.chmod(0o755)
    script = PROJECT / "slurm" / "devcluster.sh"
    proc = subprocess.run(
        ["bash", str(script), "start", "--dir", str(cluster_dir)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        subprocess.run(["bash", str(script), "stop", "--dir", str(cluster_dir)], capture_output=True)
        pytest.fail(f"the Slurm dev cluster did not start (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    export = proc.stdout.strip().splitlines()[-1]
    assert export.startswith("export SLURM_CONF="), export
    conf = export.split("=", 1)[1]
    try:
        yield venv_env(SLURM_CONF=conf, SD35DIST_STATE_DIR=str(cluster_dir / "state"))
    finally:
        subprocess.run(["bash", str(script), "stop", "--dir", str(cluster_dir)], capture_output=True, timeout=120)
        shutil.rmtree(cluster_dir, ignore_errors=True)
