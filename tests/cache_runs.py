"""`sd35dist cache` as the tests run it: the inputs (good images and every kind of bad one), a cache
recipe over them, the job in one process or under torchrun, and what a reader of the cache sees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from PIL import Image

from sd35dist.data.manifest import read_manifest
from sd35dist.data.shard_format import decode_shard
from sd35dist.data.storage import Store
from sd35dist.demo.dataset import DEMO_BUCKETS, write_demo_dataset
from tests.cli_runs import PROJECT, venv_env
from tests.rank_runs import WARM_TORCHRUN


def write_inputs(root: Path) -> dict[str, Path]:
    """Two datasets: captioned demo images plus every kind of bad input, and a crop-false set."""
    demo = root / "demo"
    write_demo_dataset(demo, count=8, seed=3)
    (demo / "garbage.png").write_bytes(b"this is not an image")
    (demo / "garbage.txt").write_text("garbage caption\n")
    (demo / "trunc.png").write_bytes((demo / "img_0000.png").read_bytes()[:200])
    (demo / "trunc.txt").write_text("truncated\n")
    Image.new("RGB", (12, 12), (9, 9, 9)).save(demo / "tiny.png")
    (demo / "tiny.txt").write_text("too small\n")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(demo / "nocaption.png")
    exact = root / "exact"
    exact.mkdir()
    Image.new("RGB", (160, 96), (10, 200, 10)).save(exact / "fits.png")  # 80x48 bucket's shape
    Image.new("RGB", (90, 60), (10, 10, 200)).save(exact / "misfit.png")
    return {"demo": demo, "exact": exact}


def write_recipe(path: Path, model: Path, inputs: dict[str, Path], cache_url: str, **data_overrides) -> Path:
    data = {
        "cache_url": cache_url,
        "datasets": [
            {"id": "demo", "source": str(inputs["demo"]), "repeats": 3, "shuffle_captions": True,
             "keep_tokens": 2, "minimum_image_size": 32},
            {"id": "exact", "source": str(inputs["exact"]), "caption_strategy": "instance_prompt",
             "instance_prompt": "k4s4", "crop": False},
        ],
        "buckets": DEMO_BUCKETS,
        "shard_target_mb": 0.08,
        "cache_batch_size": 3,
        "cache_dtype": "fp32",
        "max_sequence_length": 32,
    }
    data.update(data_overrides)
    recipe = {"name": "cachetest", "model": {"pretrained": str(model)}, "data": data,
              "output": {"dir": str(path.parent / "out")}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cache(recipe: Path, nproc: int = 1, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`sd35dist cache` on `nproc` ranks, one CPU thread each, as torchrun gives several ranks: a CPU
    convolution's last bits depend on the thread count, and the cache's bytes are equal for equal threads."""
    env = {**(env or venv_env()), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "sd35dist", "cache", "--recipe", str(recipe)]
    else:
        cmd = [*WARM_TORCHRUN, "--standalone", f"--nproc-per-node={nproc}",
               "-m", "sd35dist", "cache", "--recipe", str(recipe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def samples_by_key(cache: Path) -> dict[str, dict]:
    """Every sample of a local cache: key → its tensors and record."""
    store = Store(str(cache))
    out = {}
    for entry in read_manifest(store).shards:
        tensors, records, bucket = decode_shard(store.read_bytes(entry.path))
        for i, record in enumerate(records):
            out[record.key] = {"record": record, "bucket": bucket, **{k: v[i] for k, v in tensors.items()}}
    return out


def cache_files(cache: Path) -> dict[str, bytes]:
    """What a reader can see: the manifest and every object it names, by relative path."""
    store = Store(str(cache))
    manifest = read_manifest(store)
    names = ["manifest.json", "report.json", manifest.empty_prompt.path, *(s.path for s in manifest.shards)]
    return {name: store.read_bytes(name) for name in names}


def run_cache_in_process(recipe: Path) -> str:
    """`sd35dist cache` on one rank through the CLI's entry in this process (a one-process group on an
    in-memory store, as a rank without torchrun has), on one CPU thread as run_cache's child: the same
    bytes without the child's imports. Its stdout."""
    from tests.cli_runs import one_torch_thread, sd35dist_in_process

    with one_torch_thread():
        code, stdout, stderr = sd35dist_in_process("cache", "--recipe", str(recipe))
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    return stdout
