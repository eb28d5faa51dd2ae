"""SimpleTuner dataset entries that the recipe's dataset formats can now express: `probability`, the
parquet caption table (`caption_strategy`/`metadata_backend` parquet) and the CSV URL list (`type: csv`).

Pure functions from one multidatabackend.json entry to recipe keys (plus the notes the YAML carries
above them); simpletuner.py calls them. What cannot be expressed raises `NotExpressible` with the
reason, and the importer lists the dataset as not mapped. A CSV list becomes a parquet file written
beside the recipe (`csv_parquet`): sd35dist reads parquet, not CSV, and splits it by row group.
"""

from __future__ import annotations

import math
import posixpath
from typing import Any

from sd35dist.config.loading import ConfigError
from sd35dist.importers.simpletuner_options import OptionError, parse_value

PARQUET_FILENAME_COLUMN = "id"
PARQUET_CAPTION_COLUMN = "description"
"""SimpleTuner's defaults when the parquet block leaves the columns out (--parquet_filename_column, --parquet_caption_column)."""
CSV_URL_COLUMN = "url"
CSV_ROWS_PER_GROUP = 1000
"""Rows per row group of a CSV list turned into parquet: the unit the cache's ranks split it by."""


class NotExpressible(ValueError):
    """A dataset entry with no equivalent here; the message says why and what to do."""


def probability(entry: dict[str, Any], where: str) -> float | None:
    """SimpleTuner's probability as the recipe's; None when it is 0 (SimpleTuner never draws such a dataset)."""
    raw = entry.get("probability")
    if raw is None or raw == "":
        return 1.0
    try:
        value = parse_value("float", raw)
    except OptionError as err:
        raise ConfigError(where, "probability", str(err)) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(where, "probability", f"{raw!r}: a weight ≥ 0 (SimpleTuner's default is 1)")
    return value if value > 0 else None


def _joined(root: str, path: str) -> str:
    return path if "://" in path or path.startswith("/") or not root else posixpath.join(root, path)


def parquet_keys(entry: dict[str, Any], image_root: str, bucket_root: str) -> tuple[dict[str, Any], list[str]]:
    """format: parquet keys for a dataset whose captions live in a parquet table (SimpleTuner's parquet
    metadata backend); `image_root` is the dataset's folder, `bucket_root` where its table path is
    relative to (s3://bucket for type aws, "" for local: relative to where SimpleTuner runs)."""
    config = entry.get("parquet")
    if not isinstance(config, dict) or not config.get("path"):
        raise NotExpressible("a parquet caption table needs its parquet block with a path")
    path = str(config["path"])
    if not path.lower().endswith((".parquet", ".parq")):
        raise NotExpressible(f"{path}: only .parquet tables are read here (convert a JSON Lines table with pyarrow)")
    if not parse_value("bool", config.get("identifier_includes_extension", False)):
        raise NotExpressible("its ids have no file extension (identifier_includes_extension false): SimpleTuner "
                             "finds each image by listing instance_data_dir, here the image column names the file; "
                             "add the extension to the ids and set identifier_includes_extension true")
    keys: dict[str, Any] = {"format": "parquet", "source": _joined(bucket_root, path),
                            "image_column": str(config.get("filename_column") or PARQUET_FILENAME_COLUMN),
                            "caption_column": str(config.get("caption_column") or PARQUET_CAPTION_COLUMN),
                            "image_root": image_root}
    if config.get("width_column") and config.get("height_column"):
        keys.update(width_column=str(config["width_column"]), height_column=str(config["height_column"]))
    notes = ["SimpleTuner's parquet captions: the table's rows are the dataset here (image_column names each file "
             "under image_root); a row whose file is missing is rejected in the cache's report.json"]
    if config.get("fallback_caption_column"):
        notes.append(f"fallback_caption_column {config['fallback_caption_column']} is not read: a row with an empty "
                     "caption is rejected")
    return keys, notes


def csv_keys(entry: dict[str, Any], parquet_path: str) -> tuple[dict[str, Any], list[str]]:
    """format: parquet keys for SimpleTuner's CSV URL list, read from the parquet file `csv_parquet` writes."""
    if not entry.get("csv_file"):
        raise NotExpressible("a CSV list needs csv_file")
    if not entry.get("csv_caption_column"):
        raise NotExpressible("a CSV list needs csv_caption_column (SimpleTuner requires it)")
    keys = {"format": "parquet", "source": parquet_path, "image_column": str(entry.get("csv_url_column") or CSV_URL_COLUMN),
            "caption_column": str(entry["csv_caption_column"])}
    notes = [f"SimpleTuner's CSV list {entry['csv_file']}, rewritten as parquet (row groups of {CSV_ROWS_PER_GROUP} split "
             "across the cache's ranks); the images are read from their URLs by `sd35dist cache`, not kept in a csv_cache_dir"]
    return keys, notes


def csv_parquet(csv_file: str, url_column: str, caption_column: str, where: str) -> bytes:
    """The CSV list's URL and caption columns as parquet bytes (pyarrow's CSV reader and writer)."""
    import io

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        table = pacsv.read_csv(csv_file, convert_options=pacsv.ConvertOptions(
            column_types={url_column: pa.string(), caption_column: pa.string()}))
    except FileNotFoundError:
        raise ConfigError(where, "csv_file", f"{csv_file} does not exist") from None
    except (pa.ArrowInvalid, OSError) as err:
        raise ConfigError(where, "csv_file", f"{csv_file} cannot be read as CSV ({' '.join(str(err).split())})") from None
    for key, column in (("csv_url_column", url_column), ("csv_caption_column", caption_column)):
        if column not in table.column_names:
            raise ConfigError(where, key, f"{csv_file} has no column {column!r} (its columns: {', '.join(table.column_names)})")
    import pyarrow.compute as pc

    if pc.any(pc.match_substring_regex(table.column(url_column), r"://[^/\s@]*:[^/\s@]*@")).as_py():
        raise ConfigError(where, "csv_url_column", f"{csv_file}: a URL holds a credential (user:password@): "
                                                   "credentials come from the environment here, never from files")
    buffer = io.BytesIO()
    pq.write_table(table.select([url_column, caption_column]), buffer, row_group_size=CSV_ROWS_PER_GROUP)
    return buffer.getvalue()


# ---- type: huggingface (SimpleTuner's Hugging Face datasets backend) ----------------------------

HF_SPLIT = "train"
HF_IMAGE_COLUMN = "image"
HF_CAPTION_COLUMN = "caption"
"""SimpleTuner's defaults: split and image_column (entry, else its huggingface block), caption_column (the block)."""
HF_BLOCK_MAPPED = ("dataset_name", "split", "revision", "image_column", "caption_column", "width_column", "height_column")
_HF_LOADING = "submit downloads the split's parquet files once and the cache reads them by row group (no datasets library)"
_HF_MEDIA = "a video, audio or box setting: sd35dist trains on images"
HF_BLOCK_NOT_APPLIED: dict[str, str] = {
    "cache_dir": "the dataset's files go to the profile's hf_home (the Hugging Face cache) here",
    "streaming": _HF_LOADING, "num_proc": _HF_LOADING, "auto_load": _HF_LOADING,
    "filter_func": "every row of the split is used here: filter the parquet files first",
    "quality_column": "every row of the split is used here (SimpleTuner reads it only to filter)",
    "fallback_caption_column": "a row with an empty caption is rejected here (listed in the cache's report.json)",
    "description_column": "a row with an empty caption is rejected here (SimpleTuner falls back to this column)",
    "composite_image_config": "composite (grid) images are not split here",
    "file_extension": "rows are named by their position here", "video_column": _HF_MEDIA,
    "num_frames_column": _HF_MEDIA, "fps_column": _HF_MEDIA, "lyrics_column": _HF_MEDIA,
    "audio_caption_fields": _HF_MEDIA, "bbox_column": _HF_MEDIA,
}
"""Keys of an entry's `huggingface` block (SimpleTuner's hf_config) that have no place here, and why."""
_SPLIT = r"(?P<name>[A-Za-z0-9_.-]+)(?P<slice>\[[^\]]*\])?"


def huggingface_keys(entry: dict[str, Any], textfile: bool, where: str) -> tuple[dict[str, Any], list[str],
                                                                                list[tuple[str, Any, str]]]:
    """format: parquet keys for SimpleTuner's `type: huggingface` image dataset: an hf:// source selecting
    its split's parquet files, SimpleTuner's columns; the notes for the YAML, and (key, value, why) of
    what is not applied. `textfile`: captions come from the caption column (caption_strategy huggingface)."""
    import re

    block = entry.get("huggingface") or {}
    if not isinstance(block, dict):
        raise ConfigError(where, "huggingface", "must be a block of keys (SimpleTuner's hf_config)")
    unknown = sorted(set(block) - set(HF_BLOCK_MAPPED) - set(HF_BLOCK_NOT_APPLIED))
    if unknown:
        raise ConfigError(where, f"huggingface.{unknown[0]}", f"not a key of SimpleTuner's huggingface block: "
                                                              f"{', '.join(unknown)} (a typo?)")
    name = str(entry.get("dataset_name", block.get("dataset_name")) or "")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]", name):
        raise NotExpressible(f"dataset_name {name!r} is not a Hugging Face id ORG/NAME"
                             if name else "a Hugging Face dataset needs dataset_name (SimpleTuner requires it)")
    split = str(entry.get("split", block.get("split", HF_SPLIT)))
    parsed = re.fullmatch(_SPLIT, split)
    if parsed is None:
        raise NotExpressible(f"split {split!r}: one split's files are read here: name it (train, train[:100]), not a combination")
    revision = entry.get("revision", block.get("revision"))
    pattern = f"data/{parsed['name']}-*.parquet"
    from urllib.parse import quote

    at = f"@{quote(str(revision), safe='')}" if revision not in (None, "") else ""
    keys: dict[str, Any] = {"format": "parquet", "source": f"hf://datasets/{name}{at}/{pattern}",
                            "image_column": str(entry.get("image_column", block.get("image_column", HF_IMAGE_COLUMN)))}
    skipped: list[tuple[str, Any, str]] = []
    caption = block.get("caption_column", HF_CAPTION_COLUMN)
    if isinstance(caption, list):
        skipped.append(("huggingface.caption_column", caption, f"one caption column is read here: {caption[0]} "
                                                               "(SimpleTuner draws among the columns' captions)"))
        caption = caption[0] if caption else HF_CAPTION_COLUMN
    if textfile:
        keys["caption_column"] = str(caption)
    if block.get("width_column") and block.get("height_column"):
        keys.update(width_column=str(block["width_column"]), height_column=str(block["height_column"]))
    if parsed["slice"]:
        skipped.append(("split", split, f"every row of split {parsed['name']} is read here (no slice)"))
    for key in sorted(set(block) & set(HF_BLOCK_NOT_APPLIED)):
        if block[key] not in (None, "", False, {}, []):
            skipped.append((f"huggingface.{key}", block[key], HF_BLOCK_NOT_APPLIED[key]))
    notes = [f"SimpleTuner's Hugging Face dataset {name} (split {parsed['name']}{', revision ' + str(revision) if at else ''}): "
             f"its parquet files as datasets' push_to_hub lays them out ({pattern}), downloaded once by `sd35dist submit` "
             f"into the profile's hf_home; a dataset kept as image files has its parquet conversion at "
             f"hf://datasets/{name}@refs/convert/parquet/default/{parsed['name']}/*.parquet: name that as the source"]
    return keys, notes, skipped
