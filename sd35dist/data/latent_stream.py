"""LatentStream: the cache's shards, from S3 or disk, into every rank — deterministic,
bucketed, prefetched, resumable mid-epoch (also with another world size).

Start-up reads the manifest only. The order is stream_order.py's; this module turns it
into batches: it schedules this rank's shards with the ShardFetcher (background threads,
optional disk cache, sha256 checks, retries), decodes them, and samples latents and caption
dropout deterministically from (seed, epoch, sample), so a resumed run sees exactly the
batches the uninterrupted one would have.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from sd35dist.data.manifest import ShardEntry, read_manifest
from sd35dist.data.shard_fetcher import RetryPolicy, ShardCorrupt, ShardFetcher, stream_storage_options
from sd35dist.data.shard_format import decode_shard
from sd35dist.data.storage import Store
from sd35dist.data.stream_order import Segment, base_sequence, bucket_layouts, full_epoch, plan_segment

log = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    batch_size: int
    """Samples per rank per step (fewer in an epoch's remainder steps, possibly none)."""
    seed: int = 0
    block_shards: int = 2
    """Samples are shuffled within blocks of this many consecutive shards (of a shuffled shard order)."""
    prefetch_shards: int = 8
    fetch_threads: int = 4
    memory_shards: int = 0
    """Decoded shards kept in RAM; 0 = block_shards × buckets + 2, enough that no shard is read twice."""
    disk_cache_dir: str | None = None
    disk_cache_bytes: int = 0
    on_corrupt: Literal["error", "skip"] = "error"
    caption_dropout: float = 0.0
    sample_latents: bool = True
    """Draw latents = mean + std·ε per sample (as the diffusers example's latent_dist.sample())."""
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)


@dataclasses.dataclass
class Batch:
    bucket: str
    epoch: int
    step: int
    """Step index within the epoch (the same on every rank)."""
    keys: list[str]
    tensors: dict[str, torch.Tensor]
    """latents (or latent_mean/latent_std), prompt_embeds, pooled_prompt_embeds, original_size, crop_top_left."""

    @property
    def size(self) -> int:
        return len(self.keys)


def _intervals_json(intervals: dict[str, list[tuple[int, int]]]) -> dict[str, list[list[int]]]:
    return {bucket: [list(iv) for iv in v] for bucket, v in sorted(intervals.items())}


def _intervals_from_json(data: dict[str, list[list[int]]]) -> dict[str, list[tuple[int, int]]]:
    return {bucket: [(int(lo), int(hi)) for lo, hi in v] for bucket, v in data.items()}


def _unit_hash(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def dropped_caption(seed: int, epoch: int, sample_id: int, probability: float) -> bool:
    """Caption dropout decision for one sample, the same wherever and whenever it is asked."""
    return probability > 0 and _unit_hash("dropout", seed, epoch, sample_id) / 2**64 < probability


class LatentStream:
    def __init__(
        self,
        manifest_url: str,
        *,
        rank: int,
        world_size: int,
        options: StreamOptions,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.options = options
        self.rank, self.world_size = rank, world_size
        self.store = Store(manifest_url, stream_storage_options(manifest_url, dict(storage_options or {})))
        self.manifest = read_manifest(self.store)
        self.layouts = bucket_layouts([(s.bucket, s.samples) for s in self.manifest.shards])
        counts = np.array([s.samples for s in self.manifest.shards], dtype=np.int64)
        self._shard_first_id = np.concatenate([[0], np.cumsum(counts)])[:-1]
        self.epoch = 0
        self._remaining = full_epoch(self.layouts)
        self._segment: Segment | None = None
        self._step_in_segment = 0
        self._resume_step = 0
        self._steps_before_segment = 0
        self.skipped_shards: list[str] = []
        self._fetcher: ShardFetcher | None = None
        self._decoded: collections.OrderedDict[int, tuple[dict[str, torch.Tensor], list]] = collections.OrderedDict()
        self._empty_prompt: dict[str, torch.Tensor] | None = None
        buckets = max(1, len(self.layouts))
        self._memory_shards = options.memory_shards or options.block_shards * buckets + 2

    # ---- state --------------------------------------------------------------------------

    @property
    def samples_per_epoch(self) -> int:
        return self.manifest.total_samples

    def state_dict(self) -> dict[str, Any]:
        """Epoch and position; the same on every rank, valid for any world size.

        `remaining` is what is left of the epoch, for a resume with another world size; the
        current segment's start and step let a resume with the same world size and batch
        size continue with exactly the batches the uninterrupted run would have read.
        """
        segment_start = self._remaining
        step = self._step_in_segment if self._segment else self._resume_step
        segment = self._segment
        if segment is None and step:  # loaded, not yet iterated: the same plan the iteration will make
            segment = plan_segment(self._remaining, self.world_size, self.options.batch_size, self.options.seed, self.epoch)
        remaining = segment.remaining_after(step) if segment else self._remaining
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "remaining": _intervals_json(remaining),
            "segment": {
                "start": _intervals_json(segment_start),
                "world_size": self.world_size,
                "batch_size": self.options.batch_size,
                "step": step,
                "steps_before": self._steps_before_segment,
            },
            "samples": self.manifest.total_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("samples") != self.manifest.total_samples:
            raise ValueError("stream state does not belong to this cache (sample count or version differs)")
        self.epoch = int(state["epoch"])
        segment = state["segment"]
        self._segment = None
        if segment["world_size"] == self.world_size and segment["batch_size"] == self.options.batch_size:
            self._remaining = _intervals_from_json(segment["start"])
            self._steps_before_segment = int(segment["steps_before"])
            self._resume_step = int(segment["step"])
        else:
            self._remaining = _intervals_from_json(state["remaining"])
            self._steps_before_segment = int(segment["steps_before"]) + int(segment["step"])
            self._resume_step = 0
        self._step_in_segment = 0

    # ---- iteration ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        """Batches forever, epoch after epoch; stop by count (the trainer knows its steps)."""
        while True:
            yield from self.iter_epoch()

    def iter_epoch(self) -> Iterator[Batch]:
        """The rest of the current epoch, then the epoch counter moves on."""
        if self._segment is None:
            self._start_segment()
        segment = self._segment
        assert segment is not None
        while self._step_in_segment < len(segment.steps):
            batch = self._read_step(segment, self._step_in_segment)
            self._step_in_segment += 1
            yield batch
        self.epoch += 1
        self._remaining = full_epoch(self.layouts)
        self._segment = None
        self._step_in_segment = 0
        self._steps_before_segment = 0

    def _start_segment(self) -> None:
        self._sequences = {
            layout.name: base_sequence(layout, self.options.seed, self.epoch, self.options.block_shards)
            for layout in self.layouts
        }
        self._segment = plan_segment(self._remaining, self.world_size, self.options.batch_size, self.options.seed, self.epoch)
        self._step_in_segment, self._resume_step = self._resume_step, 0
        self._schedule_shards(self._segment, self._step_in_segment)

    def _ids(self, segment: Segment, step: int) -> np.ndarray:
        bucket = segment.steps[step][0]
        pieces = [self._sequences[bucket][lo:hi] for lo, hi in segment.positions(step, self.rank)]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    def _shard_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._shard_first_id, ids, side="right") - 1

    def _schedule_shards(self, segment: Segment, first_step: int) -> None:
        """Tell the fetcher every shard this rank will read in the segment, in order of first use."""
        ids = [self._ids(segment, s) for s in range(first_step, len(segment.steps))]
        flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        shards = self._shard_of(flat)
        _, first = np.unique(shards, return_index=True)
        order = shards[np.sort(first)]
        self._close_fetcher()
        o = self.options
        self._fetcher = ShardFetcher(self.store, threads=o.fetch_threads, max_ahead=o.prefetch_shards,
                                     disk_cache_dir=o.disk_cache_dir, disk_cache_bytes=o.disk_cache_bytes, retry=o.retry)
        self._fetcher.schedule(self.manifest.shards[i] for i in order.tolist())

    def _shard(self, index: int) -> tuple[dict[str, torch.Tensor], list] | None:
        if index in self._decoded:
            self._decoded.move_to_end(index)
            return self._decoded[index]
        entry = self.manifest.shards[index]
        assert self._fetcher is not None
        try:
            tensors, records, _ = decode_shard(self._fetcher.get(entry))
        except ShardCorrupt:
            if self.options.on_corrupt == "error":
                raise
            url = self.store.url_of(entry.path)
            if url not in self.skipped_shards:
                log.warning("skipping corrupt shard %s (on_corrupt: skip)", url)
                self.skipped_shards.append(url)
            return None
        self._decoded[index] = (tensors, records)
        while len(self._decoded) > self._memory_shards:
            self._decoded.popitem(last=False)
        return tensors, records

    def _read_step(self, segment: Segment, step: int) -> Batch:
        ids = self._ids(segment, step)
        shard_indices = self._shard_of(ids)
        keys: list[str] = []
        rows: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
        for sample_id, shard_index in zip(ids.tolist(), shard_indices.tolist()):
            shard = self._shard(shard_index)
            if shard is None:
                continue
            tensors, records = shard
            row = sample_id - int(self._shard_first_id[shard_index])
            keys.append(records[row].key)
            self._append_sample(rows, tensors, row, sample_id)
        stacked = {name: torch.stack(values) for name, values in rows.items()}
        return Batch(segment.steps[step][0], self.epoch, self._steps_before_segment + step, keys, stacked)

    def _append_sample(self, rows: dict[str, list[torch.Tensor]], tensors: dict[str, torch.Tensor], row: int, sample_id: int) -> None:
        o = self.options
        mean, std = tensors["latent_mean"][row], tensors["latent_std"][row]
        if o.sample_latents:
            generator = torch.Generator().manual_seed(_unit_hash("latent", o.seed, self.epoch, sample_id) % 2**63)
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
            rows["latents"].append((mean.float() + std.float() * noise).to(mean.dtype))
        else:
            rows["latent_mean"].append(mean)
            rows["latent_std"].append(std)
        if dropped_caption(o.seed, self.epoch, sample_id, o.caption_dropout):
            empty = self.empty_prompt()
            rows["prompt_embeds"].append(empty["prompt_embeds"][0].to(tensors["prompt_embeds"].dtype))
            rows["pooled_prompt_embeds"].append(empty["pooled_prompt_embeds"][0].to(tensors["pooled_prompt_embeds"].dtype))
        else:
            rows["prompt_embeds"].append(tensors["prompt_embeds"][row])
            rows["pooled_prompt_embeds"].append(tensors["pooled_prompt_embeds"][row])
        rows["original_size"].append(tensors["original_size"][row])
        rows["crop_top_left"].append(tensors["crop_top_left"][row])

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """The cached embeddings of the empty caption (for caption dropout)."""
        if self._empty_prompt is None:
            entry: ShardEntry = self.manifest.empty_prompt
            data = self.store.read_bytes(entry.path)
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise ShardCorrupt(self.store.url_of(entry.path), entry.sha256, hashlib.sha256(data).hexdigest())
            self._empty_prompt = load_safetensors(data)
        return self._empty_prompt

    def stats(self) -> dict[str, Any]:
        return self._fetcher.stats() if self._fetcher else {}

    def _close_fetcher(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None

    def close(self) -> None:
        self._close_fetcher()
        self._decoded.clear()

    def __enter__(self) -> LatentStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
