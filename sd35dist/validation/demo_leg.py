"""`make demo`'s proof that training does something: the validation grids from the start and the end
of the tiny run, one report over its run directories, and the loss's moving average falling."""

from __future__ import annotations

import json
from pathlib import Path

from sd35dist.validation.report import loss_summary, read_runs, validation_grids, write_report


class DemoDidNotLearn(SystemExit):
    """The demo fails when the loss does not fall: a pipeline that runs but learns nothing is broken."""


def training_run_dirs(runs: Path, prefix: str = "tiny-train-") -> list[Path]:
    """The run directories of the last training from step 0 and of the submissions that resumed it."""
    dirs = sorted(p for p in runs.glob(f"{prefix}*") if (p / "metrics-rank00000.jsonl").is_file())
    chain: list[Path] = []
    for run_dir in dirs:
        first_line = (run_dir / "metrics-rank00000.jsonl").read_text().split("\n", 1)[0]
        if first_line and json.loads(first_line)["step"] == 1:
            chain = []
        chain.append(run_dir)
    return chain


def show_training(runs: Path, out: Path) -> Path:
    """Write the combined report to `out`, print where everything is; exit non-zero when the loss did not fall."""
    run_dirs = training_run_dirs(runs)
    if not run_dirs:
        raise DemoDidNotLearn("demo: no training metrics found under " + str(runs))
    report = write_report(run_dirs[-1], *run_dirs[:-1], out=out)
    summary = loss_summary(read_runs(run_dirs))
    grids = validation_grids(run_dirs)
    print("\nwhat training did:")
    for step, grid in grids:
        print(f"  validation grid, step {step:<4} {grid}")
    print(f"  report                      {report}  (plots in {out / 'plots'})")
    if summary is None:
        raise DemoDidNotLearn("demo: the run logged no loss")
    first, last, window = summary
    print(f"  loss, moving average over {window} steps: {first:.4f} at the start -> {last:.4f} at the end")
    if not last < first:
        raise DemoDidNotLearn(f"demo: the loss did not fall ({first:.4f} -> {last:.4f}): training learns nothing")
    return report
