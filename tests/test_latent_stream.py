"""LatentStream against the real S3-protocol server (moto on 127.0.0.1, through s3fs), also behind
tests/shaping_proxy.py (first-byte latency, per-connection bandwidth, connections reset mid-object)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from sd35dist.data.latent_stream import LatentStream, StreamOptions, dropped_caption
from sd35dist.data.manifest import read_manifest
from sd35dist.data.shard_fetcher import RetryPolicy, ShardCorrupt
from sd35dist.data.storage import Store
from sd35dist.demo.dataset import write_demo_dataset
from tests.cache_runs import run_cache, samples_by_key, write_recipe
from tests.s3_server import S3Server
from tests.shaping_proxy import ShapingProxy

BUCKET = "stream-test"
PREFIX = "cache"
# tests/shaping_proxy.py in front of the server: what one real S3 connection gives.
SHAPED_DELAY_S = 0.03
SHAPED_BYTES_PER_S = 80e6


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("stream-cache")
    write_demo_dataset(root / "images" / "demo", count=24, seed=11)
    (root / "images" / "exact").mkdir()
    recipe = write_recipe(root / "recipe.yaml", tiny_model, {"demo": root / "images" / "demo",
                          "exact": root / "images" / "exact"}, str(root / "cache"),
                          shard_target_mb=0.02, cache_dtype="bf16")
    run_cache(recipe)
    return root / "cache"


def upload(server: S3Server, cache: Path) -> None:
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(cache.rglob("*")):
        if path.is_file() and "progress" not in path.parts:
            client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{path.relative_to(cache)}", Body=path.read_bytes())


@pytest.fixture
def s3_cache(s3_server, local_cache, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    if not _bucket_exists(s3_server.client()):
        upload(s3_server, local_cache)
    return f"s3://{BUCKET}/{PREFIX}", s3_server.storage_options


def _bucket_exists(client) -> bool:
    return any(b["Name"] == BUCKET for b in client.list_buckets().get("Buckets", []))


def stream(url: str, storage_options, rank: int, world: int, **options) -> LatentStream:
    return LatentStream(url, rank=rank, world_size=world, storage_options=storage_options,
                        options=StreamOptions(batch_size=options.pop("batch_size", 3), seed=5, **options))


def all_keys(cache: Path) -> Counter:
    """Every sample key of the cache, once."""
    return Counter(list(samples_by_key(cache)))


@pytest.mark.s3
def test_two_ranks_read_every_sample_once_per_epoch(s3_cache, local_cache):
    url, options = s3_cache
    ranks = [stream(url, options, r, 2) for r in range(2)]
    batches = [list(s.iter_epoch()) for s in ranks]
    assert len(batches[0]) == len(batches[1]), "every rank runs the same number of steps"
    for a, b in zip(*batches):
        assert a.bucket == b.bucket and a.step == b.step, "all ranks read the same bucket at a step"
        for batch in (a, b):
            if batch.size:
                assert batch.tensors["latents"].shape[0] == batch.size
                assert batch.tensors["prompt_embeds"].shape[0] == batch.size
    seen = Counter(k for per_rank in batches for batch in per_rank for k in batch.keys)
    assert seen == all_keys(local_cache)
    assert ranks[0].epoch == 1
    for s in ranks:
        s.close()


@pytest.mark.s3
@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_mid_epoch_with_another_world_size(s3_cache, local_cache, new_world):
    url, options = s3_cache
    first = [stream(url, options, r, 2) for r in range(2)]
    iterators = [s.iter_epoch() for s in first]
    seen: Counter = Counter()
    steps = len(list(stream(url, options, 0, 2).iter_epoch())) // 2
    for _ in range(steps):
        for it in iterators:
            seen.update(next(it).keys)
    state = first[0].state_dict()
    assert state == first[1].state_dict(), "the state is global: every rank saves the same"
    for s in first:
        s.close()
    resumed = [stream(url, options, r, new_world) for r in range(new_world)]
    for s in resumed:
        s.load_state_dict(state)
    for s in resumed:
        for batch in s.iter_epoch():
            seen.update(batch.keys)
        s.close()
    assert seen == all_keys(local_cache)


@pytest.mark.process
def test_resumed_batches_equal_uninterrupted_batches(local_cache):
    straight = list(stream(str(local_cache), {}, 0, 1, caption_dropout=0.3).iter_epoch())
    first = stream(str(local_cache), {}, 0, 1, caption_dropout=0.3)
    head = [b for _, b in zip(range(5), first.iter_epoch())]
    resumed = stream(str(local_cache), {}, 0, 1, caption_dropout=0.3)
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == first.state_dict(), "saving right after loading keeps the position"
    tail = list(resumed.iter_epoch())
    assert len(head) + len(tail) == len(straight)
    for got, want in zip(head + tail, straight):
        assert got.keys == want.keys and got.step == want.step
        for name in want.tensors:
            assert torch.equal(got.tensors[name], want.tensors[name]), name


@pytest.mark.process
def test_caption_dropout_uses_the_cached_empty_prompt(local_cache):
    s = stream(str(local_cache), {}, 0, 1, caption_dropout=0.5, batch_size=1)
    empty = s.empty_prompt()["prompt_embeds"][0]
    dropped = kept = 0
    for batch in s.iter_epoch():
        is_empty = torch.equal(batch.tensors["prompt_embeds"][0], empty)
        dropped += is_empty
        kept += not is_empty
    assert dropped > 10 and kept > 10
    assert dropped_caption(5, 0, 17, 0.5) == dropped_caption(5, 0, 17, 0.5)
    assert not dropped_caption(5, 0, 17, 0.0)


@pytest.mark.s3
def test_server_restart_mid_epoch_loses_nothing(s3_server, local_cache, tmp_path, monkeypatch):
    server = S3Server().start()
    try:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        upload(server, local_cache)
        s = stream(f"s3://{BUCKET}/{PREFIX}", server.storage_options, 0, 1, prefetch_shards=1, memory_shards=1,
                   retry=RetryPolicy(budget_s=60))
        iterator = s.iter_epoch()
        seen: Counter = Counter()
        for _ in range(4):
            seen.update(next(iterator).keys)
        port = server.port
        server.stop()

        def restart():
            time.sleep(4)  # longer than botocore's own retries, so the stream sees the outage
            nonlocal server
            # moto keeps objects in memory only: the new server gets them back before it listens
            server = S3Server(port=port).start(preload=(BUCKET, PREFIX, local_cache))

        thread = threading.Thread(target=restart)
        thread.start()
        for batch in iterator:
            seen.update(batch.keys)
        thread.join()
        assert seen == all_keys(local_cache)
        assert s.stats()["retries"] > 0, "the outage was seen and retried"
        s.close()
    finally:
        server.stop()


@pytest.mark.s3
def test_corrupt_shard_errors_by_default_and_is_skipped_on_request(s3_server, local_cache, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    client = s3_server.client()
    client.create_bucket(Bucket="corrupt")
    for path in sorted(local_cache.rglob("*")):
        if path.is_file():
            client.put_object(Bucket="corrupt", Key=f"c/{path.relative_to(local_cache)}", Body=path.read_bytes())
    victim = read_manifest(Store(str(local_cache))).shards[2]
    body = bytearray((local_cache / victim.path).read_bytes())
    body[-10] ^= 0x55
    client.put_object(Bucket="corrupt", Key=f"c/{victim.path}", Body=bytes(body))
    url = "s3://corrupt/c"
    with pytest.raises(ShardCorrupt, match=f"s3://corrupt/c/{victim.path}"):
        for _ in stream(url, s3_server.storage_options, 0, 1).iter_epoch():
            pass
    skipping = stream(url, s3_server.storage_options, 0, 1, on_corrupt="skip")
    seen = Counter(k for batch in skipping.iter_epoch() for k in batch.keys)
    assert skipping.skipped_shards == [f"s3://corrupt/c/{victim.path}"]
    assert sum(seen.values()) == sum(all_keys(local_cache).values()) - victim.samples
    assert max(seen.values()) == 1


@pytest.mark.s3
def test_two_ranks_read_every_sample_once_while_connections_drop_mid_object(s3_cache, local_cache, s3_server):
    url, options = s3_cache
    shard_sizes = sorted(p.stat().st_size for p in local_cache.rglob("*.safetensors") if "shards" in p.parts)
    cut_after = shard_sizes[0] // 2
    # 30 ms to the first byte, 80 MB/s per connection, and every third shard GET reset halfway through.
    with ShapingProxy("127.0.0.1", s3_server.port, first_byte_delay_s=SHAPED_DELAY_S, bytes_per_s=SHAPED_BYTES_PER_S,
                      drop_every=3, drop_min_body=shard_sizes[0], drop_after=cut_after) as proxy:
        ranks = [stream(url, {**options, "endpoint_url": proxy.endpoint_url}, r, 2) for r in range(2)]
        batches = [list(s.iter_epoch()) for s in ranks]
        for s in ranks:
            s.close()
    seen = Counter(k for per_rank in batches for batch in per_rank for k in batch.keys)
    assert seen == all_keys(local_cache), "every sample once, none lost, none twice"
    assert proxy.stats.drops >= 2, f"the proxy cut {proxy.stats.drops} responses mid-object"


@pytest.mark.s3
def test_the_proxy_delays_each_first_byte_and_caps_each_connection(s3_server, monkeypatch):
    import s3fs

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    client = s3_server.client()
    client.create_bucket(Bucket="shaped")
    client.put_object(Bucket="shaped", Key="small", Body=b"x")
    client.put_object(Bucket="shaped", Key="big", Body=bytes(8_000_000))
    with ShapingProxy("127.0.0.1", s3_server.port, first_byte_delay_s=SHAPED_DELAY_S, bytes_per_s=SHAPED_BYTES_PER_S) as proxy:
        fs = s3fs.S3FileSystem(**{**s3_server.storage_options, "endpoint_url": proxy.endpoint_url},
                               skip_instance_cache=True)
        fs.cat_file("shaped/small")  # open the connection
        start = time.perf_counter()
        for _ in range(3):
            fs.cat_file("shaped/small")
        per_request = (time.perf_counter() - start) / 3
        start = time.perf_counter()
        assert len(fs.cat_file("shaped/big")) == 8_000_000
        big = time.perf_counter() - start
    assert SHAPED_DELAY_S <= per_request < SHAPED_DELAY_S + 0.1, per_request
    assert big >= SHAPED_DELAY_S + 8_000_000 / SHAPED_BYTES_PER_S, f"8 MB took {big:.3f} s: faster than 80 MB/s"
    assert proxy.stats.responses >= 5
