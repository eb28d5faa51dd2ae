"""A dataset's input shards: the units the cache builder splits across ranks and resumes by.

- folder: consecutive runs of `FOLDER_CHUNK` images of the sorted listing (a folder has to be
  listed once; nothing else does);
- webdataset: one tar file each, named by a brace pattern (expanded, never listed), a glob, a
  directory of .tar files or one file;
- parquet: one row group each, of the .parquet files named the same ways. Row-group counts come
  from the files' footers; each rank reads the footers of every world-th file and the ranks
  exchange them (`gather`), so no rank reads every footer.

Every rank derives the same list, in the order of the recipe's datasets; rank r builds shards
r, r + world, … of it. A shard's output depends on the shard alone, never on the rank count.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Callable, Sequence
from typing import Any

import fsspec

from sd35dist.config.recipe import DatasetSection
from sd35dist.data.image_source import SourceImage

FOLDER_CHUNK = 256
"""Images per input shard of a folder dataset."""
SHARD_SUFFIXES = {"webdataset": (".tar",), "parquet": (".parquet", ".parq")}
GLOB_CHARACTERS = re.compile(r"[*?\[]")

Gather = Callable[[Any], list[Any]]
"""Every rank's value of an object, in rank order (torch.distributed.all_gather_object; [x] alone)."""


class DatasetInputError(ValueError):
    """A dataset whose input is not what its format says (not a tar, no such column): a user mistake.

    `key` is the dataset key to fix (source, image_column …); jobs/cache.py names the recipe file.
    """

    def __init__(self, dataset: str, key: str, message: str) -> None:
        self.dataset, self.key, self.message = dataset, key, message
        super().__init__(f"dataset {dataset}: {key}: {message}")


@dataclasses.dataclass(frozen=True)
class InputShard:
    dataset: str
    index: int
    """Position in the dataset's list of shards (names its output shards and its journal)."""
    url: str
    """folder: the source directory; webdataset: the tar file; parquet: the parquet file."""
    name: str
    """The file's path relative to the dataset's root (stable across machines), or the chunk's first image."""
    row_group: int = -1
    """parquet: the row group this shard is."""
    first_row: int = 0
    """parquet: the group's first row in its file."""
    rows: int = 0
    """parquet: rows in the group; folder: images in the chunk."""
    members: tuple[SourceImage, ...] = ()
    """folder: the chunk's images."""

    @property
    def identity(self) -> dict[str, Any]:
        """What the shard is, for its journal's fingerprint."""
        return {"dataset": self.dataset, "index": self.index, "url": self.url, "row_group": self.row_group,
                "first_row": self.first_row, "rows": self.rows, "members": [m.path for m in self.members]}

    def describe(self) -> str:
        return self.url + (f" (row group {self.row_group})" if self.row_group >= 0 else "")


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


def expand_source(dataset: DatasetSection, storage_options: dict[str, Any]) -> list[str]:
    """The shard files a webdataset or parquet source names, sorted as written (brace) or by name."""
    import braceexpand

    source = dataset.source
    suffixes = SHARD_SUFFIXES[dataset.format]
    if "{" in source:
        return list(braceexpand.braceexpand(source))  # a pattern is a list: nothing is listed
    fs, root = fsspec.core.url_to_fs(source, **storage_options)
    protocol = protocol_of(source)
    if GLOB_CHARACTERS.search(root):
        found = sorted(fs.glob(root))
    elif fs.isdir(root):
        found = sorted(p for p in fs.find(root) if p.lower().endswith(suffixes))
    else:
        return [source]
    return [f"{protocol}{path}" if protocol else path for path in found]


def relative_names(urls: Sequence[str]) -> list[str]:
    """Each URL relative to the deepest directory holding all of them (a single file: its name)."""
    paths = [url.split("://", 1)[-1] for url in urls]
    if len(paths) == 1:
        return [posixpath.basename(paths[0])]
    root = posixpath.commonpath(paths)
    if root in paths:  # commonpath of /a/b.tar and /a/b.tar.x would be a file
        root = posixpath.dirname(root)
    return [posixpath.relpath(p, root) for p in paths]


def folder_shards(dataset: DatasetSection, images: Sequence[SourceImage]) -> list[InputShard]:
    """A folder's sorted image list cut into chunks of FOLDER_CHUNK images."""
    out = []
    for index, start in enumerate(range(0, len(images), FOLDER_CHUNK)):
        members = tuple(images[start : start + FOLDER_CHUNK])
        out.append(InputShard(dataset.id, index, dataset.source, f"images[{start}:{start + len(members)}]",
                              first_row=start, rows=len(members), members=members))
    return out


def tar_shards(dataset: DatasetSection, urls: Sequence[str]) -> list[InputShard]:
    return [InputShard(dataset.id, index, url, name) for index, (url, name) in enumerate(zip(urls, relative_names(urls)))]


def row_group_shards(dataset: DatasetSection, files: Sequence[tuple[str, Sequence[int]]]) -> list[InputShard]:
    """One shard per row group: `files` lists each parquet file's URL with its row groups' row counts."""
    out: list[InputShard] = []
    names = relative_names([url for url, _ in files]) if files else []
    for (url, groups), name in zip(files, names):
        first = 0
        for group, rows in enumerate(groups):
            out.append(InputShard(dataset.id, len(out), url, name, row_group=group, first_row=first, rows=rows))
            first += rows
    return out


def assign(shards: Sequence[InputShard], rank: int, world_size: int) -> list[InputShard]:
    """This rank's input shards: every world_size-th, starting at its rank."""
    return list(shards[rank::world_size])
