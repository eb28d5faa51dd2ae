"""Checkpoint directories: complete-or-invisible, `latest` moves last, rotation keeps the limit."""

from __future__ import annotations

import pytest

from sd35dist.checkpoint.layout import (
    COMPLETE,
    CheckpointDir,
    CheckpointNotFound,
    names_to_remove,
    read_info,
)

pytestmark = pytest.mark.unit


def _save(ckpts: CheckpointDir, step: int) -> None:
    partial = ckpts.begin(step)
    (partial / "payload").write_text(str(step))
    ckpts.commit(step, {"world_size": 2})


def test_commit_publishes_then_moves_latest(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    assert ckpts.latest() is None and ckpts.resolve("latest") is None
    _save(ckpts, 4)
    assert ckpts.latest() == tmp_path / "checkpoints" / "step-00000004"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert read_info(ckpts.latest())["world_size"] == 2
    assert not ckpts.partial_path(4).exists()


def test_an_interrupted_save_leaves_latest_on_the_previous_checkpoint(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    _save(ckpts, 4)
    partial = ckpts.begin(8)  # a rank is killed here: no COMPLETE, no rename
    (partial / "half").write_text("x")
    assert ckpts.latest().name == "step-00000004"
    assert ckpts.complete_steps() == [4]
    _save(ckpts, 8)  # the retry discards the half-written directory
    assert ckpts.latest().name == "step-00000008"
    assert not (ckpts.path(8) / "half").exists()


def test_latest_pointer_to_an_incomplete_directory_falls_back(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    _save(ckpts, 4)
    _save(ckpts, 8)
    (ckpts.path(8) / COMPLETE).unlink()
    assert ckpts.latest().name == "step-00000004"


def test_rotation_keeps_the_newest_limit(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    for step in (2, 4, 6, 8):
        _save(ckpts, step)
        ckpts.rotate(2)
    assert ckpts.complete_steps() == [6, 8]
    assert sorted(p.name for p in ckpts.root.iterdir()) == ["latest", "step-00000006", "step-00000008"]


def test_rotation_removes_stale_partials_only_when_older(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    ckpts.begin(2)
    _save(ckpts, 4)
    ckpts.begin(6)
    ckpts.rotate(3)
    names = sorted(p.name for p in ckpts.root.iterdir())
    assert "step-00000002.partial" not in names and "step-00000006.partial" in names


def test_resolve_none_and_explicit_paths(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    _save(ckpts, 4)
    assert ckpts.resolve("none") is None
    assert ckpts.resolve(str(ckpts.path(4))) == ckpts.path(4)
    with pytest.raises(CheckpointNotFound, match="train.resume"):
        ckpts.resolve(str(tmp_path / "nope"))


@pytest.mark.parametrize(("steps", "limit", "removed"), [([1, 2, 3], 2, ["step-00000001"]), ([5], 1, []),
                                                        ([3, 1, 2], 1, ["step-00000001", "step-00000002"])])
def test_names_to_remove(steps, limit, removed):
    assert names_to_remove(steps, limit) == removed
