"""Images as a viewer shows them: orientation, bit depth, transparency, size and crop limits.

Every image is generated here and written to a real file, then read back through
`prepare_image` (the cache builder's per-image step) or its pure helpers.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sd35dist.config import ConfigError, load_recipe
from sd35dist.config.recipe import DatasetSection
from sd35dist.data.buckets import ImageRejected, plan_fit
from sd35dist.data.image_source import (
    PreparedImage,
    Rejected,
    SourceImage,
    displayed_size,
    prepare_image,
    read_image_size,
    to_rgb,
)
from sd35dist.demo.dataset import DEMO_BUCKETS

pytestmark = pytest.mark.unit

BUCKETS = tuple(tuple(b) for b in DEMO_BUCKETS)  # 64x64, 80x48, 48x80
RED, BLUE = (255, 0, 0), (0, 0, 255)
EXIF_ORIENTATION = 0x0112


def dataset(**fields) -> DatasetSection:
    return DatasetSection(id="d", source="/unused", caption_strategy="instance_prompt", instance_prompt="k4s4", **fields)


def prepare(path: Path, **fields) -> PreparedImage | Rejected:
    image = SourceImage("d", path.name, str(path), None)
    return prepare_image(image, dataset(**fields), BUCKETS, {}, 0)


def eight_bit(prepared: PreparedImage) -> np.ndarray:
    """[H, W, 3] uint8 back from the [-1, 1] tensor."""
    return np.rint((prepared.pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.int64)


def png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3]); Pillow cannot write 16-bit colour PNGs."""
    height, width = values.shape[:2]
    colour_type = 0 if values.ndim == 2 else 2
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


# ---- orientation -------------------------------------------------------------------------------


def upright_red_over_blue(size: tuple[int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, width, height // 2))
    return image


def write_rotated_jpeg(path: Path) -> Path:
    """Stored 120x80 with Orientation 6 (turn 90° clockwise to view): shown 80x120, red on top."""
    stored = upright_red_over_blue((80, 120)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored.save(path, quality=95, exif=exif)
    return path


def test_exif_orientation_is_applied_before_bucketing(tmp_path):
    path = write_rotated_jpeg(tmp_path / "phone.jpg")
    with Image.open(path) as opened:
        assert opened.size == (120, 80)  # as stored
        assert displayed_size(opened) == (80, 120)
    assert read_image_size(SourceImage("d", "phone.jpg", str(path), None), {}) == (80, 120)
    prepared = prepare(path)
    assert isinstance(prepared, PreparedImage), prepared
    assert prepared.fit.bucket == (48, 80)  # portrait, as the photographer sees it
    assert prepared.fit.original_size == (80, 120)
    pixels = eight_bit(prepared)
    top, bottom = pixels[:30].reshape(-1, 3).mean(0), pixels[-30:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


# ---- bit depth -----------------------------------------------------------------------------------


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(64, 64), dtype=np.uint16)
    values[0, :4] = (0, 65535, 32896, 257)
    prepared = prepare(png16(tmp_path / "grey16.png", values))
    assert isinstance(prepared, PreparedImage), prepared
    expected = np.rint(values / 257.0).astype(np.int64)
    pixels = eight_bit(prepared)  # a 64x64 image in the 64x64 bucket: no resampling
    assert (pixels == expected[..., None]).all()
    assert pixels[0, :4, 0].tolist() == [0, 255, 128, 1]
    assert 100 < pixels.mean() < 155  # uniform 16-bit noise stays mid-grey, not white


def test_sixteen_bit_colour_png_keeps_its_colours(tmp_path):
    values = np.zeros((64, 64, 3), dtype=np.uint16)
    values[:32] = (65535, 32896, 0)
    values[32:] = (1000, 20000, 60000)
    pixels = eight_bit(prepare(png16(tmp_path / "rgb16.png", values)))
    # Pillow decodes 16-bit colour to its high byte: within one step of round(v / 257).
    assert np.abs(pixels[:32] - [255, 128, 0]).max() <= 1
    assert np.abs(pixels[32:] - np.rint(np.array([1000, 20000, 60000]) / 257)).max() <= 1


def test_32_bit_integer_and_float_tiffs_are_scaled(tmp_path):
    ramp = np.tile(np.arange(64, dtype=np.int32) * 1040, (64, 1))  # 0 … 65520
    Image.fromarray(ramp).save(tmp_path / "int.tif")
    pixels = eight_bit(prepare(tmp_path / "int.tif"))
    assert (pixels[..., 0] == np.rint(ramp / 257.0)).all()
    floats = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (64, 1))
    Image.fromarray(floats).save(tmp_path / "float.tif")
    pixels = eight_bit(prepare(tmp_path / "float.tif"))
    assert (pixels[..., 0] == np.rint(floats * 255.0)).all()
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (64, 64), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=100)
    Image.new("CMYK", (64, 64), (0, 0, 0, 128)).save(tmp_path / "grey.jpg", quality=100)
    assert np.abs(eight_bit(prepare(tmp_path / "cyan.jpg")) - [0, 255, 255]).max() <= 3
    assert np.abs(eight_bit(prepare(tmp_path / "grey.jpg")) - [127, 127, 127]).max() <= 3


# ---- transparency ------------------------------------------------------------------------------


def half_transparent(mode: str) -> Image.Image:
    """Left half opaque, right half fully transparent (with black stored under it)."""
    if mode == "RGBA":
        image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        image.paste((200, 30, 30, 255), (0, 0, 32, 64))
    elif mode == "LA":
        image = Image.new("LA", (64, 64), (0, 0))
        image.paste((90, 255), (0, 0, 32, 64))
    else:
        image = Image.new("P", (64, 64), 0)
        image.putpalette([0, 0, 0, 200, 30, 30])
        image.paste(1, (0, 0, 32, 64))
        image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(("mode", "opaque"), [("RGBA", (200, 30, 30)), ("LA", (90, 90, 90)), ("P", (200, 30, 30))])
@pytest.mark.parametrize(("background", "expected"), [(None, (255, 255, 255)), ("#102030", (16, 32, 48)),
                                                      ([0, 128, 0], (0, 128, 0))])
def test_transparency_is_composited_on_the_recipes_background(tmp_path, mode, opaque, background, expected):
    half_transparent(mode).save(tmp_path / "cutout.png")
    fields = {} if background is None else {"alpha_background": background}
    pixels = eight_bit(prepare(tmp_path / "cutout.png", **fields))
    assert (pixels[:, :32] == opaque).all()
    assert (pixels[:, 32:] == expected).all()


def test_half_transparent_pixels_blend_with_the_background():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(image, (255, 255, 255)).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(image, (0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)


def test_alpha_background_in_a_recipe(tmp_path):
    def recipe_with(colour) -> Path:
        path = tmp_path / "recipe.yaml"
        data = {"cache_url": "cache", "datasets": [{"id": "d", "source": "img", "alpha_background": colour}]}
        path.write_text(yaml.safe_dump({"name": "r", "model": {"pretrained": "m"}, "data": data, "output": {"dir": "o"}}))
        return path

    assert load_recipe(recipe_with("black")).data.datasets[0].alpha_background == (0, 0, 0)
    assert load_recipe(recipe_with("#FF8000")).data.datasets[0].alpha_background == (255, 128, 0)
    assert load_recipe(recipe_with([1, 2, 3])).data.datasets[0].alpha_background == (1, 2, 3)
    for bad in ("not-a-colour", [0, 300, 0], "#ff000080"):
        with pytest.raises(ConfigError) as info:
            load_recipe(recipe_with(bad))
        assert "data.datasets.0.alpha_background" in str(info.value) and "\n" not in str(info.value)


# ---- size and crop limits ------------------------------------------------------------------------


def test_a_tiny_image_is_rejected_by_default(tmp_path):
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "icon.png")
    outcome = prepare(tmp_path / "icon.png")
    assert isinstance(outcome, Rejected)
    assert "enlarged 8x" in outcome.reason and "max_upscale 2" in outcome.reason
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "half.png")  # exactly 2x: allowed
    assert isinstance(prepare(tmp_path / "half.png"), PreparedImage)
    assert isinstance(prepare(tmp_path / "icon.png", max_upscale=8), PreparedImage)


def test_a_huge_photo_is_reduced(tmp_path):
    photo = Image.new("RGB", (6000, 4000), BLUE)
    photo.paste(RED, (0, 0, 6000, 2000))
    photo.save(tmp_path / "huge.jpg", quality=80)
    del photo
    prepared = prepare(tmp_path / "huge.jpg")
    assert isinstance(prepared, PreparedImage), prepared
    assert prepared.fit.bucket == (80, 48) and prepared.pixels.shape == (3, 48, 80)
    assert prepared.fit.upscale == pytest.approx(80 / 6000)
    assert prepared.fit.cropped_fraction == pytest.approx(0.1, abs=0.02)
    pixels = eight_bit(prepared)
    assert pixels[:20, :, 0].min() > 200 and pixels[-20:, :, 2].min() > 200


def test_a_panorama_that_would_lose_most_of_its_width_is_rejected(tmp_path):
    Image.new("RGB", (1000, 50), (40, 90, 200)).save(tmp_path / "pano.png")  # 20:1
    outcome = prepare(tmp_path / "pano.png")
    assert isinstance(outcome, Rejected)
    assert "loses 92% of its area" in outcome.reason and "max_crop_fraction 0.5" in outcome.reason
    kept = prepare(tmp_path / "pano.png", max_crop_fraction=0.95)
    assert isinstance(kept, PreparedImage) and kept.fit.cropped_fraction == pytest.approx(0.917, abs=0.001)


def test_upscale_and_cropped_fraction_of_a_plan():
    plan = plan_fit((128, 77), BUCKETS)
    assert plan.bucket == (80, 48) and plan.resized == (80, 49)
    assert plan.upscale == pytest.approx(80 / 128)
    assert plan.cropped_fraction == pytest.approx(1 - 48 / 49)
    assert plan_fit((32, 32), BUCKETS).upscale == 2.0 and plan_fit((64, 64), BUCKETS).cropped_fraction == 0.0
    with pytest.raises(ImageRejected, match="max_upscale 1.5"):
        plan_fit((40, 40), BUCKETS, max_upscale=1.5)
    with pytest.raises(ImageRejected, match="max_crop_fraction 0"):
        plan_fit((128, 77), BUCKETS, max_crop_fraction=0.0)


def test_recipe_defaults_limit_upscale_and_crop():
    defaults = dataset()
    assert defaults.max_upscale == 2.0 and defaults.max_crop_fraction == 0.5
    assert defaults.alpha_background == (255, 255, 255)


# ---- unreadable files -----------------------------------------------------------------------------


def test_files_that_are_not_images_say_why(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    assert prepare(tmp_path / "notes.png").reason == "unreadable: not an image file PIL can decode"
    upright_red_over_blue((64, 64)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:120])
    assert "truncated" in prepare(tmp_path / "cut.png").reason
