"""LatentStream vs a naive one-object-per-sample reader vs the server's raw ceiling, in one run.

    .venv/bin/python benchmarks/stream_throughput.py [--samples 96] [--shard-mb 32] [--million]

Everything talks to an S3-protocol server (moto, server mode) started here on 127.0.0.1 and
stopped at the end. Samples have SD3.5 Large's shapes at 1024²: latent mean and std
16×128×128 and text embeddings 333×4096 (+2048 pooled), bf16 — 3.8 MB each in our shard
format (the issue's 3.3 MB counts one latent tensor; we store the distribution). Figures:
- ceiling: a bare client reading the shard objects whole with 32 threads;
- stream: LatentStream reading one epoch, 1 rank, and 2 ranks in 2 processes at once;
- naive: one GET per sample object, in order, as a per-sample Dataset does.
`--million` also times the first batch from a 1,000,000-sample manifest.
`--shaped` puts tests/shaping_proxy.py (its own process) between every reader and the server:
30 ms to each response's first byte and 80 MB/s per connection, as real S3 behaves
(`--delay-ms`, `--mb-per-s` change them). Writes go to the server directly.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sd35dist.data.latent_stream import LatentStream, StreamOptions
from sd35dist.data.manifest import ShardEntry, ShardManifest
from sd35dist.data.shard_format import CachedSample, SampleRecord, encode_shard
from sd35dist.data.storage import Store, sha256_hex
from tests.s3_server import S3Server, free_port

LATENT = (16, 128, 128)
TEXT = (333, 4096)
POOLED = 2048
BUCKET = "bench"


def synthetic_sample(index: int, latent=LATENT, text=TEXT, pooled=POOLED) -> CachedSample:
    g = torch.Generator().manual_seed(index)
    return CachedSample(
        record=SampleRecord(f"bench/{index:07d}.png#0", "bench", f"{index:07d}.png", 0, "a caption"),
        latent_mean=torch.randn(latent, generator=g).bfloat16(),
        latent_std=torch.rand(latent, generator=g).bfloat16(),
        prompt_embeds=torch.randn(text, generator=g).bfloat16(),
        pooled_prompt_embeds=torch.randn(pooled, generator=g).bfloat16(),
        original_size=(1024, 1024),
        crop_top_left=(0, 0),
    )


def empty_prompt_entry(store: Store, text=TEXT, pooled=POOLED) -> ShardEntry:
    from sd35dist.data.shard_format import save_canonical

    blob = save_canonical({"prompt_embeds": torch.zeros((1, *text), dtype=torch.bfloat16),
                           "pooled_prompt_embeds": torch.zeros((1, pooled), dtype=torch.bfloat16)}, {"format": "x"})
    store.write_bytes("empty_prompt.safetensors", blob)
    return ShardEntry("empty_prompt.safetensors", "", 1, len(blob), sha256_hex(blob), "bf16")


def write_cache(store: Store, samples: int, per_shard: int) -> tuple[int, list[str]]:
    """Shards for our stream and one object per sample for the naive reader; returns bytes and sample keys."""
    entries, sample_keys, total = [], [], 0
    for start in range(0, samples, per_shard):
        batch = [synthetic_sample(i) for i in range(start, min(samples, start + per_shard))]
        blob = encode_shard(batch, "1024x1024", "bf16")
        path = f"shards/1024x1024/{start // per_shard:06d}.safetensors"
        store.write_bytes(path, blob)
        entries.append(ShardEntry(path, "1024x1024", len(batch), len(blob), sha256_hex(blob), "bf16"))
        total += len(blob)
        for sample in batch:
            key = f"per-sample/{sample.record.image}.safetensors"
            store.write_bytes(key, encode_shard([sample], "1024x1024", "bf16"))
            sample_keys.append(key)
    manifest = ShardManifest(tuple(entries), empty_prompt_entry(store), {}, {"scaling_factor": 1.5305,
                             "shift_factor": 0.0609}, "bf16", 256, ("1024x1024",), 0)
    store.write_bytes("manifest.json", manifest.to_json().encode())
    return total, sample_keys


def ceiling(store: Store, paths: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = sum(len(b) for b in pool.map(store.read_bytes, paths))
    return time.perf_counter() - start, got


def naive(store: Store, keys: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    got = sum(len(store.read_bytes(k)) for k in keys)
    return time.perf_counter() - start, got


def stream_epoch(url: str, options: dict, rank: int, world: int, batch: int, result: dict | None = None) -> tuple[float, int, float]:
    """(seconds reading the epoch after start-up, samples, seconds from construction to first batch)."""
    created = time.perf_counter()
    s = LatentStream(url, rank=rank, world_size=world, storage_options=options,
                     options=StreamOptions(batch_size=batch, sample_latents=False, fetch_threads=8, prefetch_shards=8))
    start = time.perf_counter()
    first = None
    samples = 0
    for b in s.iter_epoch():
        first = first or time.perf_counter() - created
        samples += b.size
    elapsed = time.perf_counter() - start
    stats = s.stats()
    s.close()
    if result is not None:
        result[rank] = (elapsed, samples, first, stats.get("fetched_bytes", 0))
    return elapsed, samples, first or 0.0


def _rank_process(url, options, env, rank, world, batch, queue, barrier):
    os.environ.update(env)
    torch.set_num_threads(1)  # two ranks, the server and their fetch threads share this machine's cores
    result: dict = {}
    Store(url, options).read_bytes("manifest.json")  # s3fs/botocore's cold start, as warm as the 1-rank reader
    barrier.wait()  # both ranks start reading together, after their imports
    stream_epoch(url, options, rank, world, batch, result)
    queue.put(result[rank])


def million_manifest(store: Store, per_shard: int = 64) -> None:
    """A 1,000,000-sample manifest whose entries share 16 small real shards (time to first batch)."""
    small = [(f"small/{i:02d}.safetensors", encode_shard([synthetic_sample(i * per_shard + j, (16, 8, 8), (8, 16), 8)
              for j in range(per_shard)], "1024x1024", "bf16")) for i in range(16)]
    for path, blob in small:
        store.write_bytes(path, blob)
    shards = tuple(ShardEntry(small[i % 16][0], ["1024x1024", "1152x896", "896x1152"][i % 3], per_shard,
                              len(small[i % 16][1]), sha256_hex(small[i % 16][1]), "bf16")
                   for i in range(1_000_000 // per_shard))
    manifest = ShardManifest(shards, empty_prompt_entry(store, (8, 16), 8), {}, {}, "bf16", 256,
                             ("1024x1024", "1152x896", "896x1152"), 0)
    store.write_bytes("manifest.json", manifest.to_json().encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--shard-mb", type=float, default=32.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--million", action="store_true")
    parser.add_argument("--shaped", action="store_true", help="read through the latency/bandwidth-shaping proxy")
    parser.add_argument("--delay-ms", type=float, default=30.0)
    parser.add_argument("--mb-per-s", type=float, default=80.0)
    args = parser.parse_args()
    with S3Server() as server:
        os.environ.update(server.env)
        server.client().create_bucket(Bucket=BUCKET)
        url = f"s3://{BUCKET}/cache"
        store = Store(url, server.storage_options)
        per_sample = len(encode_shard([synthetic_sample(0)], "1024x1024", "bf16"))
        per_shard = max(1, int(args.shard_mb * 2**20 // per_sample))
        total, keys = write_cache(store, args.samples, per_shard)
        shard_paths = [e["path"] for e in json.loads(store.read_bytes("manifest.json"))["shards"]]
        mb = total / 1e6
        print(f"# {args.samples} samples of {per_sample / 1e6:.2f} MB in {len(shard_paths)} shards of {per_shard}; "
              f"moto on 127.0.0.1:{server.port}; {os.cpu_count()} CPUs; torch {torch.__version__}")
        options, proxy = server.storage_options, None
        if args.shaped:
            port = free_port()
            proxy = subprocess.Popen([sys.executable, "-m", "tests.shaping_proxy", "--upstream",
                                      f"127.0.0.1:{server.port}", "--port", str(port), "--delay-ms", str(args.delay_ms),
                                      "--mb-per-s", str(args.mb_per_s)], stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parent.parent)
            proxy.stdout.readline()  # "listening on …"
            options = {**server.storage_options, "endpoint_url": f"http://127.0.0.1:{port}"}
            store = Store(url, options)
            print(f"# shaped: {args.delay_ms:g} ms to each first byte, {args.mb_per_s:g} MB/s per connection "
                  f"(tests/shaping_proxy.py, own process)")
        try:
            run_readers(args, server, url, store, options, shard_paths, total, keys, mb)
        finally:
            if proxy is not None:
                proxy.terminate()
                proxy.wait(10)


def run_readers(args, server, url, store, options, shard_paths, total, keys, mb) -> None:
    rows = []
    seconds, got = ceiling(store, shard_paths)
    rows.append(("ceiling: whole shard objects, 32 threads", seconds, got, args.samples, None))
    seconds, got, first = stream_epoch(url, options, 0, 1, args.batch)
    rows.append(("LatentStream, 1 rank", seconds, total, got, first))
    ctx = multiprocessing.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_rank_process,
                         args=(url, options, server.env, r, 2, args.batch, queue, barrier))
             for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    wall = max(r[0] for r in results)
    print(f"# per rank (seconds, samples, first batch s, fetched bytes): {results}")
    rows.append(("LatentStream, 2 ranks (2 processes)", wall, sum(r[3] for r in results),
                 sum(r[1] for r in results), max(r[2] for r in results)))
    seconds, got = naive(store, keys)
    rows.append(("naive: one GET per sample, in order", seconds, got, args.samples, None))
    print("| reader | samples/s | MB/s | seconds | first batch s |")
    print("|---|---|---|---|---|")
    for name, seconds, nbytes, samples, first in rows:
        first_text = f"{first:.2f}" if first is not None else "–"
        print(f"| {name} | {samples / seconds:.1f} | {nbytes / 1e6 / seconds:.0f} | {seconds:.2f} | {first_text} |")
    print(f"# stream / ceiling: {rows[1][2] / rows[1][1] / (rows[0][2] / rows[0][1]):.0%} (1 rank), "
          f"{rows[2][2] / rows[2][1] / (rows[0][2] / rows[0][1]):.0%} (2 ranks); total data {mb:.0f} MB")
    if args.million:
        mstore = Store(f"s3://{BUCKET}/million", options)
        million_manifest(mstore)
        start = time.perf_counter()
        s = LatentStream(f"s3://{BUCKET}/million", rank=0, world_size=8, storage_options=options,
                         options=StreamOptions(batch_size=6))
        next(iter(s.iter_epoch()))
        print(f"# time to first batch, 1,000,000-sample manifest ({len(s.manifest.shards)} shards), "
              f"rank 0 of 8, batch 6: {time.perf_counter() - start:.2f} s")
        s.close()


if __name__ == "__main__":
    main()
