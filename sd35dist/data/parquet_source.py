"""Parquet datasets → images with their captions, read with pyarrow one row group at a time.

A row's `image_column` holds the image's bytes, a {bytes, path} struct (how Hugging Face
datasets store an Image feature), or a path or URL (relative ones are relative to
`image_root`, default the parquet file's directory). `caption_column` holds the caption (text,
or a list of captions: the first non-empty one is used). With `width_column` and
`height_column` images are bucketed from those numbers, without decoding; an image whose real
size differs is rejected when it is encoded.
"""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec

from sd35dist.config.recipe import DatasetSection
from sd35dist.data.image_source import Rejected, SourceImage
from sd35dist.data.input_shards import DatasetInputError, InputShard


def _open_parquet(dataset: DatasetSection, url: str, storage_options: dict[str, Any]):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        handle = fsspec.open(url, "rb", **storage_options).open()
    except FileNotFoundError:
        raise DatasetInputError(dataset.id, "source", f"{url} does not exist") from None
    try:
        return pq.ParquetFile(handle), handle
    except (pyarrow.ArrowInvalid, OSError) as err:
        handle.close()
        raise DatasetInputError(dataset.id, "source", f"{url} is not a parquet file ({err})") from None


def needed_columns(dataset: DatasetSection) -> list[tuple[str, str]]:
    """(dataset key, column name) of every column the dataset reads."""
    columns = [("image_column", dataset.image_column)]
    if dataset.caption_strategy == "textfile":
        columns.append(("caption_column", dataset.caption_column))
    if dataset.width_column is not None and dataset.height_column is not None:
        columns += [("width_column", dataset.width_column), ("height_column", dataset.height_column)]
    return columns


def check_columns(dataset: DatasetSection, url: str, names: list[str]) -> None:
    for key, column in needed_columns(dataset):
        if column not in names:
            raise DatasetInputError(dataset.id, key, f"{url} has no column {column!r} (its columns: {', '.join(names)})")


def row_group_sizes(dataset: DatasetSection, url: str, storage_options: dict[str, Any]) -> list[int]:
    """Rows of each row group of one file, from its footer; its columns are checked on the way."""
    parquet, handle = _open_parquet(dataset, url, storage_options)
    with handle:
        check_columns(dataset, url, parquet.schema_arrow.names)
        return [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]


def _caption(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    return value if isinstance(value, str) else None


def _side(value: Any) -> int | None:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value) and value > 0:
        return int(value)
    return None


def resolve_image_path(value: str, dataset: DatasetSection, parquet_url: str) -> str:
    """A path from image_column as a URL: absolute paths and URLs as they are, others under image_root."""
    if "://" in value or value.startswith("/"):
        return value
    root = dataset.image_root or posixpath.dirname(parquet_url)
    return posixpath.join(root, value)


def read_row_group(shard: InputShard, dataset: DatasetSection,
                   storage_options: dict[str, Any]) -> tuple[list[SourceImage], list[Rejected]]:
    """The row group's images (bytes in memory, or paths to read) and the rows without one."""
    parquet, handle = _open_parquet(dataset, shard.url, storage_options)
    with handle:
        check_columns(dataset, shard.url, parquet.schema_arrow.names)
        columns = list(dict.fromkeys(column for _, column in needed_columns(dataset)))
        table = parquet.read_row_group(shard.row_group, columns=columns)
    values = {column: table.column(column).to_pylist() for column in columns}
    images: list[SourceImage] = []
    rejected: list[Rejected] = []
    for i in range(table.num_rows):
        path = f"{shard.name}/{shard.first_row + i}"
        raw = values[dataset.image_column][i]
        if isinstance(raw, dict):  # Hugging Face datasets' Image feature: {bytes, path}
            raw = raw.get("bytes") if raw.get("bytes") is not None else raw.get("path")
        caption = _caption(values[dataset.caption_column][i]) if dataset.caption_strategy == "textfile" else None
        size = None
        if dataset.width_column is not None and dataset.height_column is not None:
            width, height = _side(values[dataset.width_column][i]), _side(values[dataset.height_column][i])
            size = (width, height) if width and height else None
        origin = f"caption in column {dataset.caption_column!r}"
        if isinstance(raw, bytes):
            images.append(SourceImage(dataset.id, path, None, None, data=raw, caption=caption,
                                      caption_origin=origin, size_hint=size))
        elif isinstance(raw, str) and raw:
            url = resolve_image_path(raw, dataset, shard.url)
            images.append(SourceImage(dataset.id, path, url, None, caption=caption, caption_origin=origin,
                                      size_hint=size))
        else:
            rejected.append(Rejected(dataset.id, path, f"no image: column {dataset.image_column!r} holds "
                                                       f"{type(raw).__name__}, not bytes or a path"))
    return images, rejected
