"""The cache manifest and the object store: round trips, path safety, atomic writes."""

from __future__ import annotations

import json
import os
import re

import pytest

from sd35dist.data.manifest import (
    MANIFEST_FORMAT,
    ManifestError,
    ShardEntry,
    ShardManifest,
    parse_manifest,
    read_manifest,
    write_manifest,
)
from sd35dist.data.storage import Store, UnsafePath

pytestmark = pytest.mark.unit

# ---- manifest and store ----------------------------------------------------------------------


def _sha(i: int) -> str:
    return f"{i:x}".rjust(64, "a")


def _manifest() -> ShardManifest:
    shards = (
        ShardEntry("shards/1024x1024/w0002-r00000-000000.safetensors", "1024x1024", 80, 1000, _sha(1), "bf16"),
        ShardEntry("shards/1024x1024/w0002-r00001-000000.safetensors", "1024x1024", 17, 300, _sha(2), "bf16"),
        ShardEntry("shards/1344x768/w0002-r00000-000000.safetensors", "1344x768", 5, 90, _sha(3), "bf16"),
    )
    return ShardManifest(
        shards=shards,
        empty_prompt=ShardEntry("empty_prompt.safetensors", "", 1, 50, _sha(4), "bf16"),
        encoders={"vae": "tiny", "text": ["clip_l", "clip_g", "t5"]},
        vae={"scaling_factor": 1.5305, "shift_factor": 0.0609},
        dtype="bf16",
        max_sequence_length=77,
        buckets=("1024x1024", "1344x768"),
        rejected=2,
    )


def test_manifest_round_trip_and_totals():
    manifest = _manifest()
    text = manifest.to_json()
    assert parse_manifest(text) == manifest
    assert manifest.total_samples == 102
    assert manifest.total_bytes == 1390
    assert manifest.samples_per_bucket() == {"1024x1024": 97, "1344x768": 5}
    assert json.loads(text)["totals"] == {"samples": 102, "bytes": 1390, "shards": 3}
    assert json.loads(text)["format"] == MANIFEST_FORMAT


def _with_shard1(**change) -> str:
    data = json.loads(_manifest().to_json())
    data["shards"][1].update(change)
    return json.dumps(data)


@pytest.mark.parametrize(
    "change",
    [
        {"path": "shards/../../etc/passwd"},
        {"path": "../outside.safetensors"},
        {"path": "/abs/shard.safetensors"},
        {"path": "s3://other-bucket/shard.safetensors"},
        {"path": "file:///tmp/shard.safetensors"},
        {"path": ""},
        {"path": "shards//x.safetensors"},
        {"sha256": "ab" * 31},
        {"sha256": "ab" * 33},
        {"samples": -1},
        {"bytes": -1},
        {"samples": "1"},
        {"sha256": "zz" * 32},
    ],
)
def test_parse_manifest_refuses_bad_entries_naming_them(change):
    with pytest.raises(ManifestError, match=re.escape("cache/manifest.json: shards[1]")):
        parse_manifest(_with_shard1(**change), "cache/manifest.json")


def test_parse_manifest_refuses_missing_fields_and_bad_empty_prompt():
    data = json.loads(_manifest().to_json())
    del data["shards"][0]["sha256"]
    with pytest.raises(ManifestError, match=r"shards\[0\]: missing 'sha256'"):
        parse_manifest(json.dumps(data))
    data = json.loads(_manifest().to_json())
    data["empty_prompt"]["path"] = "../empty.safetensors"
    with pytest.raises(ManifestError, match="empty_prompt"):
        parse_manifest(json.dumps(data))
    data = json.loads(_manifest().to_json())
    del data["empty_prompt"]
    with pytest.raises(ManifestError, match="empty_prompt: expected an object"):
        parse_manifest(json.dumps(data))


@pytest.mark.parametrize("fmt", ["sd35dist-cache/2", "", None])
def test_parse_manifest_refuses_other_formats(fmt):
    data = json.loads(_manifest().to_json())
    data["format"] = fmt
    with pytest.raises(ManifestError, match=re.escape(f"m.json: format {fmt!r}, expected {MANIFEST_FORMAT}")):
        parse_manifest(json.dumps(data), "m.json")


def test_parse_manifest_refuses_non_json():
    with pytest.raises(ManifestError, match="m.json: not JSON"):
        parse_manifest("{truncated", "m.json")


def test_manifest_through_a_store(tmp_path):
    store = Store(str(tmp_path / "cache"))
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(store)
    write_manifest(store, _manifest())
    assert read_manifest(store) == _manifest()


@pytest.fixture(params=["path", "file-url"])
def store(request, tmp_path) -> Store:
    root = tmp_path / "cache"
    return Store(str(root) if request.param == "path" else f"file://{root}")


def test_store_write_read_exists_remove(store, tmp_path):
    assert not store.exists("shards/a.bin")
    data = os.urandom(3 * 2**20 + 17)
    store.write_bytes("shards/a.bin", data)
    assert store.exists("shards/a.bin")
    assert store.read_bytes("shards/a.bin") == data
    assert (tmp_path / "cache" / "shards" / "a.bin").read_bytes() == data
    store.write_bytes("shards/a.bin", b"second")
    assert store.read_bytes("shards/a.bin") == b"second"
    store.remove("shards/a.bin")
    assert not store.exists("shards/a.bin")
    store.remove("shards/a.bin")  # removing what is gone is fine


def test_store_writes_leave_no_temp_files(store, tmp_path):
    for i in range(5):
        store.write_bytes(f"shards/1024x1024/{i}.safetensors", bytes([i]) * 1000)
    store.write_bytes("manifest.json", b"{}")
    store.write_bytes("manifest.json", b"{\"again\": 1}")
    files = sorted(p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert files == ["manifest.json"] + [f"shards/1024x1024/{i}.safetensors" for i in range(5)]


def test_store_failed_write_keeps_the_old_object(store, monkeypatch):
    store.write_bytes("manifest.json", b"old complete content")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        store.write_bytes("manifest.json", b"new")
    monkeypatch.undo()
    assert store.read_bytes("manifest.json") == b"old complete content"
    assert os.listdir(store.root) == ["manifest.json"], "a failed write leaves no temporary file behind"


def test_store_list_dir(store):
    assert store.list_dir("shards") == []
    for name in ("b.bin", "a.bin", "sub/c.bin"):
        store.write_bytes(f"shards/{name}", b"x")
    assert store.list_dir("shards") == ["a.bin", "b.bin", "sub"]
    assert store.list_dir("shards/sub") == ["c.bin"]


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "s3://bucket/x", "", "a//b", "..\\x", "C:/x", "./a"])
def test_store_refuses_paths_outside_the_root(store, bad):
    with pytest.raises(UnsafePath):
        store.path(bad)
    with pytest.raises(UnsafePath):
        store.write_bytes(bad, b"x")


def test_store_url_of(tmp_path):
    assert Store(f"{tmp_path}/cache/").url_of("manifest.json") == f"{tmp_path}/cache/manifest.json"
    assert Store(f"file://{tmp_path}/cache").url_of("a/b") == f"file://{tmp_path}/cache/a/b"


@pytest.mark.parametrize("text", ["[]", '{"format": "sd35dist-cache/1", "shards": []}'])
def test_parse_manifest_malformed_documents_give_a_manifest_error(text):
    with pytest.raises(ManifestError, match="cache/manifest.json"):
        parse_manifest(text, "cache/manifest.json")
