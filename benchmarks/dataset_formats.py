"""`sd35dist cache` on the same generated images as a folder, as WebDataset tars and as parquet.

    .venv/bin/python benchmarks/dataset_formats.py                        # 10k and 100k images, 2 ranks
    .venv/bin/python benchmarks/dataset_formats.py --images 2000 --formats webdataset,parquet
    .venv/bin/python benchmarks/dataset_formats.py --images 10000 --s3    # sources on the S3-protocol
                                                                          # server behind the shaping proxy

For each image count and format: the images (small generated PNGs in the tiny model's buckets,
identical bytes in every format) are written under --root, then `torchrun --nproc-per-node=R -m
sd35dist cache` builds a cache from them with the tiny SD3 (its VAE and text encoders). Measured:
  wall          the whole command, start-up (imports, model loading) included;
  first sample  seconds from the start until the first output shard exists (the first cached samples);
  img/s/rank    images / (end − first sample) / ranks: the steady rate once the ranks are working;
  img/CPU-s     images / CPU seconds (user + system) of the rank processes: what the work costs, which
                other programs on a shared machine do not change as they change wall time;
  peak RSS      the largest resident set of any one rank process (psutil, sampled every 0.2 s).
Flat peak memory from 10k to 100k images is what "memory does not grow with the dataset" means.
With --s3 the sources are uploaded to moto (tests/s3_server.py) and read through
tests/shaping_proxy.py (30 ms first byte, 80 MB/s per connection); the cache stays on local disk.
Generated data lives under --root and is deleted afterwards unless --keep; --data DIR keeps the generated
images in DIR and reuses them on the next run. The build's output goes to a log file beside its cache
(a pipe nobody reads would stall the ranks once it is full). Prints markdown rows.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # run from a checkout without installing

from bench_report import typed_command

from sd35dist.demo.formats import demo_samples, write_folder, write_parquet, write_webdataset

SIZES = ((64, 64), (80, 48), (48, 80))
"""The tiny model's buckets: images of these shapes are resized, not cropped."""
FORMATS = ("folder", "webdataset", "parquet")
BUCKET = "formats-bench"


def write_inputs(root: Path, images: int, per_shard: int, formats: list[str]) -> dict[str, Path]:
    """The same images in each format: a folder, tars of `per_shard`, parquet row groups of `per_shard`.
    Formats already written there (a `complete` marker) are kept."""
    paths = {"folder": root / "folder", "webdataset": root / "webdataset", "parquet": root / "parquet"}
    writers = {
        "folder": lambda: write_folder(paths["folder"], demo_samples(images, 0, sizes=SIZES)),
        "webdataset": lambda: write_webdataset(paths["webdataset"], demo_samples(images, 0, sizes=SIZES), per_shard),
        "parquet": lambda: write_parquet(paths["parquet"], demo_samples(images, 0, sizes=SIZES), per_shard, 4),
    }
    for fmt in formats:
        marker = paths[fmt] / "complete"
        if not marker.exists():
            shutil.rmtree(paths[fmt], ignore_errors=True)
            writers[fmt]()
            marker.write_text(f"{images} images, {per_shard} per shard\n")
    return paths


def dataset_entry(fmt: str, source: str) -> dict:
    entry = {"id": fmt, "source": source, "format": fmt}
    if fmt == "parquet":
        entry.update(width_column="width", height_column="height")
    return entry


def recipe_file(root: Path, model: Path, fmt: str, source: str, cache: Path, storage_options: dict) -> Path:
    recipe = {"name": f"bench-{fmt}", "model": {"pretrained": str(model)},
              "data": {"cache_url": str(cache), "storage_options": storage_options,
                       "datasets": [dataset_entry(fmt, source)], "buckets": [list(s) for s in SIZES],
                       "shard_target_mb": 8, "cache_batch_size": 32, "cache_dtype": "bf16", "max_sequence_length": 77},
              "output": {"dir": str(root / "out")}}
    path = root / f"{fmt}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


class RankWatch(threading.Thread):
    """The largest RSS any rank process (a descendant of torchrun's agent) reaches, and the CPU
    seconds they used, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak, self.done = psutil.Process(pid), 0, threading.Event()
        self.cpu: dict[int, float] = {}

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                for child in self.root.children(recursive=True):
                    try:
                        self.peak = max(self.peak, child.memory_info().rss)
                        times = child.cpu_times()
                        self.cpu[child.pid] = times.user + times.system
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return


def first_shard_seen(cache: Path) -> bool:
    shards = cache / "shards"
    return shards.exists() and any(True for _ in shards.rglob("*.safetensors"))


def build(recipe: Path, cache: Path, ranks: int, env: dict[str, str]) -> dict[str, float]:
    command = [sys.executable, "-m", "sd35dist", "torchrun", "--start-method=forkserver", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "sd35dist", "cache", "--recipe", str(recipe)]
    log = recipe.with_suffix(".log")
    started = time.monotonic()
    with open(log, "w") as output:
        proc = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=output, stderr=subprocess.STDOUT)
        watch = RankWatch(proc.pid)
        watch.start()
        first = None
        while proc.poll() is None:
            if first is None and first_shard_seen(cache):
                first = time.monotonic() - started
            time.sleep(0.05)
    wall = time.monotonic() - started
    watch.done.set()
    watch.join()
    if proc.returncode != 0:
        raise SystemExit(f"cache build failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    ranks_cpu = sorted(watch.cpu.values())[-ranks:]  # the agent and helpers use little; the ranks most
    return {"wall": wall, "first": first if first is not None else wall, "peak": watch.peak, "cpu": sum(ranks_cpu)}


def serve_s3(inputs: Path):
    """moto with the inputs preloaded, and the shaping proxy in front of it (both stopped by the caller)."""
    from tests.s3_server import S3Server, free_port

    server = S3Server().start(timeout_s=600, preload=(BUCKET, "inputs", inputs))
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "tests.shaping_proxy", "--upstream", f"127.0.0.1:{server.port}",
                              "--port", str(port), "--delay-ms", "30", "--mb-per-s", "80"], cwd=PROJECT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(1.0)
    return server, proxy, f"http://127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=1000, help="images per tar and per parquet row group")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--model", type=Path, help="a tiny SD3 directory (default: built under --root)")
    parser.add_argument("--s3", action="store_true", help="read the sources from moto through the shaping proxy")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--data", type=Path, help="keep the generated images here and reuse them (default: deleted)")
    args = parser.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    root = Path(tempfile.mkdtemp(prefix="sd35dist-formats-", dir=args.root))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    try:
        model = args.model
        if model is None:
            from sd35dist.models.tiny_sd3 import build_tiny_sd3

            model = build_tiny_sd3(root / "tiny-sd3")
        for images in args.images:
            scale = root / f"n{images}"
            scale.mkdir(parents=True)
            started = time.monotonic()
            data = (args.data / f"n{images}-per{args.per_shard}") if args.data else scale / "inputs"
            inputs = write_inputs(data, images, args.per_shard, formats)
            print(f"# {images} images ready in {time.monotonic() - started:.0f} s", flush=True)
            server = proxy = None
            storage_options: dict = {}
            sources = {fmt: str(path) for fmt, path in inputs.items()}
            sources["webdataset"] = str(inputs["webdataset"] / f"shard-{{00000..{(images - 1) // args.per_shard:05d}}}.tar")
            run_env = dict(env)
            if args.s3:
                server, proxy, endpoint = serve_s3(data)
                storage_options = {"endpoint_url": endpoint}
                run_env.update(server.env)
                sources = {fmt: s.replace(str(inputs[fmt]), f"s3://{BUCKET}/inputs/{fmt}") for fmt, s in sources.items()}
            try:
                for fmt in formats:
                    cache = scale / f"cache-{fmt}"
                    recipe = recipe_file(scale, model, fmt, sources[fmt], cache, storage_options)
                    got = build(recipe, cache, args.ranks, run_env)
                    rate = images / max(got["wall"] - got["first"], 1e-9) / args.ranks
                    rows.append((images, fmt + (" (S3, shaped)" if args.s3 else ""), got, rate))
                    print(row(*rows[-1]), flush=True)
                    shutil.rmtree(cache, ignore_errors=True)
            finally:
                if proxy is not None:
                    proxy.terminate()
                    proxy.wait()
                if server is not None:
                    server.stop()
            if not args.keep:
                shutil.rmtree(scale, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{datetime.date.today()} · `{typed_command()}` · {args.ranks} ranks · torch "
          f"{__import__('torch').__version__} · {psutil.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| images | format | wall | first sample | img/s/rank | img/CPU-s | peak RSS per rank |")
    print("|---|---|---|---|---|---|---|")
    for values in rows:
        print(row(*values))
    return 0


def row(images: int, fmt: str, got: dict[str, float], rate: float) -> str:
    return (f"| {images} | {fmt} | {got['wall']:.0f} s | {got['first']:.1f} s | {rate:.0f} | "
            f"{images / max(got['cpu'], 1e-9):.0f} | {got['peak'] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    raise SystemExit(main())
