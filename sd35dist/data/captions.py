"""Captions: where they come from, and the per-repeat token shuffle of SimpleTuner users.

Pure functions. A "variant" is the caption used for one repeat of an image: repeat 0 keeps
the caption as written, later repeats shuffle the comma-separated tokens after the first
`keep_tokens`, deterministically from (seed, image key, repeat).
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

CaptionStrategy = Literal["textfile", "filename", "instance_prompt"]


class CaptionMissing(ValueError):
    """The dataset's strategy needs a caption this image does not have."""


def caption_from_filename(stem: str) -> str:
    """`a_red-car (2)` → `a red car`: separators become spaces, a trailing copy counter goes."""
    text = stem.replace("_", " ").replace("-", " ")
    if text.endswith(")") and "(" in text:
        head, _, tail = text.rpartition("(")
        if tail[:-1].strip().isdigit():
            text = head
    return " ".join(text.split())


def resolve_caption(
    strategy: CaptionStrategy,
    *,
    stem: str,
    textfile_content: str | None,
    instance_prompt: str | None,
    caption_origin: str | None = None,
) -> str:
    """The caption of one image under the dataset's strategy."""
    if strategy == "instance_prompt":
        if not instance_prompt:
            raise CaptionMissing("caption_strategy instance_prompt needs instance_prompt")
        return instance_prompt.strip()
    if strategy == "filename":
        caption = caption_from_filename(stem)
        if not caption:
            raise CaptionMissing(f"file name {stem!r} gives an empty caption")
        return caption
    origin = caption_origin or f"caption file {stem}.txt"
    if textfile_content is None:
        raise CaptionMissing(f"no {origin}")
    # Caption files often hold one caption per line; the first non-empty one is used.
    for line in textfile_content.splitlines():
        if line.strip():
            return line.strip()
    raise CaptionMissing(f"{origin} is empty")


def _rng(seed: int, key: str, repeat: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}\0{key}\0{repeat}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def shuffle_tokens(caption: str, *, keep_tokens: int, seed: int, key: str, repeat: int) -> str:
    """Shuffle the comma-separated tokens after the first `keep_tokens`; the first stay in place."""
    tokens = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tokens[:keep_tokens], tokens[keep_tokens:]
    _rng(seed, key, repeat).shuffle(tail)
    return ", ".join(head + tail)


def caption_variants(
    caption: str, *, repeats: int, shuffle: bool, keep_tokens: int, seed: int, key: str
) -> list[str]:
    """One caption per repeat: the original first, shuffled variants after it when `shuffle`."""
    out = [caption]
    for repeat in range(1, repeats):
        out.append(shuffle_tokens(caption, keep_tokens=keep_tokens, seed=seed, key=key, repeat=repeat) if shuffle else caption)
    return out
