"""An S3-protocol server (moto's server mode) on 127.0.0.1 for tests and benchmarks.

A real HTTP server in its own process, reached through s3fs/botocore like a cluster's object
store, not an in-process mock. Data lives in memory: a restarted server is empty. It runs in
its own session so a test run's signals never reach it, and it is stopped by the PID we
started, never by name.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""moto accepts any keys; botocore refuses to sign a request without some."""


PRELOAD_AND_SERVE = """
import pathlib, sys
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import main

bucket, prefix, root = sys.argv[1:4]
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
backend.create_bucket(bucket, "us-east-1")
for path in sorted(p for p in pathlib.Path(root).rglob("*") if p.is_file()):
    backend.put_object(bucket, f"{prefix}/{path.relative_to(root).as_posix()}", path.read_bytes())
main(sys.argv[4:])
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class S3Server:
    """`S3Server().start()` … `.stop()`, or use it as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, python: str = sys.executable) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.python = python
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="moto-s3-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options that reach this server (credentials come from `env`)."""
        return {"endpoint_url": self.url}

    @property
    def env(self) -> dict[str, str]:
        """Environment variables a client process needs besides `storage_options`."""
        return dict(TEST_CREDENTIALS)

    def start(self, timeout_s: float = 20.0, preload: tuple[str, str, Path] | None = None) -> S3Server:
        """Start and wait until it answers. `preload=(bucket, prefix, directory)` puts every file
        under the directory into the bucket *before* the server listens — a restarted object
        store keeps its data, moto does not, and re-uploading after start would let clients
        see NoSuchBucket for a moment."""
        if preload is None:
            command = [self.python, "-m", "moto.server"]
        else:
            bucket, prefix, root = preload
            command = [self.python, "-c", PRELOAD_AND_SERVE, bucket, prefix, str(root)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*command, "-H", self.host, "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}: {self._log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server not answering on {self.url} after {timeout_s:.0f} s: {self._log_tail()}")

    def healthy(self) -> bool:
        """The server answers a bucket listing (GET /)."""
        try:
            with urllib.request.urlopen(self.url, timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        self.process = None
        self.log_path.unlink(missing_ok=True)

    def client(self) -> Any:
        """A boto3 S3 client for arranging test state (buckets, objects)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
