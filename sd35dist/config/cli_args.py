"""Command-line arguments every `sd35dist` command parses the same way: a bad one is one line, exit 2.

argparse answers a usage mistake with its usage block and then the error (several lines on
stderr); `CommandLineParser` prints only `error: PROG: argument --x: what is wrong (see PROG -h)`.
The value types below refuse what the commands would otherwise take and fail on late, after
loading a model or allocating an image (a seed torch.Generator cannot hold, a NaN guidance
weight, a size of 0): each says the bound in the message. Torch-free: the launcher uses it too.
"""

from __future__ import annotations

import argparse
import math
import sys
import types
from collections.abc import Callable
from typing import NoReturn

SEED_MAX = 2**64 - 1
"""torch.Generator.manual_seed takes 0 … 2^64 − 1 (negative seeds wrap; larger ones overflow)."""
PIXEL_MULTIPLE = 16
"""Image sides are multiples of the VAE's 8 × the MMDiT's patch 2 (config/input_checks.py reads the model's own)."""


class CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2 (help is unchanged)."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(2, f"error: {self.prog}: {text} (see {self.prog} --help)\n")


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make another library's parser (torchrun's) answer usage mistakes in one line too."""
    parser.error = types.MethodType(CommandLineParser.error, parser)  # type: ignore[method-assign]
    return parser


def bounded_int(low: int | None = None, high: int | None = None, what: str = "an integer") -> Callable[[str], int]:
    """An argparse type: an integer within [low, high] (None: unbounded on that side)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_bounds(low, high)}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in messages it writes itself
    return parse


def bounded_float(low: float | None = None, high: float | None = None, what: str = "a number") -> Callable[[str], float]:
    """An argparse type: a finite number within [low, high] (nan and inf are refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_bounds(low, high)}, got {text}")
        return value

    parse.__name__ = what
    return parse


def _bounds(low: float | None, high: float | None) -> str:
    if high is None:
        return f"≥ {low:g}" if isinstance(low, float) else f"≥ {low}"
    if low is None:
        return f"≤ {high:g}" if isinstance(high, float) else f"≤ {high}"
    return f"between {low} and {high}"


positive_int = bounded_int(1, what="a positive integer")
seed = bounded_int(0, SEED_MAX, what="a seed (0 … 2^64-1)")
finite_float = bounded_float(what="a finite number")
non_negative_float = bounded_float(0.0, what="a number ≥ 0")
fraction = bounded_float(0.0, 1.0, what="a fraction")


def image_side(text: str) -> int:
    """An argparse type: an image side in pixels, a positive multiple of 16 (the model's limit is checked later)."""
    value = bounded_int(1, what="a size in pixels")(text)
    if value % PIXEL_MULTIPLE:
        raise argparse.ArgumentTypeError(f"must be a multiple of {PIXEL_MULTIPLE} pixels, got {text}")
    return value


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated non-negative integers (`400,800`)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated steps such as 400,800, got {text!r}")
    return [int(part) for part in parts]


def key_value(text: str) -> tuple[str, str]:
    """An argparse type: KEY=VALUE with a non-empty key."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def fail(message: str, out=None) -> int:
    """Print a user's mistake as one `error:` line; returns exit status 2."""
    stream = out or sys.stderr
    stream.write(f"error: {' '.join(message.split())}\n")
    stream.flush()
    return 2
