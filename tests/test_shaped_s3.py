"""The latency/bandwidth-shaping proxy (tests/shaping_proxy.py) in front of the loopback
S3-protocol server shapes as stated. (Two ranks reading every sample exactly once while it
resets connections mid-object: tests/test_latent_stream.py, which owns the cache fixture.)"""

from __future__ import annotations

import time

import pytest

from tests.shaping_proxy import ShapingProxy

pytestmark = pytest.mark.s3

DELAY_S = 0.03
BYTES_PER_S = 80e6


def through(proxy: ShapingProxy, storage_options: dict) -> dict:
    return {**storage_options, "endpoint_url": proxy.endpoint_url}


def test_the_proxy_delays_each_first_byte_and_caps_each_connection(s3_server, monkeypatch):
    import s3fs

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    client = s3_server.client()
    client.create_bucket(Bucket="shaped")
    client.put_object(Bucket="shaped", Key="small", Body=b"x")
    client.put_object(Bucket="shaped", Key="big", Body=bytes(8_000_000))
    with ShapingProxy("127.0.0.1", s3_server.port, first_byte_delay_s=DELAY_S, bytes_per_s=BYTES_PER_S) as proxy:
        fs = s3fs.S3FileSystem(**through(proxy, s3_server.storage_options), skip_instance_cache=True)
        fs.cat_file("shaped/small")  # open the connection
        start = time.perf_counter()
        for _ in range(3):
            fs.cat_file("shaped/small")
        per_request = (time.perf_counter() - start) / 3
        start = time.perf_counter()
        assert len(fs.cat_file("shaped/big")) == 8_000_000
        big = time.perf_counter() - start
    assert DELAY_S <= per_request < DELAY_S + 0.1, per_request
    assert big >= DELAY_S + 8_000_000 / BYTES_PER_S, f"8 MB took {big:.3f} s: faster than 80 MB/s"
    assert proxy.stats.responses >= 5
