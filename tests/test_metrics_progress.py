"""Progress where Slurm logs it: plain lines, not a progress bar's carriage returns."""

from __future__ import annotations

import json

import pytest

from sd35dist.parallel.process_group import World
from sd35dist.trainer.metrics import MetricsLog, progress_line

pytestmark = pytest.mark.unit


def world(rank: int = 0) -> World:
    return World(rank=rank, world_size=2, local_rank=rank, local_world_size=2, node="n1", backend="gloo")


def values(step: int) -> dict[str, float]:
    return {"loss": 0.5 + step / 100, "lr": 5e-5, "samples": 8.0, "grad_norm": 1.0}


def test_without_a_terminal_rank_0_prints_plain_lines_at_the_first_and_last_step(tmp_path, capsys):
    log = MetricsLog(tmp_path, world(0), total_steps=50, start_step=10, interactive=False)
    for step in range(11, 51):
        log.step(step, values(step), seconds=0.5)
    log.note("done")
    log.close()
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("sd35dist: step")]
    assert lines[0].startswith("sd35dist: step 11/50, loss 0.6100, lr 5.00e-05, img/s 16.0")
    assert lines[-1].startswith("sd35dist: step 50/50") and "eta 0h00m" in lines[-1]
    assert len(lines) == 2, "between them at most one line per 30 s"
    assert "\r" not in out.out + out.err, "no progress bar in a log file"
    assert "sd35dist: done" in out.out
    records = [json.loads(line) for line in (tmp_path / "metrics-rank00000.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(11, 51))


def test_other_ranks_print_nothing(tmp_path, capsys):
    log = MetricsLog(tmp_path, world(1), total_steps=5, start_step=0, interactive=False)
    log.step(1, values(1), seconds=0.1)
    log.note("hello")
    log.close()
    assert capsys.readouterr().out == ""


def test_the_line_carries_mfu_and_eta():
    line = progress_line(120, 24000, {"loss": 0.1234, "lr": 5e-5, "mfu": 0.41}, 11.0, eta_s=7380)
    assert line == "sd35dist: step 120/24000, loss 0.1234, lr 5.00e-05, img/s 11.0, mfu 41.0%, eta 2h03m"
