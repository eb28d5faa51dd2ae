"""WebDataset and parquet datasets end to end, mixed with a folder by probability: `sd35dist cache`
on 1 and 2 ranks (the same bytes), a killed build resumed on another rank count, the stream's
weighted order and its exact resume, training 2 steps and resuming — locally and on the
S3-protocol server — and the one-line mistakes (not a tar, no such column, probability ≤ 0)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from sd35dist.config.recipe import load_recipe
from sd35dist.data.latent_stream import LatentStream
from sd35dist.data.manifest import read_manifest
from sd35dist.data.storage import Store
from sd35dist.demo.dataset import DEMO_BUCKETS, write_demo_dataset
from sd35dist.demo.formats import demo_samples, write_parquet, write_webdataset
from sd35dist.trainer.loop import stream_options
from tests.cache_runs import cache_files, run_cache, run_cache_in_process, samples_by_key
from tests.cli_runs import PROJECT, sd35dist_in_process, torch_extensions_dir, venv_env
from tests.train_runs import losses, train, train_in_one_group

WDS_PATTERN = "shard-{00000..00003}.tar"


def _png(size: tuple[int, int], colour=(30, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_format_inputs(root: Path) -> Path:
    """A folder, 3 tars + one of bad samples, and 2 parquet files + one of bad rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from webdataset import TarWriter

    write_demo_dataset(root / "photos", count=6, seed=23)
    write_webdataset(root / "laion", demo_samples(14, 21), per_shard=5)
    with TarWriter(str(root / "laion" / "shard-00003.tar")) as tar:
        tar.write({"__key__": "garbage", "png": b"not an image", "txt": "garbage"})
        tar.write({"__key__": "nocaption", "png": _png((64, 64)), "json": json.dumps({"width": 64})})
        tar.write({"__key__": "tiny", "png": _png((12, 12)), "txt": "too small"})
    write_parquet(root / "hf", demo_samples(10, 22), rows_per_group=3, groups_per_file=2)
    bad = {"key": ["undecodable", "nocaption", "liar", "tiny"],
           "image": [b"\x89PNG broken", _png((64, 64)), _png((80, 48)), _png((12, 12))],
           "caption": ["a caption", None, "its size columns lie", "too small"],
           "width": [64, 64, 64, 12], "height": [64, 64, 64, 12]}
    pq.write_table(pa.table(bad), root / "hf" / "part-00002.parquet", row_group_size=4)
    return root


def format_recipe(path: Path, model: Path, inputs: Path, cache_url: str, storage_options: dict | None = None,
                  **train) -> Path:
    datasets = [
        {"id": "photos", "source": str(inputs / "photos"), "minimum_image_size": 32},
        {"id": "laion", "source": f"{inputs}/laion/{WDS_PATTERN}", "format": "webdataset", "probability": 4.0},
        {"id": "hf", "source": str(inputs / "hf"), "format": "parquet", "width_column": "width",
         "height_column": "height", "repeats": 2, "shuffle_captions": True, "keep_tokens": 1},
    ]
    settings = {"train_batch_size": 2, "max_train_steps": 2, "learning_rate": 1e-3, "mixed_precision": "bf16",
                "checkpointing_steps": 2, "checkpoints_total_limit": 2, "caption_dropout_probability": 0.2, **train}
    parallel = {"strategy": settings.pop("strategy", "fsdp2")}
    recipe = {"name": "formats", "seed": 4, "model": {"pretrained": str(model)},
              "data": {"cache_url": cache_url, "storage_options": storage_options or {}, "datasets": datasets,
                       "buckets": DEMO_BUCKETS, "shard_target_mb": 0.02, "cache_batch_size": 3,
                       "cache_dtype": "fp32", "max_sequence_length": 32},
              "parallel": parallel, "train": settings, "logging": {"report_to": "none"},
              "output": {"dir": str(path.parent / "out")}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_format_inputs(tmp_path_factory.mktemp("format-inputs"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model, inputs):
    """The mixed cache built by 2 ranks (the one training reads), and by 1 rank to compare."""
    root = tmp_path_factory.mktemp("formats")
    two = format_recipe(root / "two" / "recipe.yaml", tiny_model, inputs, str(root / "two" / "cache"))
    proc = run_cache(two, nproc=2)
    return root / "two", proc


EXPECTED_SAMPLES = {"photos": 6, "laion": 14, "hf": 20}  # hf: repeats 2


@pytest.mark.dist
def test_formats_build_the_same_bytes_on_one_and_two_ranks_and_report_bad_samples(built, tmp_path, tiny_model, inputs):
    two, proc = built
    one = format_recipe(tmp_path / "recipe.yaml", tiny_model, inputs, str(tmp_path / "cache"))
    run_cache_in_process(one)
    assert cache_files(tmp_path / "cache") == cache_files(two / "cache"), "output depends on the input shard alone"
    manifest = read_manifest(Store(str(two / "cache")))
    assert {d: sum(b.values()) for d, b in manifest.samples_per_dataset().items()} == EXPECTED_SAMPLES
    assert all(s.path.startswith(f"shards/{s.dataset}/{s.bucket}/") for s in manifest.shards)
    samples = samples_by_key(two / "cache")
    laion = [s.caption for s in demo_samples(14, 21)]
    assert samples["laion/shard-00000.tar/img_000001#0"]["record"].caption == laion[1]
    assert samples["laion/shard-00002.tar/img_000013#0"]["record"].caption == laion[13]
    captions = [s.caption for s in demo_samples(10, 22)]
    assert samples["hf/part-00000.parquet/4#0"]["record"].caption == captions[4]
    assert samples["hf/part-00000.parquet/4#1"]["record"].caption.split(", ")[0] == captions[4].split(", ")[0]

    report = json.loads((two / "cache" / "report.json").read_text())
    reasons = {(r["dataset"], r["image"]): r["reason"] for r in report["rejected"]}
    assert set(reasons) == {("laion", "shard-00003.tar/garbage"), ("laion", "shard-00003.tar/nocaption"),
                            ("laion", "shard-00003.tar/tiny"), ("hf", "part-00002.parquet/0"),
                            ("hf", "part-00002.parquet/1"), ("hf", "part-00002.parquet/2"), ("hf", "part-00002.parquet/3")}
    assert "unreadable" in reasons[("laion", "shard-00003.tar/garbage")]
    assert "no caption (.txt, or .json with a caption)" in reasons[("laion", "shard-00003.tar/nocaption")]
    assert "too small" in reasons[("laion", "shard-00003.tar/tiny")]
    assert "unreadable" in reasons[("hf", "part-00002.parquet/0")]
    assert "no caption in column 'caption'" in reasons[("hf", "part-00002.parquet/1")]
    assert "the width/height columns say 64x64, the image is 80x48" in reasons[("hf", "part-00002.parquet/2")]
    assert "too small" in reasons[("hf", "part-00002.parquet/3")]
    assert "40 samples" in proc.stdout and "7 images rejected" in proc.stdout

    from sd35dist.jobs.cache import inspect as inspect_cache

    shown = io.StringIO()  # `sd35dist cache inspect`'s printer (tests/test_cache_build.py runs the command)
    assert inspect_cache(str(two / "cache"), {}, verify=False, out=shown) == 0
    shown = shown.getvalue()
    per_dataset = manifest.samples_per_dataset()
    for dataset, count in EXPECTED_SAMPLES.items():
        buckets = ", ".join(f"{b} {n}" for b, n in per_dataset[dataset].items())
        assert f"dataset {dataset}: {count} samples ({buckets})" in shown


def _epoch(streams: list[LatentStream], steps: int | None = None) -> list[list[tuple[str, str, list[str]]]]:
    """Batches of `steps` steps (default: the rest of the epoch) on every rank, in lockstep."""
    iterators = [s.iter_epoch() for s in streams]
    out = []
    while steps is None or len(out) < steps:
        try:
            step = [next(it) for it in iterators]
        except StopIteration:
            break
        out.append([(b.dataset, b.bucket, b.keys) for b in step])
    return out


@pytest.mark.dist
def test_the_stream_mixes_datasets_by_probability_and_resumes_exactly(built):
    two, _ = built
    recipe = load_recipe(two / "recipe.yaml")
    options = stream_options(recipe)
    assert options.dataset_probability == {"photos": 1.0, "laion": 4.0, "hf": 1.0}

    def streams(world: int) -> list[LatentStream]:
        return [LatentStream(str(two / "cache"), rank=r, world_size=world, options=options) for r in range(world)]

    straight = streams(2)
    batches = _epoch(straight)
    [mix] = straight[0].finished_epochs
    assert mix == straight[1].finished_epochs[0], "the realised mix counts all ranks: the same on each"
    assert mix.samples == EXPECTED_SAMPLES and mix.steps == len(batches)
    for step in batches:
        dataset = step[0][0]
        assert all(d == dataset for d, _, _ in step), "every rank reads the same dataset at a step"
        assert all(k.startswith(f"{dataset}/") for _, _, keys in step for k in keys), "a batch is one dataset's"
    # photos (6 samples in 3 buckets) cannot fill a step of 2 × 2 ranks: it comes in remainder steps only.
    assert set(mix.used_up_at) == {"laion", "hf"} and max(mix.used_up_at.values()) < mix.steps
    assert "laion 14 (35.0%, used up at step" in mix.describe()
    assert "photos 6 (15.0%, remainder steps only)" in mix.describe()

    cut = len(batches) // 2
    first = streams(2)
    assert _epoch(first, cut) == batches[:cut]
    state = first[0].state_dict()
    assert state == first[1].state_dict() and state["mix"]["samples"]
    same = streams(2)
    for s in same:
        s.load_state_dict(state)
    assert _epoch(same) == batches[cut:], "the same world size continues with exactly the same batches"
    assert same[0].finished_epochs == [mix], "the epoch's mix survives the resume"
    other = streams(3)
    for s in other:
        s.load_state_dict(state)
    rest = _epoch(other)
    seen = Counter(k for step in batches[:cut] + rest for _, _, keys in step for k in keys)
    assert seen == Counter(list(samples_by_key(two / "cache"))), "another world size: no duplicate, no gap"
    assert other[0].finished_epochs[0].samples == EXPECTED_SAMPLES
    for s in straight + first + same + other:
        s.close()


@pytest.mark.dist
def test_train_on_the_mixed_cache_two_steps_then_resume_to_the_end_of_the_epoch(built, tmp_path):
    """FSDP2 in fp32 here: an epoch straight, then 2 steps and `resume: latest` to the end of the epoch, the
    three runs in one torchrun (tests/trainings_check.py); the S3 test below trains ZeRO-2 in bf16 through
    `sd35dist train`, one torchrun a run."""
    two, _ = built
    recipe = yaml.safe_load((two / "recipe.yaml").read_text())

    def variant(name: str, out: Path, **train_keys) -> Path:
        train_keys = {"mixed_precision": "fp32", **train_keys}
        changed = {**recipe, "train": {**recipe["train"], **train_keys}, "output": {"dir": str(out)}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(changed, sort_keys=False))
        return path

    epoch = {"max_train_steps": None, "num_train_epochs": 1}
    output = train_in_one_group((variant("straight", tmp_path / "straight", **epoch), tmp_path / "run-straight"),
                                (variant("first", tmp_path / "out"), tmp_path / "run1"),
                                (variant("second", tmp_path / "out", **epoch), tmp_path / "run2"))
    expected = losses(tmp_path / "run-straight")
    assert sorted(losses(tmp_path / "run1")) == [1, 2]
    got = losses(tmp_path / "run2")
    assert min(got) == 3 and got == {s: v for s, v in expected.items() if s >= 3}, "the weighted stream resumes exactly"
    line = next(line for line in output[tmp_path / "run-straight"].splitlines() if "epoch 0 mix" in line)
    assert "laion 14 (35.0%" in line and "hf 20 (50.0%" in line and "photos 6 (15.0%" in line
    assert "resumed from" in output[tmp_path / "run2"] and "resumed from nothing" not in output[tmp_path / "run2"]
    assert line in output[tmp_path / "run2"].splitlines(), "the resumed run reports the same realised mix for the epoch"
    records = [json.loads(r) for r in (tmp_path / "run2" / "metrics-rank00000.jsonl").read_text().splitlines()]
    [mix] = [r["epoch_mix"] for r in records if "epoch_mix" in r]
    assert mix["samples"] == EXPECTED_SAMPLES


@pytest.mark.dist
def test_a_killed_build_resumes_on_another_rank_count_without_redoing_finished_input_shards(built, tmp_path,
                                                                                           tiny_model, inputs):
    """One rank builds the mixed cache and is killed after two input shards; two ranks finish it, leaving those
    shards' files alone: the same bytes as the fixture's straight build on two ranks."""
    two, _ = built
    recipe = format_recipe(tmp_path / "recipe.yaml", tiny_model, inputs, str(tmp_path / "resumed"))
    every_input_shard = len(list((two / "cache" / "progress").glob("*.json")))
    proc = subprocess.Popen([sys.executable, "-m", "sd35dist", "cache", "--recipe", str(recipe)],
                            cwd=PROJECT, env={**venv_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    progress = tmp_path / "resumed" / "progress"

    def complete() -> list[dict]:
        out = []
        for path in sorted(progress.glob("*.json")) if progress.exists() else []:
            try:
                journal = json.loads(path.read_text())
            except ValueError:
                continue
            if journal.get("complete"):
                out.append(journal)
        return out

    deadline = time.monotonic() + 180
    while proc.poll() is None:
        if len(complete()) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    done = complete()
    assert 2 <= len(done) < every_input_shard and not (tmp_path / "resumed" / "manifest.json").exists()
    finished = {path: os.stat(tmp_path / "resumed" / path) for journal in done for path in journal["shards"]}
    assert finished, "the finished input shards wrote output shards"
    run_cache(recipe, nproc=2)
    for path, before in finished.items():
        after = os.stat(tmp_path / "resumed" / path)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), f"{path} was written again"
    assert cache_files(tmp_path / "resumed") == cache_files(two / "cache")


@pytest.mark.process
def test_bad_input_is_one_line_naming_the_dataset_and_key_and_exit_2(tmp_path, tiny_model, inputs):
    """The first mistake through `sd35dist cache` as typed (a child process), the others through the CLI's
    entry in this process: the same job code, each run a one-rank group of its own."""
    def cache(dataset: dict, child: bool = False) -> tuple[int, str]:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump({"name": "bad", "model": {"pretrained": str(tiny_model)},
                                        "data": {"cache_url": str(tmp_path / "cache"), "datasets": [dataset]},
                                        "output": {"dir": str(tmp_path / "out")}}))
        if not child:
            status, _, stderr = sd35dist_in_process("cache", "--recipe", str(path))
            return status, stderr
        proc = subprocess.run([sys.executable, "-m", "sd35dist", "cache", "--recipe", str(path)],
                              capture_output=True, text=True, cwd=PROJECT, env={**venv_env(), "OMP_NUM_THREADS": "1"})
        return proc.returncode, proc.stderr

    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "a.tar").write_bytes((inputs / "laion" / "shard-00000.tar").read_bytes())
    (tmp_path / "tars" / "b.tar").write_bytes(b"<html>403 Forbidden</html>" * 30)
    not_tar = cache({"id": "laion", "source": str(tmp_path / "tars"), "format": "webdataset"}, child=True)
    no_column = cache({"id": "hf", "source": str(inputs / "hf"), "format": "parquet", "caption_column": "text"})
    weightless = cache({"id": "photos", "source": str(inputs / "photos"), "probability": 0})
    expected = [
        (not_tar, f"error: recipe.yaml: data.datasets[0].source: dataset laion: {tmp_path}/tars/b.tar is not a readable tar file"),
        (no_column, f"error: recipe.yaml: data.datasets[0].caption_column: dataset hf: {inputs}/hf/part-00000.parquet "
                    "has no column 'text' (its columns: key, image, caption, width, height)"),
        (weightless, "error: recipe.yaml: data.datasets.0.probability: dataset photos: must be a finite weight > 0"),
    ]
    for (status, stderr), start in expected:
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert status == 2 and len(lines) == 1 and lines[0].startswith(start), stderr[-2000:]
        assert "Traceback" not in stderr
    assert not (tmp_path / "cache" / "manifest.json").exists()


@pytest.mark.s3
@pytest.mark.dist
def test_formats_on_the_s3_protocol_server_cache_train_zero2_and_resume(s3_server, built, inputs, tiny_model, tmp_path,
                                                                       monkeypatch):
    """Sources and cache on S3: the same shards as the local build; ZeRO-2 in bf16 trains from it and resumes."""
    two, _ = built
    client = s3_server.client()
    client.create_bucket(Bucket="formats")
    for path in sorted(p for p in inputs.rglob("*") if p.is_file()):
        client.put_object(Bucket="formats", Key=f"inputs/{path.relative_to(inputs).as_posix()}", Body=path.read_bytes())
    recipe = format_recipe(tmp_path / "recipe.yaml", tiny_model, inputs, "s3://formats/cache", s3_server.storage_options,
                           strategy="zero2")
    text = recipe.read_text().replace(str(inputs), "s3://formats/inputs")
    recipe.write_text(text)
    assert "s3://formats/inputs/laion/shard-{00000..00003}.tar" in text
    env = venv_env(**s3_server.env)
    run_cache(recipe, nproc=2, env=env)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    store = Store("s3://formats/cache", s3_server.storage_options)
    local = cache_files(two / "cache")
    for name in [n for n in local if n.startswith("shards/")] + ["report.json"]:
        assert store.read_bytes(name) == local[name], name
    assert read_manifest(store).total_samples == sum(EXPECTED_SAMPLES.values())

    deepspeed = {**env, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": torch_extensions_dir()}
    train(recipe, tmp_path / "run1", env=deepspeed)
    assert sorted(losses(tmp_path / "run1")) == [1, 2]
    second = yaml.safe_load(recipe.read_text())
    second["train"]["max_train_steps"] = 4
    (tmp_path / "second.yaml").write_text(yaml.safe_dump(second, sort_keys=False))
    proc = train(tmp_path / "second.yaml", tmp_path / "run2", env=deepspeed)
    assert "resumed from" in proc.stdout + proc.stderr
    got = losses(tmp_path / "run2")
    assert sorted(got) == [3, 4] and all(v == v and v > 0 for v in got.values())


@pytest.mark.dist
def test_the_scale_benchmark_runs_at_toy_size_and_deletes_its_data(tmp_path, tiny_model):
    """benchmarks/dataset_formats.py (docs/benchmarks.md runs it at 10k and 100k images on 2 ranks) on 16
    images and one rank: the script's code whatever the rank count (its torchrun takes --nproc-per-node)."""
    proc = subprocess.run([sys.executable, "benchmarks/dataset_formats.py", "--images", "16", "--per-shard", "8",
                           "--formats", "webdataset,parquet", "--ranks", "1", "--model", str(tiny_model),
                           "--root", str(tmp_path)],
                          capture_output=True, text=True, cwd=PROJECT, env=venv_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = proc.stdout.split("| images | format |", 1)[1]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| 16 |")]
    assert [r[1].strip() for r in rows] == ["webdataset", "parquet"]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 and r[6].strip().endswith("MiB") for r in rows), rows
    assert list(tmp_path.iterdir()) == [], "the generated images and caches are deleted"
