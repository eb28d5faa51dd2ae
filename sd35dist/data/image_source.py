"""Images → pixel tensors, and folder datasets → their images.

Listing a folder *source* is fine (it happens once, while building); the cache itself is
never listed by readers. WebDataset and parquet datasets hand their images over in memory
(data/webdataset_source.py, data/parquet_source.py) or as paths. Every problem with one image
becomes a `Rejected` with a reason.

Pixels are taken as a viewer shows them: the EXIF orientation is applied before anything
else (bucketing included), 16-bit and float images are scaled to 8 bits rather than clipped,
and transparency is composited on the dataset's `alpha_background`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import posixpath
import re
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sd35dist.config.recipe import DatasetSection
from sd35dist.data.buckets import FitPlan, ImageRejected, plan_fit
from sd35dist.data.captions import CaptionMissing, caption_variants, resolve_caption

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
EXIF_ORIENTATION = 0x0112
QUARTER_TURN_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations that show the stored image turned by 90°: width and height swap."""
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


@dataclasses.dataclass(frozen=True)
class SourceImage:
    """One image of a dataset: where its bytes and its caption are, or the bytes and caption themselves."""

    dataset: str
    path: str
    """Stable name within the dataset: the path relative to a folder's root; TAR/KEY in a webdataset;
    FILE/ROW in a parquet dataset."""
    url: str | None
    """Where the image's bytes are (None when `data` holds them)."""
    caption_file: str | None
    data: bytes | None = dataclasses.field(default=None, repr=False, compare=False)
    """The image's bytes when its container held them (a tar member, a parquet binary column)."""
    caption: str | None = None
    """The caption when its container held it (a webdataset .txt/.json, a parquet column)."""
    caption_origin: str | None = None
    """Where a missing caption should have been, for the rejection reason (default: NAME.txt)."""
    size_hint: tuple[int, int] | None = None
    """(width, height) from a parquet dataset's width/height columns: bucketed without decoding."""

    @property
    def stem(self) -> str:
        """The file name without extension (caption_strategy filename)."""
        return posixpath.splitext(posixpath.basename(self.url or self.path))[0]


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


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as a viewer shows the image: EXIF orientations 5–8 swap the sides."""
    width, height = image.size
    if image.getexif().get(EXIF_ORIENTATION, 1) in QUARTER_TURN_ORIENTATIONS:
        return height, width
    return width, height


def to_eight_bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale → 8-bit "L", scaled rather than clipped.

    PIL's own conversion clips these modes at 255, so a full-range 16-bit image turns white.
    "I" (32-bit) is read as 16-bit data, which is what PNG and TIFF decoders put in it; "F"
    follows the float-image convention of 0.0 = black and 1.0 = white.
    """
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image, dtype=np.float64) / 257.0
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64) * 255.0
    else:
        return image
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode → "RGB", with transparency (alpha band or palette/colour key) composited on `background`."""
    image = to_eight_bit(image)
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    return image.convert("RGB")


def fit_for_dataset(size: tuple[int, int], dataset: DatasetSection, buckets: tuple[tuple[int, int], ...],
                    crop_key: str = "") -> FitPlan:
    """The fit under the dataset's policy; `crop_key` (seed, dataset, path) places a random crop."""
    return plan_fit(
        size,
        buckets,
        crop=dataset.crop,
        minimum_image_size=dataset.minimum_image_size,
        max_upscale=dataset.max_upscale,
        max_crop_fraction=dataset.max_crop_fraction,
        crop_style=dataset.crop_style,
        crop_seed=int.from_bytes(hashlib.sha256(crop_key.encode()).digest()[:8], "little"),
    )


def prepare_image(
    image: SourceImage,
    dataset: DatasetSection,
    buckets: tuple[tuple[int, int], ...],
    storage_options: dict[str, Any],
    seed: int,
) -> PreparedImage | Rejected:
    """Read, check, caption, resize and crop one image; a Rejected says why it cannot be used."""
    try:
        blob = image.data if image.data is not None else _read(image.url, storage_options)
        with Image.open(io.BytesIO(blob)) as opened:
            opened.load()  # decode fully now: truncated files fail here, not later
            upright = ImageOps.exif_transpose(opened)
        if image.size_hint is not None and upright.size != image.size_hint:
            width, height = image.size_hint
            raise ImageRejected(f"the width/height columns say {width}x{height}, the image is "
                                f"{upright.size[0]}x{upright.size[1]}")
        fit = fit_for_dataset(upright.size, dataset, buckets, f"crop\0{seed}\0{image.dataset}\0{image.path}")
        rgb = to_rgb(upright, dataset.alpha_background)
        text = image.caption
        if text is None and image.caption_file:
            text = _read(image.caption_file, storage_options).decode("utf-8", errors="replace")
        caption = resolve_caption(
            dataset.caption_strategy,
            stem=image.stem,
            textfile_content=text,
            instance_prompt=dataset.instance_prompt,
            caption_origin=image.caption_origin,
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
    """(width, height) as shown, from the width/height columns or the file header only; None when it
    is not a readable image."""
    if image.size_hint is not None:
        return image.size_hint
    try:
        if image.data is not None:
            with Image.open(io.BytesIO(image.data)) as opened:
                return displayed_size(opened)
        with fsspec.open(image.url, "rb", **storage_options) as handle:
            with Image.open(handle) as opened:
                return displayed_size(opened)
    except Exception:  # noqa: BLE001 — reported with its real reason when the image is prepared
        return None
