"""Aspect buckets: which bucket an image belongs to and how it is resized and cropped into it.

Pure geometry, no pixels: the cache builder applies the returned plan with PIL. Sizes are
(width, height) in pixels, as PIL reports them.
"""

from __future__ import annotations

import dataclasses
import math
import random

# The 8 buckets of Stability AI's SD3.5 Large tutorial, all about one megapixel, (width, height).
SD35_BUCKETS: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1472, 704),
)

# With crop: false an image must already have its bucket's shape, up to this relative error
# in aspect ratio (one row or column of rounding at 1024 px).
NO_CROP_ASPECT_TOLERANCE = 0.01


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def nearest_bucket(size: tuple[int, int], buckets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's, on a log scale (so 2:1 and 1:2
    are equally far from 1:1); ties go to the earlier bucket in the list."""
    width, height = size
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


@dataclasses.dataclass(frozen=True)
class FitPlan:
    """How one image goes into its bucket: resize to `resized`, then crop `crop_box`."""

    bucket: tuple[int, int]
    original_size: tuple[int, int]
    resized: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    """(left, top, right, bottom) in the resized image; right - left, bottom - top == bucket."""

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left), the SDXL/SD3 micro-conditioning convention."""
        return self.crop_box[1], self.crop_box[0]

    @property
    def upscale(self) -> float:
        """How much the image is enlarged to cover its bucket; below 1 it is reduced."""
        return max(self.bucket[0] / self.original_size[0], self.bucket[1] / self.original_size[1])

    @property
    def cropped_fraction(self) -> float:
        """Share of the resized image's area that the crop cuts away (0 when it fits exactly)."""
        kept = self.bucket[0] * self.bucket[1]
        return 1.0 - kept / (self.resized[0] * self.resized[1])


def crop_offset(spare_width: int, spare_height: int, style: str, seed: int) -> tuple[int, int]:
    """(left, top) of the crop in an image `spare_*` pixels larger than its bucket."""
    if style == "center":
        return spare_width // 2, spare_height // 2
    if style == "corner":
        return 0, 0
    if style == "random":
        draw = random.Random(seed)
        return draw.randint(0, spare_width), draw.randint(0, spare_height)
    raise ValueError(f"crop_style {style!r} is not center, corner or random")


class ImageRejected(ValueError):
    """The image cannot go into any bucket under the dataset's policy; the message says why."""


def plan_fit(
    size: tuple[int, int],
    buckets: tuple[tuple[int, int], ...],
    *,
    crop: bool = True,
    minimum_image_size: int = 0,
    max_upscale: float = math.inf,
    max_crop_fraction: float = 1.0,
    crop_style: str = "center",
    crop_seed: int = 0,
) -> FitPlan:
    """Bucket, resize and crop plan for an image of `size` (width, height), as shown.

    The image is scaled so it covers the bucket (the shorter relative side fits exactly),
    then cropped: in the middle (`crop_style` center), at the top-left corner (corner), or at
    an offset drawn from `crop_seed` (random). With `crop=False` an image whose aspect ratio differs from its
    bucket's is rejected instead of cropped. Images whose shorter side is below
    `minimum_image_size`, that must be enlarged more than `max_upscale` times, or whose
    crop cuts away more than `max_crop_fraction` of their area are rejected.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageRejected(f"empty image {width}x{height}")
    if min(width, height) < minimum_image_size:
        raise ImageRejected(f"too small: {width}x{height}, shorter side < minimum_image_size {minimum_image_size}")
    bucket = nearest_bucket(size, buckets)
    bw, bh = bucket
    if not crop:
        mismatch = abs((width / height) / (bw / bh) - 1.0)
        if mismatch > NO_CROP_ASPECT_TOLERANCE:
            raise ImageRejected(
                f"aspect ratio {width}x{height} does not fit bucket {bucket_name(bucket)} and crop is false"
            )
    scale = max(bw / width, bh / height)
    # Round up so rounding never leaves the resized image smaller than the bucket.
    resized = (max(bw, math.ceil(width * scale - 1e-9)), max(bh, math.ceil(height * scale - 1e-9)))
    left, top = crop_offset(resized[0] - bw, resized[1] - bh, crop_style, crop_seed)
    crop_box = (left, top, left + bw, top + bh)
    plan = FitPlan(bucket=bucket, original_size=(width, height), resized=resized, crop_box=crop_box)
    if plan.upscale > max_upscale:
        raise ImageRejected(
            f"too small for bucket {bucket_name(bucket)}: {width}x{height} would be enlarged "
            f"{round(plan.upscale, 4):g}x, more than max_upscale {max_upscale:g}"
        )
    if plan.cropped_fraction > max_crop_fraction:
        raise ImageRejected(
            f"cropped too much: {width}x{height} in bucket {bucket_name(bucket)} loses {plan.cropped_fraction:.0%} "
            f"of its area, more than max_crop_fraction {max_crop_fraction:g}"
        )
    return plan

