"""Hugging Face model ids in `model.pretrained`: `org/name`, `org/name@revision`.

A value is a hub id when no local directory of that name exists and it has the hub's shape
(one `/`, the hub's allowed characters), as diffusers' `from_pretrained` decides. Pure: the
launcher (launcher/hub_models.py) resolves ids into the Hugging Face cache on the submit host;
ranks only ever see local paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[A-Za-z0-9._/-]{{1,255}}))?$")


@dataclass(frozen=True)
class HubId:
    repo: str
    """org/name."""
    revision: str | None
    """A branch, tag or commit; None: the repository's default branch (main)."""

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(text: str) -> HubId | None:
    """The hub id `text` spells, or None when it is not one (a path, a URL, anything else)."""
    match = _HUB_ID.match(text.strip())
    if match is None or ".." in match.group("repo") or "--" in match.group("repo"):
        return None
    return HubId(match.group("repo"), match.group("revision"))


def hub_id_of(pretrained: str, base: Path | None = None) -> HubId | None:
    """`model.pretrained` as a hub id, unless a local directory of that name exists (relative to `base`)."""
    hub_id = parse_hub_id(pretrained)
    if hub_id is None:
        return None
    local = Path(pretrained).expanduser()
    if (base / local if base is not None and not local.is_absolute() else local).exists():
        return None
    return hub_id
