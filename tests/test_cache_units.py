"""The latent-cache builder's pure core: buckets, captions, shard bytes, manifest, store, planning."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from sd35dist.data.buckets import SD35_BUCKETS, FitPlan, ImageRejected, bucket_name, nearest_bucket, plan_fit
from sd35dist.data.cache_builder import WorkItem, build_settings, input_fingerprint, plan_fingerprint, plan_shards
from sd35dist.data.captions import CaptionMissing, caption_variants, resolve_caption, shuffle_tokens
from sd35dist.data.image_source import SourceImage
from sd35dist.data.input_shards import InputShard, assign
from sd35dist.data.shard_format import (
    CachedSample,
    SampleRecord,
    bytes_per_sample,
    decode_shard,
    encode_shard,
    samples_per_shard,
    shard_metadata,
)

pytestmark = pytest.mark.unit

SIDES = range(17, 3000, 37)


def _log_distance(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    return abs(math.log(size[0] / size[1]) - math.log(bucket[0] / bucket[1]))


# ---- buckets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((1024, 1024), (1024, 1024)),
        ((512, 512), (1024, 1024)),
        ((4000, 4000), (1024, 1024)),
        ((1920, 1080), (1344, 768)),
        ((1080, 1920), (768, 1344)),
        ((4000, 1000), (1472, 704)),
        ((1000, 4000), (768, 1344)),  # no 704x1472 bucket: the tallest one is the nearest
        ((2432, 1664), (1216, 832)),
        ((1152, 896), (1152, 896)),
    ],
)
def test_nearest_bucket_on_the_sd35_buckets(size, bucket):
    assert nearest_bucket(size, SD35_BUCKETS) == bucket


def test_nearest_bucket_tie_goes_to_the_earlier_bucket():
    assert nearest_bucket((500, 500), ((2, 1), (1, 2))) == (2, 1)
    assert nearest_bucket((500, 500), ((1, 2), (2, 1))) == (1, 2)
    assert nearest_bucket((300, 300), ((1024, 1024), (512, 512))) == (1024, 1024)


def test_nearest_bucket_is_nearest_and_monotone_in_aspect_ratio():
    sizes = sorted(((w, h) for w in SIDES for h in SIDES), key=lambda s: s[0] / s[1])
    order = {b: math.log(b[0] / b[1]) for b in SD35_BUCKETS}
    previous = -math.inf
    for size in sizes:
        chosen = nearest_bucket(size, SD35_BUCKETS)
        assert chosen in SD35_BUCKETS
        assert all(_log_distance(size, chosen) <= _log_distance(size, b) + 1e-12 for b in SD35_BUCKETS), size
        # A wider image never lands in a narrower bucket.
        assert order[chosen] >= previous, size
        previous = order[chosen]


def _check_fit(plan: FitPlan, size: tuple[int, int]) -> None:
    width, height = size
    bw, bh = plan.bucket
    rw, rh = plan.resized
    left, top, right, bottom = plan.crop_box
    assert plan.original_size == size
    assert (right - left, bottom - top) == plan.bucket, size
    assert 0 <= left and 0 <= top and right <= rw and bottom <= rh, size
    assert rw >= bw and rh >= bh, size
    # One side fits the bucket exactly; the other follows the aspect ratio up to one pixel of rounding.
    assert rw == bw or rh == bh, size
    scale = max(bw / width, bh / height)
    assert abs(rw - width * scale) < 1 and abs(rh - height * scale) < 1, size
    # Centered: the margins on either side differ by at most one pixel.
    assert abs(left - (rw - right)) <= 1 and abs(top - (rh - bottom)) <= 1, size
    assert plan.crop_top_left == (top, left)


def test_plan_fit_invariants_over_many_sizes():
    for width in SIDES:
        for height in SIDES:
            plan = plan_fit((width, height), SD35_BUCKETS)
            assert plan.bucket == nearest_bucket((width, height), SD35_BUCKETS)
            _check_fit(plan, (width, height))


@pytest.mark.parametrize("size", [(1920, 1080), (1080, 1920), (1000, 1000), (4000, 1000), (1025, 1023), (3, 7)])
def test_plan_fit_examples(size):
    _check_fit(plan_fit(size, SD35_BUCKETS), size)


def test_plan_fit_16_9_is_center_cropped():
    plan = plan_fit((1920, 1080), SD35_BUCKETS)
    assert plan.bucket == (1344, 768)
    assert plan.resized == (1366, 768)
    assert plan.crop_box == (11, 0, 1355, 768)
    assert plan.crop_top_left == (0, 11)


def test_plan_fit_exact_bucket_shape_is_not_cropped():
    plan = plan_fit((1024, 1024), SD35_BUCKETS)
    assert plan.resized == (1024, 1024)
    assert plan.crop_box == (0, 0, 1024, 1024)


def test_no_crop_accepts_an_image_of_the_bucket_shape():
    plan = plan_fit((2432, 1664), SD35_BUCKETS, crop=False)
    assert plan.bucket == (1216, 832)
    assert plan.resized == (1216, 832)
    assert plan.crop_box == (0, 0, 1216, 832)


def test_no_crop_accepts_one_pixel_of_rounding():
    plan = plan_fit((1217, 832), SD35_BUCKETS, crop=False)
    assert plan.bucket == (1216, 832)


def test_no_crop_rejects_a_mismatching_shape_naming_the_bucket():
    with pytest.raises(ImageRejected, match="1344x768") as info:
        plan_fit((1920, 1080), SD35_BUCKETS, crop=False)
    assert "1920x1080" in str(info.value)
    assert "crop" in str(info.value)


def test_no_crop_over_many_sizes_accepts_only_bucket_shapes():
    for width in SIDES:
        for height in SIDES:
            bucket = nearest_bucket((width, height), SD35_BUCKETS)
            mismatch = abs((width / height) / (bucket[0] / bucket[1]) - 1)
            if mismatch <= 0.005:
                _check_fit(plan_fit((width, height), SD35_BUCKETS, crop=False), (width, height))
            elif mismatch > 0.02:
                with pytest.raises(ImageRejected, match=bucket_name(bucket)):
                    plan_fit((width, height), SD35_BUCKETS, crop=False)


def test_minimum_image_size_rejects_small_images():
    with pytest.raises(ImageRejected, match="minimum_image_size 512"):
        plan_fit((2000, 511), SD35_BUCKETS, minimum_image_size=512)
    with pytest.raises(ImageRejected, match="too small"):
        plan_fit((300, 300), SD35_BUCKETS, minimum_image_size=512)
    assert plan_fit((512, 512), SD35_BUCKETS, minimum_image_size=512).bucket == (1024, 1024)
    for side in SIDES:
        if side < 1000:
            with pytest.raises(ImageRejected):
                plan_fit((side, 2999), SD35_BUCKETS, minimum_image_size=1000)
        else:
            plan_fit((side, 2999), SD35_BUCKETS, minimum_image_size=1000)


@pytest.mark.parametrize("size", [(0, 100), (100, 0), (-5, 100)])
def test_empty_images_are_rejected(size):
    with pytest.raises(ImageRejected, match="empty"):
        plan_fit(size, SD35_BUCKETS)


# ---- captions --------------------------------------------------------------------------------


def test_textfile_caption_is_the_first_non_empty_line():
    text = "\n   \n  a photo of a cat  \nsecond caption\n"
    assert resolve_caption("textfile", stem="cat", textfile_content=text, instance_prompt="ignored") == "a photo of a cat"


def test_textfile_caption_missing_or_empty():
    with pytest.raises(CaptionMissing, match="cat.txt"):
        resolve_caption("textfile", stem="cat", textfile_content=None, instance_prompt=None)
    with pytest.raises(CaptionMissing, match="cat.txt is empty"):
        resolve_caption("textfile", stem="cat", textfile_content=" \n\t\n", instance_prompt=None)


@pytest.mark.parametrize(
    ("stem", "caption"),
    [
        ("a_red-car (2)", "a red car"),
        ("a_red-car", "a red car"),
        ("portrait__of--a   man", "portrait of a man"),
        ("photo (final)", "photo (final)"),
        ("cat(12)", "cat"),
    ],
)
def test_filename_caption(stem, caption):
    assert resolve_caption("filename", stem=stem, textfile_content="from file", instance_prompt=None) == caption


def test_instance_prompt_caption():
    got = resolve_caption("instance_prompt", stem="x", textfile_content="from file", instance_prompt=" sks dog ")
    assert got == "sks dog"
    for missing in (None, ""):
        with pytest.raises(CaptionMissing, match="instance_prompt"):
            resolve_caption("instance_prompt", stem="x", textfile_content="from file", instance_prompt=missing)


LONG_CAPTION = "sks woman, portrait, red hair, smiling, outdoors, bokeh, golden hour, film grain, 35mm, freckles"
TOKENS = [t.strip() for t in LONG_CAPTION.split(",")]


@pytest.mark.parametrize("keep_tokens", [0, 1, 2, 5, 10, 20])
def test_shuffle_keeps_the_head_and_permutes_the_rest(keep_tokens):
    for seed in range(5):
        for repeat in range(1, 6):
            out = shuffle_tokens(LONG_CAPTION, keep_tokens=keep_tokens, seed=seed, key="ds/a.png", repeat=repeat)
            got = out.split(", ")
            assert got[:keep_tokens] == TOKENS[:keep_tokens]
            assert sorted(got[keep_tokens:]) == sorted(TOKENS[keep_tokens:])


def test_shuffle_is_deterministic_and_varies():
    def shuffled(seed: int, key: str, repeat: int) -> str:
        return shuffle_tokens(LONG_CAPTION, keep_tokens=1, seed=seed, key=key, repeat=repeat)

    assert shuffled(7, "ds/a.png", 3) == shuffled(7, "ds/a.png", 3)
    assert len({shuffled(7, "ds/a.png", r) for r in range(1, 8)}) > 1
    assert len({shuffled(s, "ds/a.png", 3) for s in range(8)}) > 1
    assert len({shuffled(7, f"ds/{i}.png", 3) for i in range(8)}) > 1
    # Actually shuffled, not just re-joined.
    assert any(shuffled(7, "ds/a.png", r) != ", ".join(TOKENS) for r in range(1, 8))


def test_caption_variants_original_first_then_shuffled():
    variants = caption_variants(LONG_CAPTION, repeats=6, shuffle=True, keep_tokens=2, seed=3, key="ds/a.png")
    assert len(variants) == 6
    assert variants[0] == LONG_CAPTION
    for repeat, variant in enumerate(variants[1:], start=1):
        assert variant == shuffle_tokens(LONG_CAPTION, keep_tokens=2, seed=3, key="ds/a.png", repeat=repeat)
    assert len(set(variants)) > 1
    again = caption_variants(LONG_CAPTION, repeats=6, shuffle=True, keep_tokens=2, seed=3, key="ds/a.png")
    assert again == variants


def test_caption_variants_without_shuffle_are_identical():
    caption = "a,b ,  c"  # kept exactly as written
    assert caption_variants(caption, repeats=4, shuffle=False, keep_tokens=0, seed=1, key="k") == [caption] * 4
    assert caption_variants(caption, repeats=1, shuffle=True, keep_tokens=0, seed=1, key="k") == [caption]


# ---- shard format ----------------------------------------------------------------------------


LATENT = (16, 4, 6)
TEXT = (9, 8)
POOLED = 5


def _samples(n: int, seed: int = 0) -> list[CachedSample]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        record = SampleRecord(f"ds/img{i}.png#{i % 2}", "ds", f"img{i}.png", i % 2, f"caption {i}, é ✓")
        out.append(
            CachedSample(
                record=record,
                latent_mean=torch.randn(LATENT, generator=gen),
                latent_std=torch.rand(LATENT, generator=gen),
                prompt_embeds=torch.randn(TEXT, generator=gen),
                pooled_prompt_embeds=torch.randn(POOLED, generator=gen),
                original_size=(1920 + i, 1080),
                crop_top_left=(0, 11 + i),
            )
        )
    return out


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_shard_round_trip(dtype, torch_dtype):
    samples = _samples(3)
    blob = encode_shard(samples, "1344x768", dtype)
    tensors, records, bucket = decode_shard(blob)
    assert bucket == "1344x768"
    assert records == [s.record for s in samples]
    for key in ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds"):
        assert tensors[key].dtype == torch_dtype
        expected = torch.stack([getattr(s, key) for s in samples]).to(torch_dtype)
        assert torch.equal(tensors[key], expected), key
    assert tensors["original_size"].tolist() == [[1920, 1080], [1921, 1080], [1922, 1080]]
    assert tensors["crop_top_left"].tolist() == [[0, 11], [0, 12], [0, 13]]
    assert tensors["original_size"].dtype == torch.int32


def test_shard_bytes_are_deterministic():
    assert encode_shard(_samples(4), "1024x1024", "bf16") == encode_shard(_samples(4), "1024x1024", "bf16")
    assert encode_shard(_samples(4), "1024x1024", "bf16") != encode_shard(_samples(4, seed=1), "1024x1024", "bf16")


def test_shard_metadata_reads_only_the_header():
    blob = encode_shard(_samples(2), "832x1216", "fp32")
    header_len = int.from_bytes(blob[:8], "little")
    meta = shard_metadata(blob[: 8 + header_len])  # no tensor bytes at all
    assert meta["bucket"] == "832x1216"
    assert meta["dtype"] == "fp32"
    assert meta["format"] == "sd35dist-shard/1"
    assert [r["key"] for r in json.loads(meta["samples"])] == ["ds/img0.png#0", "ds/img1.png#1"]


def test_decode_refuses_foreign_safetensors_and_empty_shards():
    from safetensors.torch import save

    with pytest.raises(ValueError, match="not an sd35dist shard"):
        decode_shard(save({"x": torch.zeros(2)}))
    with pytest.raises(ValueError, match="at least one sample"):
        encode_shard([], "1024x1024", "bf16")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("n", [1, 5])
def test_bytes_per_sample_matches_encoded_tensors(dtype, n):
    tensors, _, _ = decode_shard(encode_shard(_samples(n), "1024x1024", dtype))
    real = sum(t.nbytes for t in tensors.values())
    assert real == n * bytes_per_sample(LATENT, TEXT, POOLED, dtype)
    # The whole file is tensors plus a header, so it is never smaller than the estimate.
    assert len(encode_shard(_samples(n), "1024x1024", dtype)) > real


def test_samples_per_shard():
    assert samples_per_shard(100, 1000) == 1
    assert samples_per_shard(0, 1000) == 1
    assert samples_per_shard(1000, 1000) == 1
    assert samples_per_shard(2**20, 1000) == 1048
    for target in (1, 999, 10_000, 64 * 2**20):
        for per in (1, 7, 1000, 3 * 2**20):
            n = samples_per_shard(target, per)
            assert n >= 1
            assert n == 1 or n * per <= target < (n + 1) * per


# ---- cache builder planning ------------------------------------------------------------------


def _images(n: int, dataset: str = "ds") -> list[SourceImage]:
    return [SourceImage(dataset, f"img{i:03d}.png", f"/data/{dataset}/img{i:03d}.png", None) for i in range(n)]


def _shard(index: int = 0, dataset: str = "ds", url: str = "/data/ds/00000.tar") -> InputShard:
    return InputShard(dataset, index, url, url.rsplit("/", 1)[-1])


@pytest.mark.parametrize("n", [0, 1, 3, 12, 13])
def test_assign_partitions_the_input_shards(n):
    shards = [_shard(i) for i in range(n)]
    for world in range(1, 6):
        parts = [assign(shards, rank, world) for rank in range(world)]
        flat = [s for part in parts for s in part]
        assert sorted(flat, key=lambda s: s.index) == shards
        assert len(flat) == len(set(flat)) == n
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
        for rank, part in enumerate(parts):
            assert part == assign(shards, rank, world)  # deterministic


def _bucketed(counts: dict[tuple[int, int], int], repeats: int = 2) -> dict[tuple[int, int], list[WorkItem]]:
    out = {}
    for bucket, n in counts.items():
        images = _images(n, dataset=bucket_name(bucket))
        out[bucket] = [WorkItem(img, r) for img in images for r in range(repeats)]
    return out


PATH_RE = re.compile(r"^shards/([A-Za-z0-9._-]+)/(\d+x\d+)/(\d{6})-(\d{4})\.safetensors$")


def test_plan_shards_cuts_fixed_slices_named_by_input_shard_not_by_rank():
    bucketed = _bucketed({(1344, 768): 7, (1024, 1024): 20, (832, 1216): 1})
    sizes = {(1024, 1024): 6, (1344, 768): 4, (832, 1216): 3}
    plans = plan_shards(bucketed, lambda b: sizes[b], _shard(12, "laion"))
    for bucket, items in bucketed.items():
        mine = [p for p in plans if p.bucket == bucket_name(bucket)]
        assert [it for p in mine for it in p.items] == items
        assert all(len(p.items) == sizes[bucket] for p in mine[:-1])
        assert 1 <= len(mine[-1].items) <= sizes[bucket]
        assert len(mine) == math.ceil(len(items) / sizes[bucket])
        for index, plan in enumerate(mine):
            m = PATH_RE.match(plan.path)
            assert m, plan.path
            assert m.groups() == ("laion", bucket_name(bucket), "000012", f"{index:04d}")
    assert len({p.path for p in plans}) == len(plans)
    assert plan_shards({}, lambda b: 1, _shard()) == []
    other = {p.path for p in plan_shards(bucketed, lambda b: sizes[b], _shard(13, "laion"))}
    assert not other & {p.path for p in plans}, "each input shard has its own output paths"


def test_fingerprints_track_the_input_shard_the_settings_and_the_plan():
    from sd35dist.config.recipe import DataSection

    data = DataSection.model_validate({"cache_url": "/c", "datasets": [
        {"id": "ds", "source": "/data/ds/{00000..00009}.tar", "format": "webdataset"}]})
    settings = build_settings(data, data.datasets[0])
    fp = input_fingerprint(_shard(), settings)
    assert fp == input_fingerprint(_shard(), dict(reversed(list(settings.items()))))  # key order is irrelevant
    assert fp != input_fingerprint(_shard(1), settings)
    assert fp != input_fingerprint(_shard(url="/data/ds/00001.tar"), settings)
    for change in ({"cache_dtype": "fp32"}, {"shuffle_seed": 1}, {"shard_target_mb": 1.0}, {"cache_batch_size": 1}):
        changed = data.model_copy(update=change)
        assert fp != input_fingerprint(_shard(), build_settings(changed, changed.datasets[0])), change
    repeats = data.datasets[0].model_copy(update={"repeats": 2})
    assert fp != input_fingerprint(_shard(), build_settings(data, repeats))
    weighted = data.datasets[0].model_copy(update={"probability": 3.0})
    assert fp == input_fingerprint(_shard(), build_settings(data, weighted)), "probability only orders training"

    base = plan_shards(_bucketed({(1024, 1024): 5}), lambda b: 3, _shard())
    assert plan_fingerprint(base) == plan_fingerprint(plan_shards(_bucketed({(1024, 1024): 5}), lambda b: 3, _shard()))
    one_more = _bucketed({(1024, 1024): 5})
    one_more[(1024, 1024)].append(WorkItem(_images(6)[5], 0))
    assert plan_fingerprint(base) != plan_fingerprint(plan_shards(one_more, lambda b: 3, _shard()))
    assert plan_fingerprint(base) != plan_fingerprint(plan_shards(_bucketed({(1024, 1024): 5}), lambda b: 2, _shard()))


def test_filename_caption_that_comes_out_empty_is_missing():
    with pytest.raises(CaptionMissing, match="empty caption"):
        resolve_caption("filename", stem="(2)", textfile_content=None, instance_prompt=None)


# ---- report ------------------------------------------------------------------------------------


def test_report_lists_each_image_once_with_its_fit(tmp_path):
    from sd35dist.config.recipe import Recipe
    from sd35dist.data.cache_builder import finish_cache, fit_record
    from sd35dist.data.manifest import ShardEntry
    from sd35dist.data.storage import Store

    fit = plan_fit((128, 77), ((64, 64), (80, 48)))
    accepted = fit_record(SourceImage("d", "wide.png", "/x/wide.png", None), fit)
    assert accepted == {"dataset": "d", "image": "wide.png", "size": [128, 77], "bucket": "80x48",
                        "upscale": 0.625, "cropped_fraction": 0.0204}
    other = {**accepted, "image": "a.png", "upscale": 1.5}

    def shard(path: str, fitted: list, rejected: list) -> dict:
        return {"path": path, "bucket": "80x48", "samples": 1, "bytes": 8, "sha256": "0" * 64, "dtype": "fp32",
                "dataset": "d", "fitted": fitted, "rejected": rejected}

    # Repeats of one image can straddle two output shards; both shards prepared (or refused) it.
    refused = {"dataset": "d", "image": "bad.png", "reason": "unreadable"}
    journals = [{"planning_rejected": [], "shards": {"shards/b": shard("shards/b", [accepted], [refused]),
                                                     "shards/a": shard("shards/a", [accepted], [refused])}},
                {"planning_rejected": [{"dataset": "d", "image": "tiny.png", "reason": "too small"}],
                 "shards": {"shards/c": shard("shards/c", [other], [])}}]
    recipe = Recipe.model_validate({"name": "r", "model": {"pretrained": "m"}, "data": {"cache_url": str(tmp_path)},
                                    "output": {"dir": "o"}})
    empty = ShardEntry("empty_prompt.safetensors", "", 1, 8, "0" * 64, "fp32")
    manifest = finish_cache(Store(str(tmp_path)), iter(journals), empty, {}, {}, recipe)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["image"] for r in report["rejected"]] == ["bad.png", "tiny.png"]
    assert report["rejected_count"] == manifest.rejected == 2
    assert report["accepted"] == [accepted, other], "input-shard order, each image once"
    assert report["accepted_count"] == 2 and report["upscaled_count"] == 1
    assert report["max_upscale"] == 1.5 and report["max_cropped_fraction"] == 0.0204
    assert [s.path for s in manifest.shards] == ["shards/a", "shards/b", "shards/c"]
    finish_cache(Store(str(tmp_path)), iter([]), empty, {}, {}, recipe)
    assert json.loads((tmp_path / "report.json").read_text())["accepted"] == []
