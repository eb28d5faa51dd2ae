"""`sd35dist cache` end to end on the tiny SD3: real processes, real files, real torchrun. The module's
build, a killed build, one refusal and one inspect run as child processes, as typed; other builds and
inspections go through the CLI's entry in this process (the same job code, a one-rank group of its own)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sd35dist.data.manifest import read_manifest
from sd35dist.data.storage import Store
from sd35dist.demo.dataset import DEMO_BUCKETS, write_demo_dataset
from tests.cache_runs import (
    cache_files,
    run_cache,
    run_cache_in_process,
    samples_by_key,
    write_inputs,
    write_recipe,
)
from tests.cli_runs import PROJECT, sd35dist_in_process, venv_env

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("cache-build")
    inputs = write_inputs(root / "images")
    recipe = write_recipe(root / "recipe.yaml", tiny_model, inputs, str(root / "cache"))
    proc = run_cache(recipe)
    return root, inputs, recipe, proc


def test_bad_inputs_are_skipped_and_reported(built):
    root, _, _, proc = built
    report = json.loads((root / "cache" / "report.json").read_text())
    reasons = {r["image"]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"garbage.png", "trunc.png", "tiny.png", "nocaption.png", "misfit.png"}
    assert "unreadable" in reasons["garbage.png"]
    assert "truncated" in reasons["trunc.png"]
    assert "too small" in reasons["tiny.png"]
    assert "no caption file" in reasons["nocaption.png"]
    assert "crop is false" in reasons["misfit.png"]
    manifest = read_manifest(Store(str(root / "cache")))
    assert manifest.total_samples == 8 * 3 + 1  # 8 good demo images × 3 repeats + the exact-fit image
    assert manifest.rejected == 5
    assert "25 samples" in proc.stdout and "5 images rejected" in proc.stdout


def test_embeddings_equal_the_pipelines_encode_prompt(built, tiny_model):
    from diffusers import StableDiffusion3Pipeline

    root, _, _, _ = built
    samples = samples_by_key(root / "cache")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model, local_files_only=True)
    chosen = sorted(samples)[:4] + [k for k in samples if k.startswith("exact/")]
    captions = [samples[k]["record"].caption for k in chosen]
    with torch.no_grad():  # the pipeline encodes under no_grad in __call__ too
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=32)
        empty_embeds, _, empty_pooled, _ = pipe.encode_prompt([""], None, None, do_classifier_free_guidance=False,
                                                              max_sequence_length=32)
    # Same computation; the cache encoded other batches (of cache_batch_size), and a matmul's
    # last bits depend on batch shape. Exact equality for equal batches: tests/test_tiny_sd3.py.
    for i, key in enumerate(chosen):
        torch.testing.assert_close(samples[key]["prompt_embeds"], embeds[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(samples[key]["pooled_prompt_embeds"], pooled[i], rtol=1e-5, atol=1e-6)
    from safetensors.torch import load_file

    empty = load_file(root / "cache" / "empty_prompt.safetensors")
    assert torch.equal(empty["prompt_embeds"], empty_embeds)
    assert torch.equal(empty["pooled_prompt_embeds"], empty_pooled)


def test_latents_are_the_vaes_distribution_of_the_cropped_image(built, tiny_model):
    from diffusers import AutoencoderKL

    from sd35dist.config.recipe import load_recipe
    from sd35dist.data.image_source import SourceImage, prepare_image

    root, inputs, recipe_path, _ = built
    sample = samples_by_key(root / "cache")["demo/img_0001.png#0"]
    dataset = load_recipe(recipe_path).data.datasets[0]
    image = SourceImage("demo", "img_0001.png", str(inputs["demo"] / "img_0001.png"), str(inputs["demo"] / "img_0001.txt"))
    prepared = prepare_image(image, dataset, tuple(tuple(b) for b in DEMO_BUCKETS), {}, 0)
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", local_files_only=True)
    with torch.no_grad():
        dist = vae.encode(prepared.pixels[None]).latent_dist
    assert sample["bucket"] == "80x48" and tuple(sample["original_size"].tolist()) == (128, 77)
    # Batched and single-image convolutions may round differently in the last bits.
    torch.testing.assert_close(sample["latent_mean"], dist.mean[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sample["latent_std"], dist.std[0], rtol=1e-5, atol=1e-6)


def test_repeats_get_shuffled_caption_variants(built):
    root, inputs, _, _ = built
    samples = samples_by_key(root / "cache")
    original = (inputs["demo"] / "img_0002.txt").read_text().strip()
    variants = [samples[f"demo/img_0002.png#{r}"]["record"].caption for r in range(3)]
    assert variants[0] == original
    tokens = [t.strip() for t in original.split(",")]
    for variant in variants[1:]:
        got = [t.strip() for t in variant.split(",")]
        assert got[:2] == tokens[:2] and sorted(got) == sorted(tokens)
    assert len(set(variants)) > 1
    assert samples["exact/fits.png#0"]["record"].caption == "k4s4"


def test_a_cache_of_another_dataset_list_is_never_overwritten(built, tmp_path, tiny_model):
    """`sd35dist cache` into a cache_url that holds another dataset list's cache is refused in one line
    naming what differs, before anything is written; the same list builds (resumes) into it as before."""
    root, inputs, _, _ = built
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache)
    before = {p: p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}
    others = {
        "shuffle_seed": write_recipe(tmp_path / "seed.yaml", tiny_model, inputs, str(cache), shuffle_seed=9),
        "datasets (2 entries, now 1)": write_recipe(tmp_path / "fewer.yaml", tiny_model, inputs, str(cache), datasets=[
            {"id": "exact", "source": str(inputs["exact"]), "caption_strategy": "instance_prompt",
             "instance_prompt": "k4s4", "crop": False}]),
    }
    for child, (differs, recipe) in zip((True, False), others.items()):
        if child:  # as typed
            proc = subprocess.run([sys.executable, "-m", "sd35dist", "cache", "--recipe", str(recipe)],
                                  capture_output=True, text=True, cwd=PROJECT, env=venv_env(), timeout=300)
            status, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        else:  # the CLI's entry in this process: the same job code
            status, stdout, stderr = sd35dist_in_process("cache", "--recipe", str(recipe))
        assert status == 2 and stdout == "", stderr[-2000:]
        assert stderr.strip().splitlines() == [
            f"error: {recipe.name}: data.cache_url: {cache}: it was built from another dataset list (differs in "
            f"{differs}); nothing was written: choose another data.cache_url, or delete that cache to rebuild it there"]
    assert {p: p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()} == before
    run_cache_in_process(write_recipe(tmp_path / "same.yaml", tiny_model, inputs, str(cache)))
    assert cache_files(cache) == cache_files(root / "cache")


def test_a_rebuild_on_two_ranks_is_byte_identical_to_the_one_rank_build(built, tmp_path, tiny_model):
    """A second build of the same recipe gives the same bytes, also on another rank count."""
    root, inputs, _, _ = built
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, inputs, str(tmp_path / "cache"))
    run_cache(recipe, nproc=2)
    assert cache_files(tmp_path / "cache") == cache_files(root / "cache"), "shards depend on their input shard only"


def test_resume_after_kill_gives_identical_shards(tmp_path, tiny_model):
    images = tmp_path / "images"
    write_demo_dataset(images / "demo", count=30, seed=5)
    inputs = {"demo": images / "demo", "exact": images / "exact"}
    (images / "exact").mkdir()
    kwargs = {"shard_target_mb": 0.001, "cache_batch_size": 1}
    straight = write_recipe(tmp_path / "straight.yaml", tiny_model, inputs, str(tmp_path / "straight"), **kwargs)
    run_cache_in_process(straight)

    resumed = write_recipe(tmp_path / "resumed.yaml", tiny_model, inputs, str(tmp_path / "resumed"), **kwargs)
    proc = subprocess.Popen([sys.executable, "-m", "sd35dist", "cache", "--recipe", str(resumed)],
                            cwd=PROJECT, env=venv_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    journal = tmp_path / "resumed" / "progress" / "demo-000000.json"  # the folder's first (only) chunk
    deadline = time.monotonic() + 120
    while proc.poll() is None:
        if journal.exists() and len(json.loads(journal.read_text() or "{}").get("shards", {})) >= 3:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (tmp_path / "resumed" / "manifest.json").exists(), "no manifest before the build completes"
    run_cache_in_process(resumed)
    assert cache_files(tmp_path / "resumed") == cache_files(tmp_path / "straight")


def test_inspect_reports_contents_and_corruption(built, tmp_path):
    root, _, _, _ = built
    cache = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(root / "cache"), str(cache)], check=True)
    ok = subprocess.run([sys.executable, "-m", "sd35dist", "cache", "inspect", str(cache), "--verify"],
                        capture_output=True, text=True, cwd=PROJECT)
    assert ok.returncode == 0, ok.stderr
    assert "25 samples" in ok.stdout and "bucket 80x48" in ok.stdout and "problems: 0" in ok.stdout
    shard = read_manifest(Store(str(cache))).shards[0].path
    blob = bytearray((cache / shard).read_bytes())
    blob[-1] ^= 0xFF
    (cache / shard).write_bytes(bytes(blob))
    from sd35dist.jobs.cache import inspect as inspect_cache

    # The command's printer in this process (its `out` is bound to the stdout of import time: passed here).
    shown = io.StringIO()
    assert inspect_cache(str(cache), {}, verify=True, out=shown) == 1
    assert f"{shard}: sha256/size mismatch" in shown.getvalue()
    status, _, stderr = sd35dist_in_process("cache", "inspect", str(tmp_path / "nothing"))
    assert status == 2 and "no manifest" in stderr


def write_viewer_pairs(directory: Path) -> None:
    """Pairs of files a viewer shows identically (one plain 8-bit RGB), plus two misfits.

    rotated.png is upright.png stored turned a quarter with EXIF Orientation 6; grey16.png is
    grey8.png at 16 bits; cutout.png is flat.png's subject on a transparent ground.
    """
    directory.mkdir(parents=True)
    upright = Image.new("RGB", (80, 120), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 80, 60))
    upright.save(directory / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(directory / "rotated.png", exif=exif)
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(directory / "grey16.png")
    Image.fromarray(np.rint(ramp / 257.0).astype(np.uint8)).convert("RGB").save(directory / "grey8.png")
    cutout = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    cutout.paste((230, 200, 20, 255), (16, 16, 80, 80))
    cutout.save(directory / "cutout.png")
    flat = Image.new("RGB", (96, 96), (0, 128, 0))
    flat.paste((230, 200, 20), (16, 16, 80, 80))
    flat.save(directory / "flat.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(directory / "icon.png")
    Image.new("RGB", (1000, 50), (40, 90, 200)).save(directory / "panorama.png")


def test_the_cache_holds_images_as_a_viewer_shows_them(tmp_path, tiny_model):
    write_viewer_pairs(tmp_path / "photos")
    data = {"cache_url": str(tmp_path / "cache"), "buckets": DEMO_BUCKETS, "cache_dtype": "fp32",
            "max_sequence_length": 32, "cache_batch_size": 1,
            "datasets": [{"id": "photos", "source": str(tmp_path / "photos"), "caption_strategy": "instance_prompt",
                          "instance_prompt": "k4s4", "alpha_background": [0, 128, 0]}]}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "viewer", "model": {"pretrained": str(tiny_model)}, "data": data,
                                      "output": {"dir": str(tmp_path / "out")}}))
    run_cache_in_process(recipe)
    samples = samples_by_key(tmp_path / "cache")
    for shown, plain in (("rotated", "upright"), ("grey16", "grey8"), ("cutout", "flat")):
        a, b = samples[f"photos/{shown}.png#0"], samples[f"photos/{plain}.png#0"]
        assert a["bucket"] == b["bucket"], shown
        assert torch.equal(a["original_size"], b["original_size"]), shown
        torch.testing.assert_close(a["latent_mean"], b["latent_mean"], rtol=1e-5, atol=1e-6, msg=shown)
    assert samples["photos/rotated.png#0"]["bucket"] == "48x80"

    report = json.loads((tmp_path / "cache" / "report.json").read_text())
    reasons = {r["image"]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"icon.png", "panorama.png"}
    assert "enlarged 8x, more than max_upscale 2" in reasons["icon.png"]
    assert "loses 92% of its area, more than max_crop_fraction 0.5" in reasons["panorama.png"]
    accepted = {a["image"]: a for a in report["accepted"]}
    assert report["accepted_count"] == len(accepted) == 6
    assert accepted["rotated.png"] == {"dataset": "photos", "image": "rotated.png", "size": [80, 120],
                                       "bucket": "48x80", "upscale": 0.6667, "cropped_fraction": 0.1111}
    assert accepted["cutout.png"]["upscale"] == 0.6667 and accepted["grey16.png"]["upscale"] == 1.0
    assert report["max_upscale"] == 1.0 and report["upscaled_count"] == 0
