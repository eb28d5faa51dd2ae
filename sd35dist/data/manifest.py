"""The cache manifest: every shard with its bucket, sample count, size and sha256.

A loader starts from the manifest alone — it never lists the bucket — so the manifest
names shards, not samples (a million samples at ~80 per shard is ~12k entries). Every path
in it is relative to the cache root and is checked on read.
"""

from __future__ import annotations

import dataclasses
import json
import re
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
    validation_prompts: ShardEntry | None = None
    """Embeddings of the recipe's validation prompts and negative prompt (data/validation_prompts.py)."""
    validation_prompts_sha256: str | None = None
    """Hash of the prompt list those embeddings encode: a recipe with other prompts is told to re-cache."""
    dataset_identity: dict[str, Any] | None = None
    """The dataset list that built the cache (data/cache_identity.py); another list may not build into it."""

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
    if not (isinstance(entry.samples, int) and entry.samples >= 0 and isinstance(entry.bytes, int) and entry.bytes >= 0):
        raise ManifestError(f"{where}: samples and bytes must be non-negative integers")
    if not (isinstance(entry.sha256, str) and re.fullmatch(r"[0-9a-f]{64}", entry.sha256)):
        raise ManifestError(f"{where}: sha256 must be 64 lowercase hex digits")
    return entry


def parse_manifest(text: str, source: str = MANIFEST_NAME) -> ShardManifest:
    """Parse and check a manifest; paths outside the root are refused."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{source}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ManifestError(f"{source}: format {found!r}, expected {MANIFEST_FORMAT}")
    raw_shards = data.get("shards", [])
    if not isinstance(raw_shards, list):
        raise ManifestError(f"{source}: shards must be a list")
    shards = tuple(_entry(raw, f"{source}: shards[{i}]") for i, raw in enumerate(raw_shards))
    try:
        return ShardManifest(
            shards=shards,
            empty_prompt=_entry(data.get("empty_prompt"), f"{source}: empty_prompt"),
            encoders=dict(data.get("encoders", {})),
            vae={k: float(v) for k, v in data.get("vae", {}).items()},
            dtype=str(data["dtype"]),
            max_sequence_length=int(data["max_sequence_length"]),
            buckets=tuple(data.get("buckets", ())),
            rejected=int(data.get("rejected", 0)),
            validation_prompts=(_entry(data["validation_prompts"], f"{source}: validation_prompts")
                                if data.get("validation_prompts") else None),
            validation_prompts_sha256=data.get("validation_prompts_sha256"),
            dataset_identity=dict(data["dataset_identity"]) if data.get("dataset_identity") else None,
        )
    except KeyError as missing:
        raise ManifestError(f"{source}: missing {missing}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{source}: malformed ({exc})") from None


def read_manifest(store: Store) -> ShardManifest:
    if not store.exists(MANIFEST_NAME):
        raise ManifestError(f"{store.url_of(MANIFEST_NAME)}: no manifest (the cache is not built, or not finished)")
    return parse_manifest(store.read_bytes(MANIFEST_NAME).decode(), store.url_of(MANIFEST_NAME))


def write_manifest(store: Store, manifest: ShardManifest) -> None:
    store.write_bytes(MANIFEST_NAME, manifest.to_json().encode())
