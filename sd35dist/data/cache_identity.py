"""A cache belongs to the dataset list that built it.

`sd35dist cache` resumes into whatever `data.cache_url` holds, so pointing a second recipe at a
first one's cache used to rewrite its shards, report and manifest — and recipe A then trained on
B's data without a word. The manifest (and each rank's build journal, while a build is under
way) now records the identity of the datasets: every dataset entry (sources, captions, repeats,
fitting), the buckets, the caption-shuffle seed, the dtype and the T5 length — everything that
shapes a sample. Building another identity into the same place is refused before anything is
written; building the same one again resumes or rebuilds as before.
"""

from __future__ import annotations

import json
from typing import Any

from sd35dist.config.recipe import DataSection
from sd35dist.data.manifest import MANIFEST_NAME, ManifestError, read_manifest
from sd35dist.data.storage import Store

IDENTITY_KEY = "dataset_identity"
JOURNAL_DIR = "progress"
SHOWN_DIFFERENCES = 3


def dataset_identity(data: DataSection) -> dict[str, Any]:
    """What decides a cache's samples besides the encoders, as plain JSON data."""
    return {
        "datasets": [dataset.model_dump(mode="json") for dataset in data.datasets],
        "buckets": [list(bucket) for bucket in data.buckets],
        "shuffle_seed": data.shuffle_seed,
        "cache_dtype": data.cache_dtype,
        "max_sequence_length": data.max_sequence_length,
    }


def differences(built: Any, wanted: Any, path: str = "") -> list[str]:
    """Dotted paths where two identities differ (`datasets.0.source`), in document order."""
    if isinstance(built, dict) and isinstance(wanted, dict):
        return [d for key in dict.fromkeys([*built, *wanted])
                for d in differences(built.get(key), wanted.get(key), f"{path}.{key}" if path else str(key))]
    if isinstance(built, list) and isinstance(wanted, list):
        if len(built) != len(wanted):
            return [f"{path} ({len(built)} entries, now {len(wanted)})"]
        return [d for index, (a, b) in enumerate(zip(built, wanted)) for d in differences(a, b, f"{path}.{index}")]
    return [] if built == wanted else [path]


def foreign_cache(store: Store, identity: dict[str, Any]) -> str | None:
    """Why the cache at `store` belongs to another dataset list, or None when it is this one's (or empty)."""
    if store.exists(MANIFEST_NAME):
        try:
            built = read_manifest(store).dataset_identity
        except ManifestError as err:
            return f"its manifest cannot be read ({err})"
        if built is None:
            return "it was built by an sd35dist that did not record which datasets built it"
        return _describe(differences(built, identity))
    for name in store.list_dir(JOURNAL_DIR):  # a build under way (or interrupted) has no manifest yet
        try:
            built = json.loads(store.read_bytes(f"{JOURNAL_DIR}/{name}")).get(IDENTITY_KEY)
        except (ValueError, AttributeError, OSError):
            built = None
        if built is None:
            return f"a build journal ({JOURNAL_DIR}/{name}) records no dataset list"
        problem = _describe(differences(built, identity))
        if problem:
            return problem + " (a build of it is under way or was interrupted)"
    return None


def _describe(paths: list[str]) -> str | None:
    if not paths:
        return None
    shown = ", ".join(paths[:SHOWN_DIFFERENCES]) + (f" and {len(paths) - SHOWN_DIFFERENCES} more"
                                                    if len(paths) > SHOWN_DIFFERENCES else "")
    return f"it was built from another dataset list (differs in {shown})"
