"""The cache built straight into S3 (moto's S3-protocol server on 127.0.0.1, through s3fs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sd35dist.data.manifest import read_manifest
from sd35dist.data.storage import Store
from tests.cache_runs import cache_files, run_cache, write_inputs, write_recipe
from tests.cli_runs import PROJECT, venv_env

pytestmark = pytest.mark.s3


def test_s3_build_equals_local_build_byte_for_byte(s3_server, tiny_model, tmp_path, monkeypatch):
    inputs = write_inputs(tmp_path / "images")
    local = write_recipe(tmp_path / "local.yaml", tiny_model, inputs, str(tmp_path / "cache"))
    run_cache(local)

    s3_server.client().create_bucket(Bucket="sd35-cache")
    remote = write_recipe(tmp_path / "s3.yaml", tiny_model, inputs, "s3://sd35-cache/runs/tiny",
                          storage_options=s3_server.storage_options)
    run_cache(remote, env=venv_env(**s3_server.env))

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    store = Store("s3://sd35-cache/runs/tiny", s3_server.storage_options)
    manifest = read_manifest(store)
    assert manifest.total_samples == 25
    expected = cache_files(tmp_path / "cache")
    got = {name: store.read_bytes(name) for name in expected}
    assert got == expected
    keys = s3_server.client().list_objects_v2(Bucket="sd35-cache", Prefix="runs/tiny/")["Contents"]
    assert not [k["Key"] for k in keys if ".tmp" in k["Key"]], "no temporary objects on S3"
    inspect = subprocess.run(
        [sys.executable, "-m", "sd35dist", "cache", "inspect", "s3://sd35-cache/runs/tiny", "--verify",
         "--storage-option", f"endpoint_url={s3_server.url}"],
        capture_output=True, text=True, cwd=PROJECT, env=venv_env(**s3_server.env),
    )
    assert inspect.returncode == 0 and "25 samples" in inspect.stdout and "problems: 0" in inspect.stdout
