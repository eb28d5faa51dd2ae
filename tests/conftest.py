"""Shared test wiring: tier markers, the gpu skip, paths to the project and its venv."""

from __future__ import annotations

import os
import sys
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


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture
def project() -> Path:
    return PROJECT


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
