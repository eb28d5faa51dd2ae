"""Running the project's programs as a user does: the project's path, the environment of its
activated venv, the CLI as a child process, a poll with a deadline, and what a submit test needs
(a tiny recipe, a secret that must be written nowhere)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-value-that-must-never-be-written-7f3a"


def venv_env(**extra: str) -> dict[str, str]:
    """The environment a user has after activating the project's venv."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def torch_extensions_dir() -> str:
    """Where DeepSpeed's C++ op builds go: $TORCH_EXTENSIONS_DIR, else the Makefile's folder for this venv
    and these pins."""
    venv = hashlib.sha256(sys.prefix.encode() + (PROJECT / "requirements.txt").read_bytes()).hexdigest()[:12]
    return os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "sd35dist" / "torch_extensions" / venv))


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll `predicate` until it returns something true (returned), failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(interval_s)


def sd35dist(*args: str, env: dict[str, str], check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """`sd35dist ARGS` in a child process, as typed in a shell; fails the test on a non-zero exit when `check`."""
    proc = subprocess.run(
        [sys.executable, "-m", "sd35dist", *args],
        capture_output=True, text=True, cwd=PROJECT, env=env, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sd35dist {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def tiny_recipe(tmp_path: Path) -> Path:
    """A recipe a preflight job accepts: paths under `tmp_path`, an empty cache directory."""
    (tmp_path / "cache").mkdir(exist_ok=True)
    recipe = {
        "name": "tiny",
        "model": {"pretrained": str(tmp_path / "model")},
        "data": {"cache_url": str(tmp_path / "cache")},
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def all_text_under(*roots: Path) -> str:
    chunks = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                chunks.append(path.read_bytes().decode(errors="replace"))
    return "\n".join(chunks)


def sd35dist_in_process(*args: str) -> tuple[int, str, str]:
    """`sd35dist ARGS` through the CLI's own entry in this process: (exit status, stdout, stderr). For a
    command a test module also runs as a child process at least once: the same code without the child's
    ~7 s of imports. HF_HUB_OFFLINE, which export and sample set for their process, is put back after."""
    import io

    import pytest

    from sd35dist.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread inside, as the ranks run (OMP_NUM_THREADS=1), so in-process work gives their
    numbers; this process's own thread count is put back after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
