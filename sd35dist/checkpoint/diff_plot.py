"""The bar plot of `sd35dist inspect --diff`: each block's relative weight change ‖Δ‖/‖W_base‖."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from sd35dist.runtime.atomic_files import temporary_name


class Change(Protocol):
    group: str

    @property
    def relative(self) -> float: ...


def plot_changes(changes: Sequence[Change], png: Path, title: str) -> Path:
    """Write `png` (atomically): one bar per block, in model order."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    labels = [c.group.replace("joint block ", "") for c in changes]
    values = [0.0 if math.isnan(c.relative) else c.relative for c in changes]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.28 * len(changes) + 2), 3.6), dpi=110)
    try:
        axes.bar(range(len(values)), values, color="#3b75af")
        axes.set_xticks(range(len(values)), labels, rotation=90 if len(labels) > 12 else 0, fontsize=8)
        axes.set_xlabel("block (numbers: joint blocks)")
        axes.set_ylabel("‖Δ‖ / ‖W_base‖")
        axes.set_title(title, fontsize=10)
        axes.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        png.parent.mkdir(parents=True, exist_ok=True)
        temporary = temporary_name(png)
        try:
            figure.savefig(temporary, format="png")
            temporary.replace(png)
        finally:
            temporary.unlink(missing_ok=True)
    finally:
        plt.close(figure)
    return png
