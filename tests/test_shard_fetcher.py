"""ShardFetcher: schedule order, the max_ahead bound, integrity, disk cache, faults (local and S3)."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import botocore.config
import botocore.exceptions
import pytest

from sd35dist.data.manifest import ShardEntry
from sd35dist.data.shard_fetcher import (
    FetcherClosed,
    RetryPolicy,
    ShardCorrupt,
    ShardFetcher,
    ShardUnavailable,
    backoff_delay,
    is_transient,
    lru_evictions,
    read_with_retries,
    stream_storage_options,
)
from sd35dist.data.storage import Store, sha256_hex
from tests.s3_server import S3Server


def write_shards(root: Path, count: int, size: int, seed: int = 0) -> tuple[list[ShardEntry], dict[str, bytes]]:
    """`count` shard files of random bytes under root/shards, and their manifest entries."""
    rng = random.Random(seed)
    entries, payloads = [], {}
    for index in range(count):
        data = rng.randbytes(size)
        path = f"shards/{index:05d}.safetensors"
        (root / "shards").mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        entries.append(ShardEntry(path, "1024x1024", 4, len(data), sha256_hex(data), "bfloat16"))
        payloads[path] = data
    return entries, payloads


class RecordingStore(Store):
    """A local Store that records every read; reads may wait on a gate or fail on purpose."""

    def __init__(self, url: str, gate: threading.Event | None = None,
                 failures: dict[str, list[Exception]] | None = None, on_read=None) -> None:
        super().__init__(url)
        self.lock = threading.Lock()
        self.reads: list[str] = []
        self.gate = gate
        self.failures = failures or {}
        self.on_read = on_read

    def read_bytes(self, relative: str) -> bytes:
        with self.lock:
            self.reads.append(relative)
            if self.on_read is not None:
                self.on_read(relative)
            failure = self.failures[relative].pop(0) if self.failures.get(relative) else None
        if failure is not None:
            raise failure
        if self.gate is not None:
            self.gate.wait(30)
        return super().read_bytes(relative)


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# ---------------------------------------------------------------------------- order and bounds


@pytest.mark.unit
def test_reads_follow_the_schedule_and_stop_max_ahead_past_the_consumer(tmp_path):
    entries, payloads = write_shards(tmp_path, 8, 1000)
    store = RecordingStore(str(tmp_path))
    with ShardFetcher(store, threads=1, max_ahead=2) as fetcher:
        fetcher.schedule(entries)
        wait_until(lambda: len(store.reads) == 3)
        time.sleep(0.3)
        assert store.reads == [e.path for e in entries[:3]], "only the consumer's shard and 2 ahead"
        for entry in entries:
            assert fetcher.get(entry) == payloads[entry.path]
        assert store.reads == [e.path for e in entries]
        assert fetcher.stats()["network_fetches"] == 8


@pytest.mark.unit
def test_parallel_fetch_never_runs_more_than_max_ahead_past_the_consumer(tmp_path):
    entries, payloads = write_shards(tmp_path, 24, 2000)
    max_ahead = 3
    gets_started = [0]
    overruns = []

    def check_bound(relative: str) -> None:
        if len(store.reads) > gets_started[0] + max_ahead + 1:
            overruns.append((relative, len(store.reads), gets_started[0]))

    store = RecordingStore(str(tmp_path), on_read=check_bound)
    with ShardFetcher(store, threads=4, max_ahead=max_ahead) as fetcher:
        fetcher.schedule(entries)
        for entry in entries:
            gets_started[0] += 1
            assert fetcher.get(entry) == payloads[entry.path]
            time.sleep(0.002)
    assert not overruns
    assert sorted(store.reads) == sorted(e.path for e in entries), "each shard read exactly once"


@pytest.mark.unit
def test_a_shard_scheduled_twice_is_read_once_while_held(tmp_path):
    (a, b, c), payloads = write_shards(tmp_path, 3, 500)
    store = RecordingStore(str(tmp_path))
    with ShardFetcher(store, threads=2, max_ahead=4) as fetcher:
        order = [a, b, a, c, a]
        fetcher.schedule(order)
        assert [fetcher.get(e) for e in order] == [payloads[e.path] for e in order]
    assert sorted(store.reads) == sorted([a.path, b.path, c.path])


# ---------------------------------------------------------------------------- integrity


@pytest.mark.unit
def test_sha_mismatch_raises_shard_corrupt_naming_the_shard_and_never_reaches_disk(tmp_path):
    (good, bad), payloads = write_shards(tmp_path / "root", 2, 800)
    bad = ShardEntry(bad.path, bad.bucket, bad.samples, bad.bytes, "0" * 64, bad.dtype)
    cache = tmp_path / "disk"
    store = Store(str(tmp_path / "root"))
    with ShardFetcher(store, disk_cache_dir=str(cache), disk_cache_bytes=10_000) as fetcher:
        fetcher.schedule([bad, good])
        with pytest.raises(ShardCorrupt) as caught:
            fetcher.get(bad)
        assert fetcher.get(good) == payloads[good.path]
        assert sorted(os.listdir(cache)) == [good.sha256]
        short = ShardEntry(good.path, good.bucket, good.samples, good.bytes + 1, good.sha256, good.dtype)
        with pytest.raises(ShardCorrupt, match="801 bytes"):
            fetcher.get(short)
    message = str(caught.value)
    assert store.url_of(bad.path) in message and "\n" not in message


# ---------------------------------------------------------------------------- disk cache


@pytest.mark.unit
def test_disk_cache_hit_skips_the_store_and_survives_a_new_fetcher(tmp_path):
    entries, payloads = write_shards(tmp_path / "root", 3, 1000)
    cache = str(tmp_path / "disk")
    first = RecordingStore(str(tmp_path / "root"))
    with ShardFetcher(first, disk_cache_dir=cache, disk_cache_bytes=10_000) as fetcher:
        fetcher.schedule(entries)
        assert [fetcher.get(e) for e in entries] == list(payloads.values())
    assert len(first.reads) == 3

    second = RecordingStore(str(tmp_path / "root"))
    with ShardFetcher(second, disk_cache_dir=cache, disk_cache_bytes=10_000) as fetcher:
        fetcher.schedule(entries)
        assert [fetcher.get(e) for e in entries] == list(payloads.values())
        assert (fetcher.stats()["disk_hits"], fetcher.stats()["network_fetches"]) == (3, 0)
    assert second.reads == []

    damaged = Path(cache) / entries[1].sha256
    damaged.write_bytes(b"x" * 1000)
    third = RecordingStore(str(tmp_path / "root"))
    with ShardFetcher(third, disk_cache_dir=cache, disk_cache_bytes=10_000) as fetcher:
        assert fetcher.get(entries[1]) == payloads[entries[1].path]
    assert third.reads == [entries[1].path], "a damaged cache file is fetched again"
    assert damaged.read_bytes() == payloads[entries[1].path]


@pytest.mark.unit
def test_disk_cache_keeps_the_byte_limit_by_dropping_the_least_recently_used(tmp_path):
    (a, b, c, d), _ = write_shards(tmp_path / "root", 4, 1000)
    cache = tmp_path / "disk"
    store = RecordingStore(str(tmp_path / "root"))
    with ShardFetcher(store, disk_cache_dir=str(cache), disk_cache_bytes=2500) as fetcher:
        for entry in (a, b, a, c):  # a used again after b: b is the least recently used
            fetcher.get(entry)
        assert fetcher.stats()["disk_hits"] == 1
    assert sorted(os.listdir(cache)) == sorted([a.sha256, c.sha256])

    # A restarted process ranks files by mtime: make a look old, so it goes first.
    os.utime(cache / a.sha256, (time.time() - 600, time.time() - 600))
    with ShardFetcher(store, disk_cache_dir=str(cache), disk_cache_bytes=2500) as fetcher:
        fetcher.get(d)
    assert sorted(os.listdir(cache)) == sorted([c.sha256, d.sha256])
    assert sum((cache / name).stat().st_size for name in os.listdir(cache)) <= 2500


@pytest.mark.unit
def test_lru_evictions_take_the_oldest_unpinned_files_until_the_new_one_fits():
    files = [("old", 400), ("mid", 300), ("new", 200)]
    assert lru_evictions(files, 1000, 100) == []
    assert lru_evictions(files, 1000, 300) == ["old"]
    assert lru_evictions(files, 1000, 300, pinned={"old"}) == ["mid"]
    assert lru_evictions(files, 1000, 800, pinned={"new"}) == ["old", "mid"]
    assert lru_evictions(files, 1000, 900, pinned={"new"}) is None
    assert lru_evictions([], 1000, 1001) is None


# ---------------------------------------------------------------------------- faults


@pytest.mark.unit
def test_missing_shard_raises_shard_unavailable_at_once_from_its_own_get(tmp_path):
    (first, last), payloads = write_shards(tmp_path, 2, 300)
    missing = ShardEntry("shards/absent.safetensors", "1024x1024", 4, 300, "a" * 64, "bfloat16")
    store = Store(str(tmp_path))
    with ShardFetcher(store, max_ahead=4) as fetcher:
        fetcher.schedule([first, missing, last])
        time.sleep(0.2)  # the background fetch of `missing` has failed by now
        assert fetcher.get(first) == payloads[first.path]
        started = time.monotonic()
        with pytest.raises(ShardUnavailable) as caught:
            fetcher.get(missing)
        assert time.monotonic() - started < 1.0
        assert fetcher.get(last) == payloads[last.path]
        assert fetcher.stats()["retries"] == 0
    assert caught.value.attempts == 1 and isinstance(caught.value.last_cause, FileNotFoundError)
    assert store.url_of(missing.path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.unit
def test_transient_errors_are_retried_and_the_budget_ends_them(tmp_path):
    (entry,), payloads = write_shards(tmp_path, 1, 300)
    flaky = RecordingStore(str(tmp_path), failures={entry.path: [ConnectionResetError("reset"), TimeoutError("slow")]})
    quick = RetryPolicy(base_delay_s=0.01, max_delay_s=0.05)
    with ShardFetcher(flaky, retry=quick) as fetcher:
        assert fetcher.get(entry) == payloads[entry.path]
        assert fetcher.stats()["retries"] == 2

    def refused() -> bytes:
        raise ConnectionRefusedError(111, "Connection refused")

    started = time.monotonic()
    with pytest.raises(ShardUnavailable) as caught:
        read_with_retries(refused, "s3://b/shard", RetryPolicy(max_attempts=100, base_delay_s=0.05, budget_s=0.5))
    assert 0.5 <= time.monotonic() - started < 1.5, "the whole budget is used, no more"
    assert caught.value.attempts > 3
    assert str(caught.value).startswith("s3://b/shard: unavailable") and "ConnectionRefusedError" in str(caught.value)


def _client_error(status: int, code: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _translated(status: int, code: str) -> OSError:
    """What s3fs raises for a ClientError it has no Python type for."""
    error = OSError(5, code)
    error.__cause__ = _client_error(status, code)
    return error


@pytest.mark.unit
@pytest.mark.parametrize("error, transient", [
    (ConnectionRefusedError(111, "refused"), True),
    (ConnectionResetError(), True),
    (TimeoutError(), True),
    (OSError(5, "EIO"), True),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), True),
    (botocore.exceptions.ConnectTimeoutError(endpoint_url="http://x"), True),
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), True),
    (botocore.exceptions.ConnectionClosedError(endpoint_url="http://x"), True),
    (_client_error(503, "SlowDown"), True),
    (_client_error(500, "InternalError"), True),
    (_translated(502, "BadGateway"), True),
    (_client_error(403, "AccessDenied"), False),
    (_translated(400, "InvalidRequest"), False),
    (FileNotFoundError("gone"), False),
    (PermissionError("no"), False),
    (IsADirectoryError("dir"), False),
    (ShardCorrupt("s3://b/x", "a", "b"), False),
    (ValueError("bug"), False),
])
def test_transient_error_classifier(error, transient):
    assert is_transient(error) is transient


@pytest.mark.unit
def test_aiohttp_client_errors_are_transient():
    aiohttp = pytest.importorskip("aiohttp")
    assert is_transient(aiohttp.ServerDisconnectedError())
    assert is_transient(aiohttp.ClientPayloadError("truncated"))


@pytest.mark.unit
def test_backoff_doubles_from_the_base_caps_and_keeps_half_fixed():
    policy = RetryPolicy(base_delay_s=0.2, max_delay_s=5.0)
    assert [backoff_delay(n, policy, 1.0) for n in range(1, 8)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert [backoff_delay(n, policy, 0.0) for n in range(1, 4)] == pytest.approx([0.1, 0.2, 0.4])
    assert backoff_delay(10_000, policy, 0.5) == pytest.approx(3.75)


@pytest.mark.unit
def test_stream_storage_options_shorten_botocore_retries_for_s3_only():
    options = {"endpoint_url": "http://127.0.0.1:9"}
    streamed = stream_storage_options("s3://bucket/cache", options)
    assert streamed["endpoint_url"] == options["endpoint_url"] and "config_kwargs" not in options
    config = botocore.config.Config(**streamed["config_kwargs"])
    assert (config.connect_timeout, config.read_timeout) == (3, 30)
    assert config.retries["mode"] == "standard"
    mine = {"config_kwargs": {"read_timeout": 99}}
    assert stream_storage_options("s3://bucket", mine) == mine
    assert stream_storage_options("/data/cache", options) == options
    assert stream_storage_options("gs://bucket", None) == {}


@pytest.mark.unit
def test_close_returns_promptly_with_a_fetch_stuck_and_is_idempotent(tmp_path):
    entries, _ = write_shards(tmp_path, 4, 100)
    gate = threading.Event()
    fetcher = ShardFetcher(RecordingStore(str(tmp_path), gate=gate), threads=2)
    try:
        fetcher.schedule(entries)
        time.sleep(0.1)
        started = time.monotonic()
        fetcher.close()
        fetcher.close()
        assert time.monotonic() - started < 1.5
        assert all(worker.daemon for worker in fetcher._workers)
        with pytest.raises(FetcherClosed):
            fetcher.get(entries[0])
    finally:
        gate.set()


# ---------------------------------------------------------------------------- S3 (moto server)


def upload(server: S3Server, bucket: str, root: Path, entries: list[ShardEntry]) -> None:
    client = server.client()
    client.create_bucket(Bucket=bucket)
    for entry in entries:
        client.put_object(Bucket=bucket, Key=f"cache/{entry.path}", Body=(root / entry.path).read_bytes())


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


def s3_store(endpoint: str, bucket: str) -> Store:
    url = f"s3://{bucket}/cache"
    return Store(url, stream_storage_options(url, {"endpoint_url": endpoint, "skip_instance_cache": True}))


@pytest.mark.s3
def test_s3_shards_arrive_verified_in_parallel(s3_env, tmp_path):
    entries, payloads = write_shards(tmp_path, 6, 200_000)
    upload(s3_env, "fetcher-read", tmp_path, entries)
    store = s3_store(s3_env.url, "fetcher-read")
    assert store.fs.config_kwargs["connect_timeout"] == 3, "s3fs keeps the stream's botocore config"
    with ShardFetcher(store, threads=3, max_ahead=2) as fetcher:
        fetcher.schedule(entries)
        assert [fetcher.get(e) for e in entries] == [payloads[e.path] for e in entries]
        stats = fetcher.stats()
    assert (stats["network_fetches"], stats["fetched_bytes"], stats["retries"]) == (6, 1_200_000, 0)


@pytest.mark.s3
def test_s3_server_restart_mid_schedule_is_survived_by_retries(tmp_path, monkeypatch):
    for name, value in S3Server().env.items():
        monkeypatch.setenv(name, value)
    entries, payloads = write_shards(tmp_path / "root", 24, 256 * 1024)
    first = S3Server().start()
    second: list[S3Server] = []
    times: dict[str, float] = {}
    try:
        upload(first, "fetcher-restart", tmp_path / "root", entries)
        store = s3_store(first.url, "fetcher-restart")

        def restart() -> None:
            time.sleep(4.0)  # longer than botocore's own retries (~3 s), so the fetcher sees the outage
            server = S3Server(port=first.port).start(preload=("fetcher-restart", "cache", tmp_path / "root"))
            second.append(server)
            times["up"] = time.monotonic()

        restarter = threading.Thread(target=restart)
        policy = RetryPolicy(max_attempts=20, base_delay_s=0.2, max_delay_s=2.0, budget_s=30.0)
        with ShardFetcher(store, threads=4, max_ahead=4, retry=policy) as fetcher:
            fetcher.schedule(entries)
            got, done_at = [], []
            for index, entry in enumerate(entries):
                if index == 6:
                    times["stop"] = time.monotonic()
                    first.stop()
                    restarter.start()
                got.append(fetcher.get(entry))
                done_at.append(time.monotonic())
            stats = fetcher.stats()
        restarter.join()
    finally:
        first.stop()
        for server in second:
            server.stop()
    assert got == [payloads[e.path] for e in entries]
    assert stats["retries"] > 0
    first_after = min(t for t in done_at if t > times["up"])
    print(f"\nrestart: down {times['up'] - times['stop']:.2f} s; first shard {first_after - times['up']:.2f} s "
          f"after the new server was up; data wait {stats['wait_seconds']:.2f} s; retries {stats['retries']}")


@pytest.mark.s3
def test_s3_server_gone_for_good_ends_in_shard_unavailable_within_the_budget(tmp_path, monkeypatch):
    for name, value in S3Server().env.items():
        monkeypatch.setenv(name, value)
    (entry,), _ = write_shards(tmp_path, 1, 1000)
    server = S3Server().start()
    try:
        upload(server, "fetcher-gone", tmp_path, [entry])
        store = s3_store(server.url, "fetcher-gone")
    finally:
        server.stop()
    with ShardFetcher(store, retry=RetryPolicy(budget_s=3.0)) as fetcher:
        started = time.monotonic()
        with pytest.raises(ShardUnavailable) as caught:
            fetcher.get(entry)
        elapsed = time.monotonic() - started
    assert elapsed < 3.0 + 3.0 + 1.0, f"gave up after {elapsed:.1f} s"
    assert store.url_of(entry.path) in str(caught.value) and "\n" not in str(caught.value)
    print(f"\ngone: ShardUnavailable after {elapsed:.2f} s, {caught.value.attempts} attempts: {caught.value}")
