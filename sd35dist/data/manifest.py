"""The cache manifest: every shard with its bucket, sample count, size and sha256.

A loader starts from the manifest alone — it never lists the bucket — so the manifest
names shards, not samples (a million samples at ~80 per shard is ~12k entries). Every path
in it is relative to the cache root and is checked on read.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

from sd35dist.data.storage import Store, safe_relative_path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sd35dist-cache/1"


class ManifestError(ValueError):
    """A manifest that cannot be trusted; the message names the entry."""


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    path: str
    bucket: str
    samples: int
    bytes: int
    sha256: str
    dtype: str


@dataclasses.dataclass(frozen=True)
class ShardManifest:
    shards: tuple[ShardEntry, ...]
    empty_prompt: ShardEntry
    """The encoding of the empty caption, stored once for caption dropout."""
    encoders: dict[str, Any]
    """Identity of the VAE and text encoders that built the cache."""
    vae: dict[str, float]
    """scaling_factor and shift_factor, applied to latents at train time."""
    dtype: str
    max_sequence_length: int
    buckets: tuple[str, ...]
    rejected: int
    """Images skipped while building; reasons in report.json."""
    format: str = MANIFEST_FORMAT

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def samples_per_bucket(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for shard in self.shards:
            counts[shard.bucket] += shard.samples
        return dict(sorted(counts.items()))

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["totals"] = {"samples": self.total_samples, "bytes": self.total_bytes, "shards": len(self.shards)}
        return json.dumps(data, indent=1, sort_keys=True) + "\n"


def _entry(raw: Any, where: str) -> ShardEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected an object")
    try:
        entry = ShardEntry(**{f.name: raw[f.name] for f in dataclasses.fields(ShardEntry)})
    except KeyError as missing:
        raise ManifestError(f"{where}: missing {missing}") from None
    try:
        safe_relative_path(entry.path)
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    if entry.samples < 0 or entry.bytes < 0 or len(entry.sha256) != 64:
        raise ManifestError(f"{where}: bad samples/bytes/sha256")
    return entry


def parse_manifest(text: str, source: str = MANIFEST_NAME) -> ShardManifest:
    """Parse and check a manifest; paths outside the root are refused."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{source}: not JSON ({exc})") from None
    if data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{source}: format {data.get('format')!r}, expected {MANIFEST_FORMAT}")
    shards = tuple(_entry(raw, f"{source}: shards[{i}]") for i, raw in enumerate(data.get("shards", [])))
    return ShardManifest(
        shards=shards,
        empty_prompt=_entry(data.get("empty_prompt"), f"{source}: empty_prompt"),
        encoders=data.get("encoders", {}),
        vae=data.get("vae", {}),
        dtype=data["dtype"],
        max_sequence_length=data["max_sequence_length"],
        buckets=tuple(data.get("buckets", ())),
        rejected=data.get("rejected", 0),
    )


def read_manifest(store: Store) -> ShardManifest:
    if not store.exists(MANIFEST_NAME):
        raise ManifestError(f"{store.url_of(MANIFEST_NAME)}: no manifest (the cache is not built, or not finished)")
    return parse_manifest(store.read_bytes(MANIFEST_NAME).decode(), store.url_of(MANIFEST_NAME))


def write_manifest(store: Store, manifest: ShardManifest) -> None:
    store.write_bytes(MANIFEST_NAME, manifest.to_json().encode())
