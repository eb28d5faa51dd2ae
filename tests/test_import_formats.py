"""`sd35dist import simpletuner` for what the dataset formats can now express: probability and
data_backend_sampling, a parquet caption table, a CSV URL list (written as parquet beside the recipe)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sd35dist.cli import main as cli_main
from sd35dist.config.recipe import load_recipe
from sd35dist.data.input_shards import row_group_shards
from sd35dist.data.parquet_source import read_row_group
from sd35dist.importers.simpletuner_formats import CSV_ROWS_PER_GROUP

pytestmark = pytest.mark.unit


def run_import(capsys, tmp_path: Path, backend: list[dict], **options) -> tuple[int, str, str, Path]:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"--model_family": "sd3", "--output_dir": str(tmp_path / "out"), **options}))
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    out = tmp_path / "recipe.yaml"
    code = cli_main(["import", "simpletuner", str(config), "--backend", str(tmp_path / "multidatabackend.json"),
                     "-o", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, out


def test_probability_and_data_backend_sampling_keep_simpletuners_meaning(capsys, tmp_path):
    backend = [{"id": "a", "instance_data_dir": "/d/a", "caption_strategy": "textfile", "probability": 2.5},
               {"id": "b", "instance_data_dir": "/d/b", "caption_strategy": "textfile"},
               {"id": "never", "instance_data_dir": "/d/c", "caption_strategy": "textfile", "probability": 0}]
    code, stdout, err, out = run_import(capsys, tmp_path, backend, **{"--data_backend_sampling": "uniform"})
    assert code == 0, err
    recipe = load_recipe(out)
    assert [(d.id, d.probability) for d in recipe.data.datasets] == [("a", 2.5), ("b", 1.0)]
    assert recipe.data.dataset_sampling == "uniform"
    assert "# SimpleTuner's probability: how often a step draws from this dataset" in out.read_text()
    assert "never" in stdout and "SimpleTuner never draws a dataset of probability 0" in stdout
    bad = [{"id": "a", "instance_data_dir": "/d/a", "caption_strategy": "textfile", "probability": -1}]
    (tmp_path / "bad").mkdir()
    code, _, err, _ = run_import(capsys, tmp_path / "bad", bad)
    assert code == 2 and err.count("\n") == 1 and "probability: -1: a weight ≥ 0" in err


def test_a_parquet_caption_table_becomes_a_parquet_dataset(capsys, tmp_path):
    table = {"filename_column": "file", "caption_column": "cogvlm_caption", "width_column": "width",
             "height_column": "height", "identifier_includes_extension": True, "fallback_caption_column": "tags"}
    backend = [{"id": "photos", "type": "aws", "aws_bucket_name": "bucket", "aws_data_prefix": "images",
                "caption_strategy": "parquet", "metadata_backend": "parquet", "parquet": {"path": "meta/photos.parquet", **table}},
               {"id": "ids", "instance_data_dir": "/d/ids", "caption_strategy": "parquet", "metadata_backend": "parquet",
                "parquet": {"path": "/d/ids.parquet", "filename_column": "id", "caption_column": "text"}}]
    code, stdout, err, out = run_import(capsys, tmp_path, backend)
    assert code == 0, err
    [dataset] = load_recipe(out).data.datasets
    assert (dataset.format, dataset.source, dataset.image_root) == ("parquet", "s3://bucket/meta/photos.parquet",
                                                                    "s3://bucket/images")
    assert (dataset.image_column, dataset.caption_column, dataset.width_column, dataset.height_column,
            dataset.caption_strategy) == ("file", "cogvlm_caption", "width", "height", "textfile")
    assert "fallback_caption_column tags is not read" in out.read_text()
    assert "identifier_includes_extension false" in stdout, "ids without extensions cannot name a file here"


def test_a_csv_url_list_becomes_parquet_beside_the_recipe(capsys, tmp_path):
    rows = ["url,caption,score"] + [f"https://images.example/{i}.jpg,\"a red fox, number {i}\",0.{i}" for i in range(2500)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    backend = [{"id": "web", "type": "csv", "csv_file": str(tmp_path / "list.csv"), "csv_caption_column": "caption",
                "csv_url_column": "url", "csv_cache_dir": "/tmp/cache", "caption_strategy": "csv", "probability": 3}]
    code, stdout, err, out = run_import(capsys, tmp_path, backend)
    assert code == 0, err
    [dataset] = load_recipe(out).data.datasets
    written = tmp_path / "recipe.web.parquet"
    assert (dataset.format, dataset.source, dataset.image_column, dataset.caption_column, dataset.probability) == \
        ("parquet", str(written), "url", "caption", 3.0)
    metadata = pq.ParquetFile(written).metadata
    assert metadata.num_rows == 2500 and metadata.num_row_groups == -(-2500 // CSV_ROWS_PER_GROUP)
    shards = row_group_shards(dataset, [(str(written), [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)])])
    images, _ = read_row_group(shards[-1], dataset, {})
    assert (images[-1].url, images[-1].caption) == ("https://images.example/2499.jpg", "a red fox, number 2499")
    assert "csv_cache_dir" in stdout
    code, _, err, _ = run_import(capsys, tmp_path, backend)
    assert code == 2 and "exists already" in err, "nothing is replaced"
    missing = [{**backend[0], "csv_url_column": "link"}]
    (tmp_path / "again").mkdir()
    code, _, err, _ = run_import(capsys, tmp_path / "again", missing)
    assert code == 2 and "has no column 'link'" in err and not (tmp_path / "again" / "recipe.web.parquet").exists()
