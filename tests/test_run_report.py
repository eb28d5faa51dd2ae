"""`sd35dist report`: plots from the metrics JSONL, validation grids in step order, nothing fetched."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd35dist.cli import main as sd35dist_main
from sd35dist.validation.report import loss_summary, moving_average, read_metrics, read_runs

pytestmark = pytest.mark.unit


def test_moving_average_is_the_trailing_mean():
    assert moving_average([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([4.0], 10) == [4.0]


def write_run(run: Path, steps: int = 30) -> None:
    run.mkdir()
    for rank in (0, 1):
        with open(run / f"metrics-rank{rank:05d}.jsonl", "w") as f:
            for step in range(1, steps + 1):
                f.write(json.dumps({"step": step, "rank": rank, "loss": 1.0 / step, "lr": 1e-4, "grad_norm": 0.5,
                                    "images_per_second": 4.0, "data_wait_fraction": 0.1 * rank}) + "\n")
            f.write('{"step": 3')  # a line cut by a kill
    for step, colour in ((20, (0, 0, 255)), (4, (255, 0, 0))):
        folder = run / "validation" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(folder / "grid.png")


def test_report_embeds_plots_and_grids_in_step_order_and_fetches_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    assert sd35dist_main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (run / "report.html").read_text()
    for key in ("loss", "lr", "grad_norm", "images_per_second", "data_wait_fraction"):
        assert Image.open(run / "plots" / f"{key}.png").width > 100
    assert not re.search(r"(src|href)=[\"'](?!data:)", page), "everything embedded"
    assert "http" not in page.replace("http-equiv", "")
    images = [np.asarray(Image.open(__import__("io").BytesIO(base64.b64decode(b))))
              for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]
    assert len(images) == 5 + 2
    assert page.index("step 4</h3>") < page.index("step 20</h3>")
    assert tuple(images[5][0, 0]) == (255, 0, 0) and tuple(images[6][0, 0]) == (0, 0, 255)
    records = read_metrics(run)
    assert sorted(records) == list(range(1, 31)) and records[5]["data_wait_fraction"] == pytest.approx(0.1)
    first, last, window = loss_summary(records)
    assert window == 6 and first > last


def test_a_resumed_run_reports_over_its_run_directories(tmp_path):
    write_run(tmp_path / "first", steps=10)
    write_run(tmp_path / "second", steps=30)
    (tmp_path / "first" / "validation" / "step-000000").mkdir()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "first" / "validation" / "step-000000" / "grid.png")
    assert sd35dist_main(["report", str(tmp_path / "first"), str(tmp_path / "second"), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "report.html").read_text()
    assert [int(s) for s in re.findall(r"<h3>step (\d+)</h3>", page)] == [0, 4, 20]
    assert sorted(read_runs([tmp_path / "first", tmp_path / "second"])) == list(range(1, 31))


def test_a_missing_run_directory_is_one_line(tmp_path, capsys):
    assert sd35dist_main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_checkpoint_redraws_the_report_at_most_once_a_minute_a_validation_round_and_the_end_always():
    from sd35dist.validation.during_training import REPORT_MIN_INTERVAL_S, RunReport, report_due

    assert not report_due(saved=True, validated=False, since_last_s=REPORT_MIN_INTERVAL_S - 1)
    assert report_due(saved=True, validated=False, since_last_s=REPORT_MIN_INTERVAL_S)
    assert report_due(saved=False, validated=True, since_last_s=0.0), "a new grid is always shown"
    assert not report_due(saved=False, validated=False, since_last_s=10 * REPORT_MIN_INTERVAL_S)

    class Notes:
        lines: list[str] = []

        def note(self, line: str) -> None:
            self.lines.append(line)

    now = [0.0]
    written = []
    report = RunReport(Path("/nonexistent"), Notes(), is_main=False, clock=lambda: now[0])
    report.write = lambda: (written.append(now[0]), setattr(report, "written_at", now[0]),
                            setattr(report, "stale", False))
    for step in range(1, 11):  # the run starts at 0; a checkpoint every step, 25 s apart; a validation round at step 5
        now[0] = step * 25.0
        report.after_step(saved=True, validated=step == 5)
    assert written == [75.0, 125.0, 200.0], "≥ 60 s after the start, the round's, then ≥ 60 s apart"
    report.finish()
    assert written[-1] == 250.0, "step 10 was logged since: the end redraws it"
    report.finish()
    assert len(written) == 4, "nothing new: no redraw"
