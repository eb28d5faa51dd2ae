"""Does a checkpoint belong to this recipe? The recipe a checkpoint was trained with, compared
with the one resuming it.

Every checkpoint holds `recipe.yaml` (the resolved recipe that wrote it) and its sha256 in
COMPLETE. Resuming compares the two and refuses when what the weights and optimizer state
*are* would change underneath them:

- `model.*`: another base model or transformer subfolder;
- `data.*` and `seed`: other samples, buckets, dtype or order (a stream position means
  nothing in another cache) — except `data.stream.*` and `data.storage_options`, which say
  how the same cache is read;
- the optimizer: `train.optimizer*`, `train.adam_*`;
- LoRA: `train.lora*` and `lora*`, whenever such a section exists.

Everything else may change: step counts and epochs, learning rate and its schedule,
checkpointing, logging, validation, EMA settings, parallelism and world size.
`train.resume_allow_changes` lists keys (or sections, or `*`) whose change is deliberate.

Pure functions of plain mappings; no files, no torch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

import pydantic

from sd35dist.config.loading import ConfigError

GUARDED = ("seed", "model", "data", "train.optimizer*", "train.adam_*", "train.lora*", "lora*")
"""Recipe keys whose change refuses a resume (a pattern covers the keys beneath it too)."""
NOT_GUARDED = ("data.stream", "data.storage_options")
"""Keys under GUARDED that may change: how the same data are read, not which data."""


def matches(key: str, pattern: str) -> bool:
    """`pattern` names `key` itself, a section above it (`data` → `data.buckets`), or a glob of it."""
    if pattern == "*" or key == pattern or key.startswith((pattern + ".", pattern + "[")):
        return True
    if any(c in pattern for c in "*?["):
        # A glob names the keys it matches and everything beneath them.
        return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in _prefixes(key))
    return False


def _prefixes(key: str) -> Iterable[str]:
    for i, char in enumerate(key):
        if char in ".[":
            yield key[:i]
    yield key


def is_guarded(key: str) -> bool:
    return any(matches(key, p) for p in GUARDED) and not any(matches(key, p) for p in NOT_GUARDED)


def changed_keys(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value differs, or that only one side has, in the current recipe's order.

    Lists of mappings of equal length are compared item by item (`data.datasets[1].source`);
    any other list, or one that grew or shrank, is named whole (`data.datasets`).
    """
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        changed: list[str] = []
        for name in [*current, *(k for k in saved if k not in current)]:
            key = f"{prefix}.{name}" if prefix else str(name)
            if name in saved and name in current:
                changed += changed_keys(saved[name], current[name], key)
            else:
                changed.append(key)
        return changed
    if _records(saved) and _records(current) and len(saved) == len(current):
        return [key for index, (before, after) in enumerate(zip(saved, current))
                for key in changed_keys(before, after, f"{prefix}[{index}]")]
    return [] if saved == current else [prefix]


def _records(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, Mapping) for item in value)


def refused_changes(saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str] = ()) -> list[str]:
    """The guarded keys that changed since the checkpoint and are not in `allowed`."""
    allowed = list(allowed)
    return [key for key in changed_keys(saved, current)
            if is_guarded(key) and not any(matches(key, pattern) for pattern in allowed)]


def as_current_schema(saved: Mapping[str, Any], recipe_cls: type[pydantic.BaseModel]) -> Mapping[str, Any]:
    """The saved recipe with the fields a newer sd35dist added filled with their defaults, so an
    upgrade alone changes nothing; as saved when today's schema cannot read it."""
    try:
        return recipe_cls.model_validate(dict(saved)).model_dump(mode="json")
    except pydantic.ValidationError:
        return saved


def resume_refusal(source: str, checkpoint_name: str, refused: list[str]) -> ConfigError:
    keys = ", ".join(refused)
    return ConfigError(
        source, "train.resume",
        f"checkpoint {checkpoint_name} was trained with a different {keys}; to accept that, set "
        f"train.resume_allow_changes: [{keys}] (see docs/checkpoints.md), or start fresh with train.resume: none",
    )
