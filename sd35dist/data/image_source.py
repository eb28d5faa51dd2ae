"""Image datasets → work items (one per image and repeat), and images → pixel tensors.

Listing a *source* directory is fine (it happens once, while building); the cache itself is
never listed by readers. Every problem with one image becomes a `Rejected` with a reason.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
import re
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sd35dist.config.recipe import DatasetSection
from sd35dist.data.buckets import FitPlan, ImageRejected, plan_fit
from sd35dist.data.captions import CaptionMissing, caption_variants, resolve_caption

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class SourceImage:
    dataset: str
    path: str
    """Path relative to the dataset's source root (stable across machines)."""
    url: str
    caption_file: str | None


@dataclasses.dataclass(frozen=True)
class Rejected:
    dataset: str
    image: str
    reason: str


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    """An image that passed every check: its pixels in its bucket, and one caption per repeat."""

    source: SourceImage
    fit: FitPlan
    pixels: torch.Tensor
    """[3, H, W] float32 in [-1, 1]."""
    captions: tuple[str, ...]


def list_images(dataset: DatasetSection, storage_options: dict[str, Any]) -> list[SourceImage]:
    """Every image of a dataset, sorted by relative path (the same order on every rank)."""
    fs, root = fsspec.core.url_to_fs(dataset.source, **storage_options)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise FileNotFoundError(f"dataset {dataset.id}: source {dataset.source} is not a directory")
    files = set(fs.find(root))
    protocol = dataset.source.split("://", 1)[0] + "://" if "://" in dataset.source else ""
    out = []
    for full in sorted(files):
        if not full.lower().endswith(IMAGE_EXTENSIONS):
            continue
        relative = posixpath.relpath(full, root)
        caption = posixpath.splitext(full)[0] + ".txt"
        url = f"{protocol}{full}" if protocol else full
        caption_url = (f"{protocol}{caption}" if protocol else caption) if caption in files else None
        out.append(SourceImage(dataset.id, relative, url, caption_url))
    return out


def _read(url: str, storage_options: dict[str, Any]) -> bytes:
    with fsspec.open(url, "rb", **storage_options) as handle:
        return handle.read()


def prepare_image(
    image: SourceImage,
    dataset: DatasetSection,
    buckets: tuple[tuple[int, int], ...],
    storage_options: dict[str, Any],
    seed: int,
) -> PreparedImage | Rejected:
    """Read, check, caption, resize and crop one image; a Rejected says why it cannot be used."""
    try:
        with Image.open(io.BytesIO(_read(image.url, storage_options))) as opened:
            opened.load()  # decode fully now: truncated files fail here, not later
            fit = plan_fit(opened.size, buckets, crop=dataset.crop, minimum_image_size=dataset.minimum_image_size)
            rgb = opened.convert("RGB")
        text = _read(image.caption_file, storage_options).decode("utf-8", errors="replace") if image.caption_file else None
        caption = resolve_caption(
            dataset.caption_strategy,
            stem=posixpath.splitext(posixpath.basename(image.path))[0],
            textfile_content=text,
            instance_prompt=dataset.instance_prompt,
        )
    except (CaptionMissing, ImageRejected) as exc:
        return Rejected(image.dataset, image.path, str(exc))
    except UnidentifiedImageError:
        return Rejected(image.dataset, image.path, "unreadable: not an image file PIL can decode")
    except Exception as exc:  # noqa: BLE001 — any decode failure of one file must not stop the build
        # Reasons go into report.json, which must not differ between equal builds: drop addresses.
        message = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc))
        return Rejected(image.dataset, image.path, f"unreadable: {type(exc).__name__}: {message}")
    resized = rgb.resize(fit.resized, Image.Resampling.LANCZOS).crop(fit.crop_box)
    array = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    captions = caption_variants(
        caption,
        repeats=dataset.repeats,
        shuffle=dataset.shuffle_captions,
        keep_tokens=dataset.keep_tokens,
        seed=seed,
        key=f"{image.dataset}/{image.path}",
    )
    return PreparedImage(image, fit, pixels, tuple(captions))


def read_image_size(image: SourceImage, storage_options: dict[str, Any]) -> tuple[int, int] | None:
    """(width, height) from the file header only; None when it is not a readable image."""
    try:
        with fsspec.open(image.url, "rb", **storage_options) as handle:
            with Image.open(handle) as opened:
                return opened.size
    except Exception:  # noqa: BLE001 — reported with its real reason when the image is prepared
        return None
