"""The test tiers and the rules that make each marker mean what it says (registered by conftest.py).

- every test carries a tier marker;
- a `unit` test starts no process and opens no socket, in its fixtures' setup too: the attempt
  fails the test with one line naming what it tried (the guard below);
- a test that asks for the session's S3-protocol server is marked `s3` (an `s3` test may start
  its own); a test is marked `slurm` exactly when it asks for the Slurm cluster;
- only a missing GPU may skip a test: any other skip (a server that cannot start, a fixture
  that gives up) fails the run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

TIERS = ("unit", "process", "dist", "slurm", "s3", "gpu")
"""What each means is said once, in pyproject.toml's markers (a unit test checks they are the same set)."""


class UnitTierViolation(AssertionError):
    """A unit test (or its fixture) tried to start a process or open a socket."""


def _refuse(nodeid: str, what: str):
    def refused(*_args, **_kwargs):
        raise UnitTierViolation(f"{nodeid} is marked unit but {what}: mark it with the tier it needs "
                                f"(process, dist, s3, slurm) or keep it in this process")
    return refused


@contextlib.contextmanager
def no_processes_or_sockets(nodeid: str) -> Iterator[None]:
    """While inside: starting a process (subprocess, os.fork and the spawn/exec family, os.system,
    multiprocessing — it forks or spawns through these), opening a socket (connect, bind, sendto), or
    starting a torch process group (but torch's in-memory "fake" one) or TCPStore raises
    UnitTierViolation. A socketpair still works."""
    patches = [(subprocess.Popen, "_execute_child", "starts a process"),
               (socket.socket, "connect", "opens a socket"),
               (socket.socket, "connect_ex", "opens a socket"),
               (socket.socket, "bind", "opens a socket"),
               (socket.socket, "sendto", "opens a socket")]
    patches += [(os, name, "starts a process") for name in
                ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "execv", "execve", "execvp", "execvpe")
                if hasattr(os, name)]
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None:  # their transports open sockets in C++, out of the patches above
        patches.append((distributed, "TCPStore", "opens a TCPStore (a socket)"))
    with pytest.MonkeyPatch.context() as patch:
        for owner, name, what in patches:
            patch.setattr(owner, name, _refuse(nodeid, what))
        if distributed is not None:
            patch.setattr(distributed, "init_process_group",
                          _only_fake_process_groups(nodeid, distributed.init_process_group))
        yield


def _only_fake_process_groups(nodeid: str, init_process_group):
    """torch's "fake" backend (an in-memory store, no transport) is allowed; gloo and NCCL open sockets."""
    refused = _refuse(nodeid, "starts a process group (its transport opens sockets)")

    def guarded(backend=None, *args, **kwargs):
        if (backend or kwargs.get("backend")) == "fake":
            return init_process_group(backend, *args, **kwargs)
        return refused()
    return guarded


class TierRules:
    """The pytest plugin conftest.py registers: markers, the unit guard, the only allowed skip."""

    def __init__(self) -> None:
        self.other_skips: list[str] = []

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        problems = []
        cuda = None
        for item in items:
            tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
            if not tiers:
                problems.append(f"{item.nodeid}: every test needs a tier marker ({', '.join(TIERS)})")
            if "unit" in tiers and len(tiers) > 1:
                problems.append(f"{item.nodeid}: unit cannot be combined with {', '.join(sorted(tiers - {'unit'}))}")
            fixtures = set(getattr(item, "fixturenames", ()))
            if ("slurm" in tiers) != ("slurm_env" in fixtures):
                problems.append(f"{item.nodeid}: a test uses the slurm_env fixture exactly when it is marked slurm")
            if "slurm" in tiers and not item.path.name.startswith("test_slurm"):
                problems.append(f"{item.nodeid}: a slurm test lives in a tests/test_slurm*.py file "
                                f"(make test's scheduler sends those files to the one worker with the cluster)")
            if "s3_server" in fixtures and "s3" not in tiers:
                problems.append(f"{item.nodeid}: uses the s3_server fixture, so it is marked s3")
            if "gpu" in tiers:
                cuda = _cuda_available() if cuda is None else cuda
                if not cuda:
                    item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if problems:
            raise pytest.UsageError("\n".join(problems))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item):
        with self._guarded(item):
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        with self._guarded(item):
            return (yield)

    # Teardown is not guarded: a session server's finalizer runs in whichever test ends the session.

    @staticmethod
    def _guarded(item: pytest.Item):
        if item.get_closest_marker("unit") is None:
            return contextlib.nullcontext()
        return no_processes_or_sockets(item.nodeid)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail") and "needs CUDA" not in str(report.longrepr):
            self.other_skips.append(f"{report.nodeid}: {report.longrepr}")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.other_skips and exitstatus == 0:
            print("\nskipped for a reason other than a missing GPU (a failure here):\n  "
                  + "\n  ".join(self.other_skips))
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
