"""`sd35dist cache`: images + captions → sharded latent and text-embedding caches.

Every rank takes images[rank::world] (sorted, so the split is deterministic), groups them
by aspect bucket and plans its shards up front: shard k of a bucket holds a fixed slice of
that rank's samples. A shard's bytes are therefore a function of its slice alone, which is
what makes resume exact: a rank journals each shard once it is stored, and a rerun after a
crash skips the journaled shards and writes the rest as an uninterrupted run would have.
After a barrier rank 0 writes the empty-prompt embeddings, report.json and — last — the
manifest. report.json lists every rejected image with its reason and every accepted image
with how it was fitted (bucket, upscale factor, cropped fraction).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sd35dist.config.recipe import DatasetSection, Recipe
from sd35dist.data.buckets import FitPlan, ImageRejected, bucket_name
from sd35dist.data.cache_identity import IDENTITY_KEY, JOURNAL_DIR, dataset_identity
from sd35dist.data.image_source import (
    PreparedImage,
    Rejected,
    SourceImage,
    fit_for_dataset,
    list_images,
    prepare_image,
    read_image_size,
)
from sd35dist.data.manifest import ShardEntry, ShardManifest, write_manifest
from sd35dist.data.shard_format import (
    CachedSample,
    SampleRecord,
    bytes_per_sample,
    encode_shard,
    samples_per_shard,
    save_canonical,
)
from sd35dist.data.storage import Store, sha256_hex

EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
REPORT_NAME = "report.json"


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One sample to produce: an image and which repeat of it."""

    image: SourceImage
    repeat: int

    @property
    def key(self) -> str:
        return f"{self.image.dataset}/{self.image.path}#{self.repeat}"


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    path: str
    bucket: str
    items: tuple[WorkItem, ...]


@dataclasses.dataclass(frozen=True)
class SampleShape:
    """Tensor shapes one sample has, from the encoders' configs."""

    latent_channels: int
    vae_scale: int
    text_tokens: int
    joint_dim: int
    pooled_dim: int

    def bytes_for(self, bucket: tuple[int, int], dtype: str) -> int:
        width, height = bucket
        latent = (self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        return bytes_per_sample(latent, (self.text_tokens, self.joint_dim), self.pooled_dim, dtype)


# ---- pure planning ---------------------------------------------------------------------


def rank_images(images: Sequence[SourceImage], rank: int, world_size: int) -> list[SourceImage]:
    """This rank's share: every world_size-th image, starting at its rank."""
    return list(images[rank::world_size])


def plan_shards(
    bucketed: dict[tuple[int, int], list[WorkItem]],
    per_shard: Callable[[tuple[int, int]], int],
    rank: int,
    world_size: int,
) -> list[ShardPlan]:
    """Cut each bucket's items into fixed slices; the path names bucket, rank, world and index."""
    plans = []
    for bucket in sorted(bucketed):
        items = bucketed[bucket]
        size = per_shard(bucket)
        name = bucket_name(bucket)
        for index, start in enumerate(range(0, len(items), size)):
            path = f"shards/{name}/w{world_size:04d}-r{rank:05d}-{index:06d}.safetensors"
            plans.append(ShardPlan(path, name, tuple(items[start : start + size])))
    return plans


def plan_fingerprint(plans: Sequence[ShardPlan], settings: dict[str, Any]) -> str:
    """Changes when anything that shapes a shard's bytes changes; a journal from another plan is void."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for plan in plans:
        digest.update(plan.path.encode())
        for item in plan.items:
            digest.update(item.key.encode())
    return digest.hexdigest()


# ---- encoding ------------------------------------------------------------------------------


@dataclasses.dataclass
class Encoders:
    """What turns prepared images and captions into tensors (VAE + text encoders)."""

    vae: Any
    text: Any
    max_sequence_length: int

    def encode(self, by_key: dict[tuple[str, str], PreparedImage], items: Sequence[WorkItem]) -> list[CachedSample]:
        """Samples for `items` whose image was prepared (the others were rejected)."""
        from sd35dist.models.prompt_encoding import encode_prompts
        from sd35dist.models.vae_encoding import encode_images

        usable = [it for it in items if (it.image.dataset, it.image.path) in by_key]
        if not usable:
            return []
        unique = list(dict.fromkeys((it.image.dataset, it.image.path) for it in usable))
        device = next(self.vae.parameters()).device
        dtype = next(self.vae.parameters()).dtype
        pixels = torch.stack([by_key[k].pixels for k in unique]).to(device, dtype)
        mean, std = encode_images(self.vae, pixels)
        row = {k: i for i, k in enumerate(unique)}
        captions = [by_key[(it.image.dataset, it.image.path)].captions[it.repeat] for it in usable]
        prompt_embeds, pooled = encode_prompts(self.text, captions, max_sequence_length=self.max_sequence_length)
        out = []
        for i, item in enumerate(usable):
            p = by_key[(item.image.dataset, item.image.path)]
            r = row[(item.image.dataset, item.image.path)]
            out.append(
                CachedSample(
                    record=SampleRecord(item.key, item.image.dataset, item.image.path, item.repeat, captions[i]),
                    latent_mean=mean[r].float().cpu(),
                    latent_std=std[r].float().cpu(),
                    prompt_embeds=prompt_embeds[i].float().cpu(),
                    pooled_prompt_embeds=pooled[i].float().cpu(),
                    original_size=p.fit.original_size,
                    crop_top_left=p.fit.crop_top_left,
                )
            )
        return out


# ---- the build -----------------------------------------------------------------------------


@dataclasses.dataclass
class RankResult:
    shards: dict[str, dict[str, Any]]
    rejected: list[dict[str, str]]


def journal_path(rank: int, world_size: int) -> str:
    return f"{JOURNAL_DIR}/w{world_size:04d}-r{rank:05d}.json"


def _load_journal(store: Store, path: str, fingerprint: str, identity: dict[str, Any]) -> dict[str, Any]:
    if store.exists(path):
        journal = json.loads(store.read_bytes(path))
        if journal.get("fingerprint") == fingerprint:
            return journal
    return {"fingerprint": fingerprint, IDENTITY_KEY: identity, "shards": {}, "planning_rejected": []}


def bucket_items(
    images: Sequence[SourceImage],
    datasets: dict[str, DatasetSection],
    buckets: tuple[tuple[int, int], ...],
    storage_options: dict[str, Any],
) -> tuple[dict[tuple[int, int], list[WorkItem]], list[SourceImage]]:
    """Bucket each image by its header size; images whose header fails go to `unplaced`."""
    bucketed: dict[tuple[int, int], list[WorkItem]] = {}
    unplaced = []
    for image in images:
        dataset = datasets[image.dataset]
        size = read_image_size(image, storage_options)
        try:
            if size is None:
                raise ImageRejected("unreadable header")
            fit = fit_for_dataset(size, dataset, buckets)
        except ImageRejected:
            unplaced.append(image)  # prepare_image gives the precise reason
            continue
        bucketed.setdefault(fit.bucket, []).extend(WorkItem(image, r) for r in range(dataset.repeats))
    return bucketed, unplaced


def build_rank(
    recipe: Recipe,
    store: Store,
    encoders: Encoders,
    shape: SampleShape,
    rank: int,
    world_size: int,
    on_images: Callable[[int], None] = lambda n: None,
) -> RankResult:
    """Build (or finish building) this rank's shards; returns what its journal holds."""
    data = recipe.data
    datasets = {d.id: d for d in data.datasets}
    buckets = tuple(tuple(b) for b in data.buckets)
    images = [img for d in data.datasets for img in list_images(d, data.storage_options)]
    mine = rank_images(images, rank, world_size)
    bucketed, unplaced = bucket_items(mine, datasets, buckets, data.storage_options)
    target = data.shard_target_mb * 2**20
    plans = plan_shards(
        bucketed, lambda b: samples_per_shard(target, shape.bytes_for(b, data.cache_dtype)), rank, world_size
    )
    settings = {
        "dtype": data.cache_dtype,
        "max_sequence_length": data.max_sequence_length,
        "datasets": [d.model_dump(mode="json") for d in data.datasets],
        "shuffle_seed": data.shuffle_seed,
        "batch": data.cache_batch_size,
    }
    journal_file = journal_path(rank, world_size)
    journal = _load_journal(store, journal_file, plan_fingerprint(plans, settings), dataset_identity(data))
    if not journal["planning_rejected"] and unplaced:
        for image in unplaced:
            outcome = prepare_image(image, datasets[image.dataset], buckets, data.storage_options, data.shuffle_seed)
            reason = outcome.reason if isinstance(outcome, Rejected) else "does not fit any bucket"
            journal["planning_rejected"].append({"dataset": image.dataset, "image": image.path, "reason": reason})
        store.write_bytes(journal_file, json.dumps(journal).encode())
    on_images(len(unplaced))
    for plan in plans:
        images_in_plan = len({(it.image.dataset, it.image.path) for it in plan.items})
        if plan.path in journal["shards"] and store.exists(plan.path):
            on_images(images_in_plan)
            continue
        samples, rejected, fitted = _encode_plan(plan, encoders, datasets, buckets, data)
        entry: dict[str, Any] = {"rejected": rejected, "fitted": fitted}
        if samples:
            blob = encode_shard(samples, plan.bucket, data.cache_dtype)
            store.write_bytes(plan.path, blob)
            entry.update(path=plan.path, bucket=plan.bucket, samples=len(samples), bytes=len(blob),
                         sha256=sha256_hex(blob), dtype=data.cache_dtype)
        journal["shards"][plan.path] = entry
        store.write_bytes(journal_file, json.dumps(journal).encode())
        on_images(images_in_plan)
    rejected_all = list(journal["planning_rejected"])
    for entry in journal["shards"].values():
        rejected_all += entry["rejected"]
    stored = {p: {k: v for k, v in e.items() if k != "rejected"} for p, e in journal["shards"].items() if "sha256" in e}
    return RankResult(stored, rejected_all)


def fit_record(image: SourceImage, fit: FitPlan) -> dict[str, Any]:
    """How one accepted image went into its bucket, as report.json lists it."""
    return {
        "dataset": image.dataset,
        "image": image.path,
        "size": list(fit.original_size),
        "bucket": bucket_name(fit.bucket),
        "upscale": round(fit.upscale, 4),
        "cropped_fraction": round(fit.cropped_fraction, 4),
    }


def _encode_plan(
    plan: ShardPlan, encoders: Encoders, datasets: dict[str, DatasetSection], buckets: tuple[tuple[int, int], ...],
    data: Any,
) -> tuple[list[CachedSample], list[dict[str, str]], list[dict[str, Any]]]:
    samples: list[CachedSample] = []
    rejected: list[dict[str, str]] = []
    fitted: list[dict[str, Any]] = []
    prepared: dict[tuple[str, str], PreparedImage] = {}
    refused: set[tuple[str, str]] = set()
    for start in range(0, len(plan.items), data.cache_batch_size):
        batch = plan.items[start : start + data.cache_batch_size]
        for item in batch:
            key = (item.image.dataset, item.image.path)
            if key in prepared or key in refused:
                continue
            outcome = prepare_image(item.image, datasets[key[0]], buckets, data.storage_options, data.shuffle_seed)
            if isinstance(outcome, Rejected):
                refused.add(key)
                rejected.append(dataclasses.asdict(outcome))
            else:
                prepared[key] = outcome
                fitted.append(fit_record(item.image, outcome.fit))
        with torch.no_grad():
            samples += encoders.encode(prepared, batch)
        # An image's repeats are consecutive: only the last one can continue into the next batch.
        last = (batch[-1].image.dataset, batch[-1].image.path)
        prepared = {last: prepared[last]} if last in prepared else {}
    return samples, rejected, fitted


def write_empty_prompt(store: Store, encoders: Encoders, dtype: str) -> ShardEntry:
    from sd35dist.data.shard_format import DTYPES
    from sd35dist.models.prompt_encoding import empty_prompt_embeddings

    with torch.no_grad():
        prompt_embeds, pooled = empty_prompt_embeddings(encoders.text, max_sequence_length=encoders.max_sequence_length)
    tensors = {
        "prompt_embeds": prompt_embeds.to(DTYPES[dtype]).cpu().contiguous(),
        "pooled_prompt_embeds": pooled.to(DTYPES[dtype]).cpu().contiguous(),
    }
    blob = save_canonical(tensors, {"format": "sd35dist-empty-prompt/1", "dtype": dtype})
    store.write_bytes(EMPTY_PROMPT_NAME, blob)
    return ShardEntry(EMPTY_PROMPT_NAME, "", 1, len(blob), sha256_hex(blob), dtype)


def finish_cache(
    store: Store,
    results: Sequence[RankResult],
    empty_prompt: ShardEntry,
    encoders_identity: dict[str, Any],
    vae_config: dict[str, float],
    recipe: Recipe,
) -> ShardManifest:
    """Rank 0, after every rank is done: report.json, then the manifest (last)."""
    fields = [f.name for f in dataclasses.fields(ShardEntry)]
    entries = [e for r in results for e in r.shards.values()]
    shards = sorted((ShardEntry(**{k: e[k] for k in fields}) for e in entries), key=lambda s: s.path)
    # An image whose repeats straddle two shards is prepared (and reported) once per shard.
    rejected = _one_per_image(x for r in results for x in r.rejected)
    accepted = _one_per_image(x for e in entries for x in e["fitted"])
    report = {
        "rejected": rejected,
        "rejected_count": len(rejected),
        "accepted": accepted,
        "accepted_count": len(accepted),
        "upscaled_count": sum(1 for x in accepted if x["upscale"] > 1),
        "max_upscale": max((x["upscale"] for x in accepted), default=None),
        "max_cropped_fraction": max((x["cropped_fraction"] for x in accepted), default=None),
    }
    store.write_bytes(REPORT_NAME, (json.dumps(report, indent=1) + "\n").encode())
    manifest = ShardManifest(
        shards=tuple(shards),
        empty_prompt=empty_prompt,
        encoders=encoders_identity,
        vae=vae_config,
        dtype=recipe.data.cache_dtype,
        max_sequence_length=recipe.data.max_sequence_length,
        buckets=tuple(bucket_name(tuple(b)) for b in recipe.data.buckets),
        rejected=len(rejected),
        dataset_identity=dataset_identity(recipe.data),
    )
    write_manifest(store, manifest)
    return manifest


def _one_per_image(records: Any) -> list[dict[str, Any]]:
    unique = {(x["dataset"], x["image"]): x for x in records}
    return [unique[key] for key in sorted(unique)]
