"""Input shards and the WebDataset/parquet readers: what a source names, how it splits, what a
sample becomes, and the one-line mistakes (not a tar, no such column, a probability ≤ 0)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sd35dist.config.loading import ConfigError, validate_mapping
from sd35dist.config.recipe import DataSection, DatasetSection, Recipe
from sd35dist.data.dataset_formats import list_input_shards
from sd35dist.data.image_source import SourceImage
from sd35dist.data.input_shards import (
    DatasetInputError,
    expand_source,
    folder_shards,
    relative_names,
    row_group_shards,
)
from sd35dist.data.parquet_source import read_row_group, row_group_sizes
from sd35dist.data.webdataset_source import read_tar_shard
from sd35dist.demo.formats import demo_samples, write_parquet

pytestmark = pytest.mark.unit


def _png(size=(64, 64), colour=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _dataset(**values) -> DatasetSection:
    return DatasetSection.model_validate({"id": "ds", "source": "/nowhere", **values})


# ---- what a source names ---------------------------------------------------------------------


def test_a_brace_pattern_is_expanded_without_listing_anything():
    dataset = _dataset(source="s3://bucket/laion/{00000..00002}.tar", format="webdataset")
    assert expand_source(dataset, {"endpoint_url": "http://127.0.0.1:1"}) == [
        "s3://bucket/laion/00000.tar", "s3://bucket/laion/00001.tar", "s3://bucket/laion/00002.tar"]


def test_a_glob_a_directory_and_a_file_name_their_shards(tmp_path):
    for name in ("b.tar", "a.tar", "notes.txt", "sub/c.tar"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    directory = expand_source(_dataset(source=str(tmp_path), format="webdataset"), {})
    assert directory == [str(tmp_path / n) for n in ("a.tar", "b.tar", "sub/c.tar")]
    assert expand_source(_dataset(source=f"{tmp_path}/*.tar", format="webdataset"), {}) == directory[:2]
    assert expand_source(_dataset(source=str(tmp_path / "b.tar"), format="webdataset"), {}) == [str(tmp_path / "b.tar")]
    assert relative_names(directory) == ["a.tar", "b.tar", "sub/c.tar"]
    assert relative_names(["s3://b/x/one.parquet"]) == ["one.parquet"]


def test_row_groups_and_folder_chunks_are_numbered_in_order():
    dataset = _dataset(format="parquet")
    shards = row_group_shards(dataset, [("/d/a.parquet", [3, 2]), ("/d/b.parquet", [4])])
    assert [(s.index, s.name, s.row_group, s.first_row, s.rows) for s in shards] == [
        (0, "a.parquet", 0, 0, 3), (1, "a.parquet", 1, 3, 2), (2, "b.parquet", 0, 0, 4)]
    images = [SourceImage("ds", f"{i}.png", f"/f/{i}.png", None) for i in range(600)]
    chunks = folder_shards(_dataset(), images)
    assert [len(c.members) for c in chunks] == [256, 256, 88]
    assert [m for c in chunks for m in c.members] == images


def test_every_rank_lists_the_same_shards_and_reads_only_its_share_of_footers(tmp_path):
    files = write_parquet(tmp_path / "pq", demo_samples(11, 0), rows_per_group=2, groups_per_file=2)
    data = DataSection.model_validate({"cache_url": "/c", "datasets": [
        {"id": "pq", "source": str(tmp_path / "pq"), "format": "parquet"},
        {"id": "wds", "source": "/t/{0..2}.tar", "format": "webdataset"}]})
    read: dict[int, dict] = {}

    class Recorded(Exception):
        pass

    def record(rank):
        def gather(mine):
            read[rank] = mine
            raise Recorded
        return gather

    for rank in (0, 1):
        with pytest.raises(Recorded):
            list_input_shards(data, rank, 2, record(rank), lambda d: [])
    assert sorted(read[0]) == [str(f) for f in files[0::2]] and sorted(read[1]) == [str(f) for f in files[1::2]]
    lists = [list_input_shards(data, rank, 2, lambda mine: [read[0], read[1]], lambda d: []) for rank in (0, 1)]
    assert lists[0] == lists[1]
    assert [(s.dataset, s.rows) for s in lists[0]] == [("pq", 2)] * 5 + [("pq", 1)] + [("wds", 0)] * 3
    assert sum(s.rows for s in lists[0]) == 11


# ---- WebDataset samples ---------------------------------------------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_tar_sample_is_its_image_with_the_txt_or_json_caption(tmp_path):
    path = _tar(tmp_path / "00007.tar", [
        ("a.jpg", _png()), ("a.txt", b"a red fox\n"), ("a.json", b'{"caption": "ignored: the .txt wins"}'),
        ("b.png", _png()), ("b.json", json.dumps({"caption": "a lighthouse", "width": 64}).encode()),
        ("c.webp", _png()),
        ("d.txt", b"a caption without an image"),
    ])
    dataset = _dataset(source=str(path), format="webdataset")
    from sd35dist.data.input_shards import tar_shards

    [shard] = tar_shards(dataset, [str(path)])
    images, rejected = read_tar_shard(shard, dataset, {})
    assert [(i.path, i.caption) for i in images] == [("00007.tar/a", "a red fox\n"), ("00007.tar/b", "a lighthouse"),
                                                      ("00007.tar/c", None)]
    assert images[0].data == _png() and images[0].url is None and images[0].stem == "a"
    assert [(r.image, r.reason) for r in rejected] == [("00007.tar/d", "no image in the sample (it holds txt)")]
    assert "(.txt, or .json with a caption)" in images[2].caption_origin


@pytest.mark.parametrize("content", [b"this is not a tar file at all" * 40, b""])
def test_a_shard_that_is_not_a_tar_is_a_mistake_naming_the_dataset_and_key(tmp_path, content):
    path = tmp_path / "00000.tar"
    path.write_bytes(content)
    dataset = _dataset(source=str(path), format="webdataset")
    from sd35dist.data.input_shards import tar_shards

    with pytest.raises(DatasetInputError) as info:
        read_tar_shard(tar_shards(dataset, [str(path)])[0], dataset, {})
    assert info.value.dataset == "ds" and info.value.key == "source"
    assert f"{path} is not a readable tar file" in str(info.value) and "\n" not in str(info.value)


# ---- parquet rows ----------------------------------------------------------------------------------


def test_a_parquet_row_holds_bytes_a_struct_or_a_path(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(_png((80, 48)))
    table = pa.table({
        "img": [{"bytes": _png(), "path": None}, {"bytes": None, "path": "img/x.png"}, None, {"bytes": None, "path": "/abs/y.png"}],
        "text": ["a red fox", "a lighthouse", "no image here", None],
        "w": [64, 80, 1, None], "h": [64, 48, 1, 96]})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=2)
    dataset = _dataset(source=str(tmp_path / "part.parquet"), format="parquet", image_column="img",
                       caption_column="text", width_column="w", height_column="h")
    assert row_group_sizes(dataset, str(tmp_path / "part.parquet"), {}) == [2, 2]
    shards = row_group_shards(dataset, [(str(tmp_path / "part.parquet"), [2, 2])])
    first, _ = read_row_group(shards[0], dataset, {})
    second, rejected = read_row_group(shards[1], dataset, {})
    assert [(i.path, i.caption, i.size_hint) for i in first] == [("part.parquet/0", "a red fox", (64, 64)),
                                                                ("part.parquet/1", "a lighthouse", (80, 48))]
    assert first[0].data == _png() and first[1].url == str(tmp_path / "img" / "x.png") and first[1].stem == "x"
    assert [(i.path, i.url, i.caption, i.size_hint) for i in second] == [("part.parquet/3", "/abs/y.png", None, None)]
    assert [(r.image, r.reason) for r in rejected] == [("part.parquet/2", "no image: column 'img' holds NoneType, not bytes or a path")]
    rooted = dataset.model_copy(update={"image_root": "s3://bucket/images"})
    assert read_row_group(shards[0], rooted, {})[0][1].url == "s3://bucket/images/img/x.png"
    # Several captions per row (SimpleTuner's parquet captions may be lists): the first non-empty one.
    pq.write_table(pa.table({"image": [_png()], "caption": [["", "a red fox", "second"]],
                             "w": ["64"], "h": ["64"]}), tmp_path / "lists.parquet")
    listed = dataset.model_copy(update={"source": str(tmp_path / "lists.parquet"), "image_column": "image",
                                        "caption_column": "caption"})
    [image], _ = read_row_group(row_group_shards(listed, [(listed.source, [1])])[0], listed, {})
    assert image.caption == "a red fox" and image.size_hint == (64, 64)


def test_a_parquet_file_without_the_named_column_is_a_mistake_naming_the_key(tmp_path):
    files = write_parquet(tmp_path, demo_samples(2, 0), rows_per_group=2, groups_per_file=1)
    for values, key in (({"caption_column": "text"}, "caption_column"), ({"image_column": "jpg"}, "image_column"),
                        ({"width_column": "w", "height_column": "height"}, "width_column")):
        dataset = _dataset(source=str(files[0]), format="parquet", **values)
        with pytest.raises(DatasetInputError) as info:
            row_group_sizes(dataset, str(files[0]), {})
        assert info.value.key == key and "has no column" in info.value.message and "key, image, caption" in info.value.message
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_bytes(b"PAR1 but not really")
    with pytest.raises(DatasetInputError, match="is not a parquet file") as info:
        row_group_sizes(_dataset(format="parquet"), str(not_parquet), {})
    assert info.value.key == "source"
    # caption_strategy instance_prompt reads no caption column
    dataset = _dataset(format="parquet", caption_column="absent", caption_strategy="instance_prompt", instance_prompt="k4s4")
    assert row_group_sizes(dataset, str(files[0]), {}) == [2]


# ---- the recipe keys ----------------------------------------------------------------------------------


def _recipe(**dataset) -> dict:
    return {"name": "r", "model": {"pretrained": "/m"}, "output": {"dir": "/o"},
            "data": {"cache_url": "/c", "datasets": [{"id": "laion", "source": "/s", **dataset}]}}


@pytest.mark.parametrize(("dataset", "key", "message"), [
    ({"probability": 0}, "data.datasets.0.probability", "dataset laion: must be a finite weight > 0"),
    ({"probability": -1.5}, "data.datasets.0.probability", "dataset laion: must be a finite weight > 0"),
    ({"image_column": "jpg"}, "data.datasets.0", "dataset laion: image_column is a key of format parquet, not folder"),
    ({"format": "parquet", "width_column": "w"}, "data.datasets.0", "width_column and height_column go together"),
    ({"format": "tar"}, "data.datasets.0.format", "must be one of"),
])
def test_dataset_key_mistakes_are_one_line_naming_dataset_and_key(dataset, key, message):
    with pytest.raises(ConfigError) as info:
        validate_mapping(Recipe, _recipe(**dataset), "recipe.yaml")
    assert str(info.value).startswith(f"recipe.yaml: {key}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_dataset_keys_reach_the_recipe():
    recipe = validate_mapping(Recipe, _recipe(format="parquet", image_column="jpg", caption_column="txt",
                                              width_column="w", height_column="h", probability=2.5), "r.yaml")
    dataset = recipe.data.datasets[0]
    assert (dataset.format, dataset.image_column, dataset.caption_column, dataset.width_column,
            dataset.height_column, dataset.probability) == ("parquet", "jpg", "txt", "w", "h", 2.5)
    assert recipe.data.dataset_sampling == "auto-weighting"
    assert validate_mapping(Recipe, _recipe(), "r.yaml").data.datasets[0].format == "folder"
