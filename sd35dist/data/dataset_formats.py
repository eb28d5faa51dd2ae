"""Which reader each dataset format uses: listing a recipe's input shards, and reading one.

folder: data/image_source.py (a listing, cut into chunks); webdataset: data/webdataset_source.py
(webdataset's tar iterators); parquet: data/parquet_source.py (pyarrow, one row group at a time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sd35dist.config.recipe import DataSection, DatasetSection
from sd35dist.data.image_source import Rejected, SourceImage
from sd35dist.data.input_shards import (
    Gather,
    InputShard,
    expand_source,
    folder_shards,
    row_group_shards,
    tar_shards,
)
from sd35dist.data.parquet_source import read_row_group, row_group_sizes
from sd35dist.data.webdataset_source import read_tar_shard


def list_input_shards(data: DataSection, rank: int, world_size: int, gather: Gather,
                      list_folder: Callable[[DatasetSection], list[SourceImage]]) -> list[InputShard]:
    """Every dataset's input shards, the same list on every rank."""
    expanded = {d.id: expand_source(d, data.storage_options) for d in data.datasets if d.format != "folder"}
    parquet_files = [(d, url) for d in data.datasets if d.format == "parquet" for url in expanded[d.id]]
    mine = {url: row_group_sizes(d, url, data.storage_options) for d, url in parquet_files[rank::world_size]}
    sizes: dict[str, list[int]] = {}
    for part in gather(mine):
        sizes.update(part)
    shards: list[InputShard] = []
    for dataset in data.datasets:
        if dataset.format == "folder":
            shards += folder_shards(dataset, list_folder(dataset))
        elif dataset.format == "webdataset":
            shards += tar_shards(dataset, expanded[dataset.id])
        else:
            shards += row_group_shards(dataset, [(url, sizes[url]) for url in expanded[dataset.id]])
    return shards


def read_input_shard(shard: InputShard, dataset: DatasetSection,
                     storage_options: dict[str, Any]) -> tuple[list[SourceImage], list[Rejected]]:
    """The images of one input shard, and the samples rejected before they are images."""
    if dataset.format == "webdataset":
        return read_tar_shard(shard, dataset, storage_options)
    if dataset.format == "parquet":
        return read_row_group(shard, dataset, storage_options)
    return list(shard.members), []
