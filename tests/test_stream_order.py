"""The stream's order and partition functions: determinism, exactly-once, bucket homogeneity."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from sd35dist.data.stream_order import (
    base_sequence,
    bucket_layouts,
    full_epoch,
    merge_intervals,
    optimizer_steps_per_epoch,
    plan_segment,
)

pytestmark = pytest.mark.unit

SHARDS = [("64x64", 7), ("80x48", 5), ("64x64", 6), ("48x80", 3), ("80x48", 5), ("64x64", 1), ("48x80", 9)]


def _deliveries(layouts, segment, sequences, world, steps):
    """(step, rank, bucket, global ids) for `steps` steps of a segment."""
    out = []
    for step in steps:
        bucket = segment.steps[step][0]
        for rank in range(world):
            ids = [int(sequences[bucket][p]) for lo, hi in segment.positions(step, rank) for p in range(lo, hi)]
            out.append((step, rank, bucket, ids))
    return out


def _sequences(layouts, seed, epoch, block=2):
    return {layout.name: base_sequence(layout, seed, epoch, block) for layout in layouts}


def _bucket_of(layouts):
    return {int(i): layout.name for layout in layouts for s, n in zip(layout.first_ids, layout.shard_sizes)
            for i in range(s, s + n)}


def test_layouts_number_every_sample_once():
    layouts = bucket_layouts(SHARDS)
    ids = [i for layout in layouts for s, n in zip(layout.first_ids, layout.shard_sizes) for i in range(s, s + n)]
    assert sorted(ids) == list(range(sum(n for _, n in SHARDS)))
    assert [layout.name for layout in layouts] == ["48x80", "64x64", "80x48"]


def test_base_sequence_depends_only_on_seed_and_epoch():
    layout = bucket_layouts(SHARDS)[1]
    a = base_sequence(layout, 1, 0, 2)
    assert np.array_equal(a, base_sequence(layout, 1, 0, 2))
    assert sorted(a.tolist()) == sorted(
        i for s, n in zip(layout.first_ids, layout.shard_sizes) for i in range(s, s + n)
    )
    assert not np.array_equal(a, base_sequence(layout, 1, 1, 2)), "each epoch has its own order"
    assert not np.array_equal(a, base_sequence(layout, 2, 0, 2)), "each seed has its own order"


@pytest.mark.parametrize(("world", "batch"), list(itertools.product([1, 2, 3, 4, 7], [1, 2, 3, 5])))
def test_one_epoch_delivers_every_sample_exactly_once(world, batch):
    layouts = bucket_layouts(SHARDS)
    sequences = _sequences(layouts, 0, 0)
    segment = plan_segment(full_epoch(layouts), world, batch, seed=0, epoch=0)
    deliveries = _deliveries(layouts, segment, sequences, world, range(len(segment.steps)))
    ids = [i for *_, got in deliveries for i in got]
    assert Counter(ids) == Counter(range(36)), "every sample once"
    bucket_of = _bucket_of(layouts)
    for _, _, bucket, got in deliveries:
        assert all(bucket_of[i] == bucket for i in got), "a step reads one bucket on every rank"
        assert len(got) <= batch


def test_remainder_policy_full_steps_first_then_partial_steps():
    """Ranks get full batches until a bucket cannot fill one on every rank; then the remainder
    is delivered in smaller batches (a rank may sit a remainder step out with an empty batch)."""
    layouts = bucket_layouts(SHARDS)
    world, batch = 3, 2
    segment = plan_segment(full_epoch(layouts), world, batch, seed=0, epoch=0)
    sizes = [[_length(segment.positions(s, r)) for r in range(world)] for s in range(len(segment.steps))]
    first_partial = next(i for i, row in enumerate(sizes) if row != [batch] * world)
    assert all(row == [batch] * world for row in sizes[:first_partial])
    assert all(min(row) < batch for row in sizes[first_partial:])
    # 48x80 has 12 samples = 3 ranks × 4: two full steps of 2 each, no remainder.
    assert sum(1 for b, _ in segment.steps if b == "48x80") == 2


def _length(intervals):
    return sum(hi - lo for lo, hi in intervals)


def test_same_inputs_same_schedule_on_every_rank():
    layouts = bucket_layouts(SHARDS)
    a = plan_segment(full_epoch(layouts), 4, 2, seed=3, epoch=1)
    b = plan_segment(full_epoch(layouts), 4, 2, seed=3, epoch=1)
    assert a == b
    c = plan_segment(full_epoch(layouts), 4, 2, seed=4, epoch=1)
    assert [s for s, _ in a.steps] != [s for s, _ in c.steps] or a.spans != c.spans


@pytest.mark.parametrize(("old_world", "new_world"), [(2, 1), (2, 3), (3, 2), (4, 4), (1, 5)])
@pytest.mark.parametrize("stop_fraction", [0.0, 0.3, 0.5, 0.9])
def test_resume_with_another_world_size_has_no_duplicate_and_no_gap(old_world, new_world, stop_fraction):
    layouts = bucket_layouts(SHARDS)
    sequences = _sequences(layouts, 7, 2)
    first = plan_segment(full_epoch(layouts), old_world, 2, seed=7, epoch=2)
    stop = int(len(first.steps) * stop_fraction)
    before = [i for *_, got in _deliveries(layouts, first, sequences, old_world, range(stop)) for i in got]
    remaining = first.remaining_after(stop)
    second = plan_segment(remaining, new_world, 2, seed=7, epoch=2)
    after = [i for *_, got in _deliveries(layouts, second, sequences, new_world, range(len(second.steps))) for i in got]
    assert Counter(before + after) == Counter(range(36))


def test_resume_twice_with_changing_world_sizes():
    layouts = bucket_layouts(SHARDS)
    sequences = _sequences(layouts, 1, 0)
    seen: list[int] = []
    remaining = full_epoch(layouts)
    for world, fraction in ((2, 0.4), (3, 0.5), (1, 1.0)):
        segment = plan_segment(remaining, world, 3, seed=1, epoch=0)
        stop = int(round(len(segment.steps) * fraction))
        seen += [i for *_, got in _deliveries(layouts, segment, sequences, world, range(stop)) for i in got]
        remaining = segment.remaining_after(stop)
    assert Counter(seen) == Counter(range(36))
    assert all(not v for v in remaining.values())


def test_each_rank_reads_a_contiguous_span_so_shards_are_not_shared():
    """With one shard per block, rank spans cover disjoint runs of shards except at their edges."""
    shards = [("64x64", 10)] * 8
    layouts = bucket_layouts(shards)
    sequences = _sequences(layouts, 0, 0, block=1)
    segment = plan_segment(full_epoch(layouts), 4, 5, seed=0, epoch=0)
    deliveries = _deliveries(layouts, segment, sequences, 4, range(len(segment.steps)))
    shards_per_rank = {r: {i // 10 for _, rank, _, got in deliveries if rank == r for i in got} for r in range(4)}
    assert all(len(s) == 2 for s in shards_per_rank.values())


def test_merge_intervals():
    assert merge_intervals([(5, 7), (0, 2), (2, 4), (9, 9)]) == [(0, 4), (5, 7)]


@pytest.mark.parametrize("world,batch,accumulation", [(1, 2, 1), (2, 2, 1), (3, 1, 2), (4, 3, 4)])
def test_optimizer_steps_per_epoch_counts_every_micro_step_rounded_up(world, batch, accumulation):
    layouts = bucket_layouts(SHARDS)
    micro = len(plan_segment(full_epoch(layouts), world, batch, seed=3, epoch=0).steps)
    steps = optimizer_steps_per_epoch(layouts, world, batch, seed=3, gradient_accumulation_steps=accumulation)
    assert (steps - 1) * accumulation < micro <= steps * accumulation
    for epoch in (1, 2):
        assert len(plan_segment(full_epoch(layouts), world, batch, seed=3, epoch=epoch).steps) == micro
