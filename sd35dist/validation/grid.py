"""Labelled image grids (rows x columns, a title, row and column labels) as one PNG, with Pillow."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_WIDTH = 180
LINE_HEIGHT = 14
PAD = 4


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def labelled_grid(cells: Mapping[tuple[int, int], np.ndarray], row_labels: Sequence[str],
                  column_labels: Sequence[str], title: str = "") -> Image.Image:
    """One picture: cell (row, column) at its place, prompts down the left, settings across the top.

    Cells may differ in size (several resolutions): each column is as wide as its widest image,
    each row as tall as its tallest. Missing cells stay blank.
    """
    widths = [max((cells[r, c].shape[1] for r in range(len(row_labels)) if (r, c) in cells), default=64)
              for c in range(len(column_labels))]
    heights = [max((cells[r, c].shape[0] for c in range(len(column_labels)) if (r, c) in cells), default=64)
               for r in range(len(row_labels))]
    wrap = max(8, LABEL_WIDTH // 7)
    title_h = LINE_HEIGHT + 2 * PAD if title else 0
    header_lines = max(len(textwrap.wrap(label, max(4, w // 7)) or [""]) for label, w in zip(column_labels, widths))
    header_h = header_lines * LINE_HEIGHT + 2 * PAD
    row_h = [max(h, len(textwrap.wrap(label, wrap)) * LINE_HEIGHT) + PAD for label, h in zip(row_labels, heights)]
    size = (LABEL_WIDTH + sum(w + PAD for w in widths) + PAD, title_h + header_h + sum(row_h))
    canvas = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    if title:
        draw.text((PAD, PAD), title, fill="black", font=font)
    x = LABEL_WIDTH
    for label, width in zip(column_labels, widths):
        for i, line in enumerate(textwrap.wrap(label, max(4, width // 7))):
            draw.text((x, title_h + PAD + i * LINE_HEIGHT), line, fill="black", font=font)
        x += width + PAD
    y = title_h + header_h
    for r, (label, height) in enumerate(zip(row_labels, row_h)):
        for i, line in enumerate(textwrap.wrap(label, wrap)[: max(1, height // LINE_HEIGHT)]):
            draw.text((PAD, y + i * LINE_HEIGHT), line, fill="black", font=font)
        x = LABEL_WIDTH
        for c, width in enumerate(widths):
            if (r, c) in cells:
                canvas.paste(Image.fromarray(cells[r, c]), (x, y))
            x += width + PAD
        y += height
    return canvas
