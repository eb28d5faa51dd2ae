"""Which sample each rank reads at each step: pure functions of (manifest, seed, epoch, state).

The order
- Per epoch and bucket, a base sequence of the bucket's samples: its shards permuted from
  (seed, epoch, bucket), then samples permuted inside blocks of `block_shards` consecutive
  shards. Only (seed, epoch) decide it — never the world size.
- What is still to be read in the epoch is a list of intervals of each base sequence (at the
  start of an epoch: all of it). A *segment* cuts each bucket's remainder into one contiguous
  span per rank, so a rank reads whole shards and no shard is fetched by many ranks.
- Each step reads one bucket on every rank (balanced step times; batches never mix
  buckets): rank k takes its span's next `batch_size` samples. Full steps come first in
  an order shuffled from (seed, epoch, segment); then the *remainder* steps, bucket by
  bucket, in which ranks take what their spans have left — fewer than `batch_size`,
  possibly none. So within an epoch every sample is delivered exactly once, nothing is
  padded or dropped, and every rank runs the same number of steps.
- Resuming (same or another world size) starts a new segment from the saved remaining
  intervals: no duplicate, no gap.

Several datasets (SimpleTuner's meaning of `probability`)
- A *group* is one dataset's samples of one bucket (`dataset/bucket`); a step reads one group,
  so a batch never mixes datasets either (SimpleTuner draws a batch from one backend).
- Which dataset a full step reads is drawn with weight w_d (its probability, × its samples
  per epoch under auto-weighting) among the datasets that still have full steps in the
  segment; a dataset that has none left drops out, and the epoch ends when all have. So an
  epoch still holds every sample once — probability decides the order, repeats the amount —
  and while every dataset has steps left, a step reads dataset d with chance w_d / Σ w.
- The draws are made as a race of Poisson processes, one per dataset with rate w_d and as
  many events as the dataset has full steps: merged in time order, the next event comes from
  dataset d with chance w_d / Σ (rates still running) — the sequential draw, vectorised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np

Interval = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class BucketLayout:
    """A bucket's shards, in manifest order, and their global sample-id offsets."""

    name: str
    shard_indices: tuple[int, ...]
    """Indices into the manifest's shard list."""
    shard_sizes: tuple[int, ...]
    first_ids: tuple[int, ...]
    """Global id of each shard's first sample (ids number all samples of the manifest)."""

    @property
    def size(self) -> int:
        return sum(self.shard_sizes)


def bucket_layouts(shards: Sequence[tuple[str, int]]) -> list[BucketLayout]:
    """(bucket, samples) per manifest shard → one layout per bucket, sorted by name."""
    by_bucket: dict[str, list[tuple[int, int, int]]] = {}
    next_id = 0
    for index, (bucket, samples) in enumerate(shards):
        by_bucket.setdefault(bucket, []).append((index, samples, next_id))
        next_id += samples
    return [
        BucketLayout(name, tuple(i for i, _, _ in rows), tuple(n for _, n, _ in rows), tuple(f for _, _, f in rows))
        for name, rows in sorted(by_bucket.items())
        if sum(n for _, n, _ in rows) > 0
    ]


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def base_sequence(layout: BucketLayout, seed: int, epoch: int, block_shards: int) -> np.ndarray:
    """Global sample ids of one bucket in this epoch's order."""
    rng = _rng("base", seed, epoch, layout.name)
    order = rng.permutation(len(layout.shard_indices))
    pieces = []
    for start in range(0, len(order), block_shards):
        block = order[start : start + block_shards]
        ids = np.concatenate(
            [np.arange(layout.first_ids[s], layout.first_ids[s] + layout.shard_sizes[s], dtype=np.int64) for s in block]
        )
        pieces.append(ids[rng.permutation(len(ids))])
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _take(intervals: Sequence[Interval], start: int, stop: int) -> list[Interval]:
    """Positions [start, stop) of the concatenation of `intervals`, as intervals."""
    out, offset = [], 0
    for lo, hi in intervals:
        length = hi - lo
        a, b = max(start - offset, 0), min(stop - offset, length)
        if a < b:
            out.append((lo + a, lo + b))
        offset += length
    return out


def merge_intervals(intervals: Sequence[Interval]) -> list[Interval]:
    out: list[list[int]] = []
    for lo, hi in sorted(i for i in intervals if i[1] > i[0]):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _length(intervals: Sequence[Interval]) -> int:
    return sum(hi - lo for lo, hi in intervals)


def group_key(dataset: str, bucket: str) -> str:
    """A group's name: one dataset's samples of one bucket (the bucket alone when the dataset is unknown)."""
    return f"{dataset}/{bucket}" if dataset else bucket


def group_dataset(group: str) -> str:
    return group.rpartition("/")[0]


def group_bucket(group: str) -> str:
    return group.rpartition("/")[2]


def dataset_weights(layouts: Sequence[BucketLayout], probability: Mapping[str, float], sampling: str) -> dict[str, float]:
    """Each dataset's weight in the draw of a step: probability (default 1), × its samples per epoch
    under `auto-weighting` (SimpleTuner's data_backend_sampling), × 1 under `uniform`."""
    sizes: dict[str, int] = {}
    for layout in layouts:
        dataset = group_dataset(layout.name)
        sizes[dataset] = sizes.get(dataset, 0) + layout.size
    if sampling not in ("auto-weighting", "uniform"):
        raise ValueError(f"unknown dataset sampling {sampling!r}")
    return {d: probability.get(d, 1.0) * (n if sampling == "auto-weighting" else 1) for d, n in sorted(sizes.items())}


def mixed_order(slots: Sequence[str], weights: Mapping[str, float] | None, rng: np.random.Generator) -> list[str]:
    """An order of `slots` (each a full step's group): uniformly shuffled, or, with weights per
    dataset, each dataset's slots shuffled and the datasets interleaved by the weighted draw."""
    if weights is None or len({group_dataset(g) for g in slots}) <= 1:
        return [slots[i] for i in rng.permutation(len(slots))]
    by_dataset: dict[str, list[str]] = {}
    for group in slots:
        by_dataset.setdefault(group_dataset(group), []).append(group)
    times, order = [], []
    for dataset in sorted(by_dataset):
        own = by_dataset[dataset]
        own = [own[i] for i in rng.permutation(len(own))]
        rate = weights.get(dataset, 1.0)
        if not rate > 0:
            raise ValueError(f"dataset {dataset}: weight {rate} must be > 0")
        times.append(np.cumsum(rng.exponential(1.0 / rate, size=len(own))))
        order += own
    arrival = np.concatenate(times) if times else np.zeros(0)
    return [order[i] for i in np.argsort(arrival, kind="stable")]


@dataclasses.dataclass(frozen=True)
class Segment:
    """The rest of an epoch for one world size: per bucket, one span of base positions per rank,
    and the order of steps."""

    spans: dict[str, tuple[tuple[Interval, ...], ...]]
    """bucket → per rank → intervals of base-sequence positions, in reading order."""
    steps: tuple[tuple[str, int], ...]
    """(bucket, j): the j-th step of that bucket in this segment."""
    batch_size: int
    full_steps: int = 0
    """The first `full_steps` steps give every rank a full batch; the remainder steps follow."""

    def samples_at(self, step: int) -> int:
        """Samples all ranks read together at `step`."""
        if step < self.full_steps:
            return self.batch_size * len(next(iter(self.spans.values())))
        bucket = self.steps[step][0]
        return sum(_length(self.positions(step, rank)) for rank in range(len(self.spans[bucket])))

    def positions(self, step: int, rank: int) -> list[Interval]:
        """Base-sequence positions rank `rank` reads at `step` (empty in a remainder step it sits out)."""
        bucket, j = self.steps[step]
        span = self.spans[bucket][rank]
        return _take(span, j * self.batch_size, (j + 1) * self.batch_size)

    def remaining_after(self, steps_done: int) -> dict[str, list[Interval]]:
        """What is left to read once `steps_done` steps of this segment have been taken."""
        done: dict[str, int] = {}
        for bucket, _ in self.steps[:steps_done]:
            done[bucket] = done.get(bucket, 0) + 1
        out = {}
        for bucket, per_rank in self.spans.items():
            consumed = done.get(bucket, 0) * self.batch_size
            left = [iv for span in per_rank for iv in _take(span, consumed, _length(span))]
            out[bucket] = merge_intervals(left)
        return out


def plan_segment(
    remaining: dict[str, list[Interval]], world_size: int, batch_size: int, seed: int, epoch: int,
    weights: Mapping[str, float] | None = None,
) -> Segment:
    """Split what is left of the epoch over `world_size` ranks and order its steps (full steps
    uniformly shuffled, or with `weights` per dataset the datasets drawn as mixed_order says)."""
    spans: dict[str, tuple[tuple[Interval, ...], ...]] = {}
    full_slots: list[str] = []
    remainder_slots: list[tuple[str, int]] = []
    for bucket in sorted(remaining):
        intervals = merge_intervals(remaining[bucket])
        total = _length(intervals)
        if total == 0:
            continue
        cuts = [total * k // world_size for k in range(world_size + 1)]
        spans[bucket] = tuple(tuple(_take(intervals, cuts[k], cuts[k + 1])) for k in range(world_size))
        lengths = [cuts[k + 1] - cuts[k] for k in range(world_size)]
        full = min(lengths) // batch_size
        steps = -(-max(lengths) // batch_size)
        full_slots += [bucket] * full
        remainder_slots += [(bucket, j) for j in range(full, steps)]
    fingerprint = json.dumps({b: merge_intervals(v) for b, v in sorted(remaining.items())})
    rng = _rng("steps", seed, epoch, world_size, batch_size, fingerprint)
    counters: dict[str, int] = {}
    steps: list[tuple[str, int]] = []
    for bucket in mixed_order(full_slots, weights, rng):
        steps.append((bucket, counters.get(bucket, 0)))
        counters[bucket] = counters.get(bucket, 0) + 1
    full = len(steps)
    steps += remainder_slots
    return Segment(spans=spans, steps=tuple(steps), batch_size=batch_size, full_steps=full)


def full_epoch(layouts: Sequence[BucketLayout]) -> dict[str, list[Interval]]:
    return {layout.name: [(0, layout.size)] for layout in layouts}


def optimizer_steps_per_epoch(
    layouts: Sequence[BucketLayout], world_size: int, batch_size: int, seed: int, gradient_accumulation_steps: int
) -> int:  # the weights only reorder steps: their count is the same without them
    """Optimizer steps one full epoch takes on `world_size` ranks, remainder steps included.

    Every epoch has the same number of steps (bucket sizes do not change), so epoch 0 counts for all.
    """
    micro_steps = len(plan_segment(full_epoch(layouts), world_size, batch_size, seed, 0).steps)
    return -(-micro_steps // gradient_accumulation_steps)
