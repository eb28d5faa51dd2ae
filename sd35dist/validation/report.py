"""`sd35dist report RUN_DIR`: plots from the metrics JSONL and the validation grids in one HTML page.

report.html is self-contained (plots and grids embedded as base64 PNG, no script, nothing
fetched), so it can be copied off a cluster and opened anywhere. The plots are also written
as PNG files beside it (plots/). The training job rewrites the report at every checkpoint
and at the end.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd35dist.config.cli_args import CommandLineParser, fail
from sd35dist.runtime.atomic_files import unwritable_reason, write_bytes_atomically, write_text_atomically

REPORT_NAME = "report.html"
PLOTS_DIR = "plots"
PLOTTED = (
    ("loss", "loss", "training loss (and its moving average)"),
    ("lr", "learning rate", "learning rate"),
    ("grad_norm", "gradient norm", "gradient norm before clipping"),
    ("images_per_second", "img/s", "throughput, images per second (all ranks)"),
    ("data_wait_fraction", "data-wait fraction", "share of the step spent waiting for data (slowest rank)"),
)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def default_window(count: int) -> int:
    return max(1, min(50, count // 5))


def read_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> rank 0's record, with the data-wait fraction of the slowest rank; a step logged twice
    (a run resumed into the same directory) keeps its last record."""
    steps: dict[int, dict[str, float]] = {}
    waits: dict[int, float] = {}
    for path in sorted(run_dir.glob("metrics-rank*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():  # a damaged line is skipped below
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if not _is_step_record(record):
                continue  # not a line the metrics log writes
            step = int(record["step"])
            waits[step] = max(waits.get(step, 0.0), float(record.get("data_wait_fraction", 0.0)))
            if record.get("rank", 0) == 0:
                steps[step] = record
    for step, record in steps.items():
        record["data_wait_fraction"] = waits[step]
    return dict(sorted(steps.items()))


def _is_step_record(record: Any) -> bool:
    """A line of MetricsLog: a mapping with an integer step and numbers where numbers go."""
    if not isinstance(record, dict) or type(record.get("step")) is not int:
        return False
    numbers = [record.get(key) for key, _, _ in PLOTTED if key in record] + [record.get("data_wait_fraction", 0.0)]
    return all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in numbers)


def read_runs(run_dirs: Sequence[Path]) -> dict[int, dict[str, float]]:
    """The metrics of a run continued over several run directories (each resume submits anew):
    a later directory's record of a step wins."""
    merged: dict[int, dict[str, float]] = {}
    for run_dir in run_dirs:
        merged.update(read_metrics(Path(run_dir)))
    return dict(sorted(merged.items()))


def loss_summary(records: dict[int, dict[str, float]]) -> tuple[float, float, int] | None:
    """(first, last) value of the loss's moving average and its window; None without metrics."""
    losses = [r["loss"] for r in records.values() if "loss" in r]
    if not losses:
        return None
    window = default_window(len(losses))
    averaged = moving_average(losses, window)
    return averaged[min(window, len(averaged)) - 1], averaged[-1], window


PLOT_MARGINS = dict(left=0.14, right=0.98, bottom=0.15, top=0.9)
"""Fixed margins of a 7 × 3.2 in plot: tight_layout measured every label first (a third of the drawing)."""


def write_plots(records: dict[int, dict[str, float]], out: Path) -> list[Path]:
    # The object API: no pyplot, its global figure registry or a backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    steps = list(records)
    written = []
    for key, label, title in PLOTTED:
        pairs = [(s, float(records[s][key])) for s in steps if key in records[s]]
        if not pairs:
            continue
        xs, ys = zip(*pairs)
        figure = Figure(figsize=(7, 3.2), dpi=100)
        FigureCanvasAgg(figure)
        figure.subplots_adjust(**PLOT_MARGINS)
        axes = figure.add_subplot()
        axes.plot(xs, ys, linewidth=1, alpha=0.45 if key == "loss" else 1.0, label=label)
        if key == "loss":
            window = default_window(len(ys))
            axes.plot(xs, moving_average(list(ys), window), linewidth=2, label=f"moving average ({window} steps)")
            axes.legend(loc="upper right")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(label)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        png = io.BytesIO()
        figure.savefig(png, format="png")
        path = out / f"{key}.png"
        write_bytes_atomically(path, png.getvalue())
        written.append(path)
    return written


def validation_grids(run_dirs: Sequence[Path]) -> list[tuple[int, Path]]:
    """(step, grid.png) in step order; a later directory's grid of a step wins."""
    grids: dict[int, Path] = {}
    for run_dir in run_dirs:
        for grid in (Path(run_dir) / "validation").glob("step-*/grid.png"):
            step = grid.parent.name.removeprefix("step-")
            if step.isdigit():
                grids[int(step)] = grid
    return sorted(grids.items())


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(run_dirs: Sequence[Path], records: dict[int, dict[str, float]], plots: list[Path],
                grids: list[tuple[int, Path]]) -> str:
    rows: list[tuple[str, Any]] = [("run directory", ", ".join(map(str, run_dirs))), ("steps logged", len(records))]
    if records:
        last = records[max(records)]
        rows += [("last step", max(records)), ("last loss", f"{last.get('loss', float('nan')):.4f}")]
        summary = loss_summary(records)
        if summary:
            rows.append((f"loss moving average ({summary[2]} steps), first → last", f"{summary[0]:.4f} → {summary[1]:.4f}"))
        rates = [r["images_per_second"] for r in records.values() if "images_per_second" in r]
        if rates:
            rows.append(("median img/s", f"{sorted(rates)[len(rates) // 2]:.2f}"))
    table = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>sd35dist run report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}img{max-width:100%;display:block;"
        "margin:0.5em 0 1.5em}th{text-align:left;padding-right:1em}</style></head><body>",
        f"<h1>Run report: {html.escape(Path(run_dirs[-1]).name)}</h1><table>{table}</table>",
        "<h2>Training</h2>" + ("".join(_img(p, p.stem) for p in plots) or "<p>no metrics yet</p>"),
        "<h2>Validation images</h2>"
        + ("".join(f"<h3>step {step}</h3>{_img(path, f'step {step}')}" for step, path in grids)
           or "<p>no validation images (recipe section <code>validation:</code>)</p>"),
        "</body></html>\n",
    ]
    return "\n".join(parts)


def write_report(run_dir: Path, *earlier: Path, out: Path | None = None) -> Path:
    """Plots (OUT/plots/*.png) and OUT/report.html, OUT defaulting to `run_dir`; `earlier` run
    directories of the same run (before a resume) come first. Returns the report's path."""
    run_dirs = [Path(p) for p in (*earlier, run_dir)]
    out = Path(out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = read_runs(run_dirs)
    plots = write_plots(records, out / PLOTS_DIR) if records else []
    page = render_html(run_dirs, records, plots, validation_grids(run_dirs))
    write_text_atomically(out / REPORT_NAME, page)
    return out / REPORT_NAME


def _out_problem(out: Path, force: bool) -> str | None:
    """Why `--out` may not be written: a file, or a report (or its plots) that only --force replaces."""
    if out.exists() and not out.is_dir():
        return "is a file: give a directory for report.html and plots/"
    existing = [p for p in (out / REPORT_NAME, *(out / PLOTS_DIR / f"{key}.png" for key, _, _ in PLOTTED)) if p.exists()]
    if existing and not force:
        return f"{existing[0]} already exists: pass --force to replace the report, or choose another --out"
    return unwritable_reason(out / REPORT_NAME)


def argument_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="sd35dist report", description="plots and validation grids of a run as report.html")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (metrics-rank*.jsonl, validation/), oldest first when a run was resumed")
    parser.add_argument("--out", help="where report.html and plots/ go (default: the last RUN_DIR)")
    parser.add_argument("--force", action="store_true", help="let --out replace an existing report.html and plots")
    return parser


def main(argv: list[str]) -> int:
    args = argument_parser().parse_args(argv)
    run_dirs = [Path(p) for p in args.run_dirs]
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            return fail(f"{run_dir}: no such run directory")
    if not read_runs(run_dirs) and not validation_grids(run_dirs):
        return fail(f"{', '.join(map(str, run_dirs))}: no training metrics (metrics-rank*.jsonl lines) and no "
                    "validation grids: not a run directory of sd35dist train")
    if args.out:
        problem = _out_problem(Path(args.out), args.force)
    else:
        problem = unwritable_reason(run_dirs[-1] / REPORT_NAME)
    if problem:
        return fail(f"--out {args.out or run_dirs[-1]}: {problem}")
    path = write_report(run_dirs[-1], *run_dirs[:-1], out=Path(args.out) if args.out else None)
    print(f"report {path} (plots in {path.parent / PLOTS_DIR})")
    return 0
