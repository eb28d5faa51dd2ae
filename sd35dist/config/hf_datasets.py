"""Hugging Face datasets as parquet sources: `hf://datasets/ORG/NAME[@REVISION][/PATH-GLOB]`.

The URL form is huggingface_hub's own (`HfFileSystem`, `hf://[TYPE/]ID[@REVISION][/PATH]`): a
revision is one path segment (`%2F` stands for a `/` in it) or a special ref that holds slashes
(`refs/convert/parquet`, `refs/pr/N`); the path selects files of the repository:

- a glob (`data/train-*.parquet`, `**/*.parquet`): the files it matches, with fsspec's rules (the
  ones `HfFileSystem.glob` follows: `*` stays inside one folder, `**` crosses folders);
- a file ending in .parquet or .parq: that file;
- a folder, or nothing: every .parquet file under it (`FOLDER/**/*.parquet`).

Pure: the launcher (launcher/hub_datasets.py) downloads the matching files into the Hugging Face
cache on the submit host and hands the ranks the local snapshot path with the same glob.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from sd35dist.config.hub_ids import parse_hub_id

PREFIX = "hf://datasets/"
PARQUET_GLOB = "**/*.parquet"
PARQUET_SUFFIXES = (".parquet", ".parq")
_SPECIAL_REF = re.compile(r"^refs/(?:convert/[\w.-]+|pr/\d+)(?=/|$)")
_GLOB_CHARACTERS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class HubDataset:
    repo: str
    """org/name of the dataset repository."""
    revision: str | None
    """A branch, tag, commit or special ref; None: the repository's default branch (main)."""
    pattern: str
    """The files of the repository the dataset reads: a glob, or one file's path."""

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")

    def url(self) -> str:
        """The hf:// URL this is (the revision quoted as huggingface_hub quotes it)."""
        revision = ""
        if self.revision:
            revision = "@" + (self.revision if _SPECIAL_REF.match(self.revision) else quote(self.revision, safe=""))
        return f"{PREFIX}{self.repo}{revision}/{self.pattern}"


def is_hf_dataset_url(source: str) -> bool:
    """Whether a dataset source names a Hugging Face dataset (hf://datasets/…), valid or not."""
    return source.strip().startswith(PREFIX)


def files_pattern(path: str) -> str:
    """The glob a URL's path stands for: a glob or one parquet file as written, a folder's parquet files."""
    path = path.strip("/")
    if _GLOB_CHARACTERS.search(path) or path.lower().endswith(PARQUET_SUFFIXES):
        return path
    return f"{path}/{PARQUET_GLOB}" if path else PARQUET_GLOB


def parse_hf_dataset_url(source: str) -> HubDataset:
    """`hf://datasets/ORG/NAME[@REVISION][/PATH-GLOB]` as its parts; ValueError saying what is wrong."""
    text = source.strip()
    if not text.startswith(PREFIX):
        raise ValueError(f"{source!r} is not a Hugging Face dataset URL ({PREFIX}ORG/NAME[@REVISION][/GLOB])")
    body = text[len(PREFIX):]
    at = body.find("@")
    if at != -1 and body[:at].count("/") <= 1:
        repo, rest = body[:at], body[at + 1:]
        special = _SPECIAL_REF.match(rest)
        if special:
            revision, path = special.group(), rest[special.end():]
        else:
            revision, _, path = rest.partition("/")
            revision = unquote(revision)
        if not revision:
            raise ValueError(f"{source}: nothing after @: name a branch, tag or commit (or leave @ out for main)")
    else:
        parts = body.split("/", 2)
        repo, revision, path = "/".join(parts[:2]), None, parts[2] if len(parts) > 2 else ""
    hub_id = parse_hub_id(repo)
    if hub_id is None or hub_id.revision is not None:
        raise ValueError(f"{source}: {repo!r} is not a dataset repository id: write {PREFIX}ORG/NAME[@REVISION][/GLOB]")
    if ".." in path.split("/"):
        raise ValueError(f"{source}: the path may not leave the repository (..)")
    return HubDataset(hub_id.repo, revision, files_pattern(path))


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """The repository paths `pattern` matches, by fsspec's glob rules (those of HfFileSystem and of the
    local snapshot the ranks read)."""
    from fsspec.utils import glob_translate

    return re.compile(glob_translate(pattern))


def matching_files(pattern: str, paths: list[str]) -> list[str]:
    """The repository files `pattern` selects, sorted."""
    regex = pattern_regex(pattern)
    return sorted(path for path in paths if regex.fullmatch(path))
