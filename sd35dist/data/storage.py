"""Object storage through fsspec: local paths, file://, s3:// — one small surface for the cache.

Writes are atomic: a reader sees a complete object under its final name or nothing.
Locally that is a temporary name + rename; on S3 one PUT of the whole object (S3 never
shows a partial object).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from sd35dist.runtime.atomic_files import write_bytes_atomically


class UnsafePath(ValueError):
    """A manifest entry that would escape the cache root (absolute, or with ..)."""


class Store:
    """A root URL and its filesystem; every path given to it is relative to the root."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, safe_relative_path(relative))

    def url_of(self, relative: str) -> str:
        return f"{self.url}/{safe_relative_path(relative)}"

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def write_bytes(self, relative: str, data: bytes) -> None:
        target = self.path(relative)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            write_bytes_atomically(target, data)
        else:
            self.fs.pipe_file(target, data)

    def remove(self, relative: str) -> None:
        target = self.path(relative)
        if self.fs.exists(target):
            self.fs.rm_file(target)

    def list_dir(self, relative: str) -> list[str]:
        """Names directly under `relative` (empty when it does not exist)."""
        target = self.path(relative)
        try:
            entries = self.fs.ls(target, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def safe_relative_path(relative: str) -> str:
    """Refuse paths that leave the root: absolute, drive-like, or containing `..`."""
    if not relative or relative.startswith(("/", "\\")) or "://" in relative:
        raise UnsafePath(f"{relative!r} is not a path relative to the cache root")
    parts = relative.replace("\\", "/").split("/")
    if any(part in ("..", ".", "") for part in parts) or re.match(r"^[A-Za-z]:", parts[0]):
        raise UnsafePath(f"{relative!r} leaves the cache root or is malformed")
    return "/".join(parts)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
