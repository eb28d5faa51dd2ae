"""`sd35dist cache`: images + captions → sharded latent and text-embedding caches.

The input is cut into input shards (data/input_shards.py: a folder's images in chunks, a tar
file, a parquet row group); rank r builds input shards r, r + world, …. Each input shard is
read, its images bucketed, and each bucket's samples cut into fixed slices, one output shard
each (`shards/<dataset>/<bucket>/<input shard>-<k>.safetensors`). A shard's bytes are a function
of its input shard alone — the same whatever the rank count — which is also what makes resume
exact: each input shard has a journal (`progress/<dataset>-<input shard>.json`) naming the
output shards stored so far; a rerun after a crash, with any number of ranks, skips input
shards whose journal says complete, skips the stored output shards of a half-done one, and
writes the rest as an uninterrupted run would have. After a barrier rank 0 writes the
empty-prompt embeddings, report.json and — last — the manifest. report.json lists every
rejected image with its reason and every accepted image with how it was fitted (bucket,
upscale factor, cropped fraction).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from sd35dist.config.recipe import DataSection, DatasetSection, Recipe
from sd35dist.data.buckets import FitPlan, ImageRejected, bucket_name
from sd35dist.data.cache_identity import IDENTITY_KEY, JOURNAL_DIR, SAMPLING_ONLY_KEYS, dataset_identity
from sd35dist.data.dataset_formats import list_input_shards, read_input_shard
from sd35dist.data.image_source import (
    PreparedImage,
    Rejected,
    SourceImage,
    fit_for_dataset,
    list_images,
    prepare_image,
    read_image_size,
)
from sd35dist.data.input_shards import Gather, InputShard, assign
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


def plan_shards(
    bucketed: dict[tuple[int, int], list[WorkItem]],
    per_shard: Callable[[tuple[int, int]], int],
    shard: InputShard,
) -> list[ShardPlan]:
    """Cut each bucket's items into fixed slices; the path names dataset, bucket, input shard and slice."""
    plans = []
    for bucket in sorted(bucketed):
        items = bucketed[bucket]
        size = per_shard(bucket)
        name = bucket_name(bucket)
        for index, start in enumerate(range(0, len(items), size)):
            path = f"shards/{shard.dataset}/{name}/{shard.index:06d}-{index:04d}.safetensors"
            plans.append(ShardPlan(path, name, tuple(items[start : start + size])))
    return plans


def build_settings(data: DataSection, dataset: DatasetSection) -> dict[str, Any]:
    """Everything besides the input that shapes an input shard's output shards."""
    return {
        "dtype": data.cache_dtype,
        "max_sequence_length": data.max_sequence_length,
        "dataset": dataset.model_dump(mode="json", exclude=set(SAMPLING_ONLY_KEYS)),
        "buckets": [list(b) for b in data.buckets],
        "shard_target_mb": data.shard_target_mb,
        "shuffle_seed": data.shuffle_seed,
        "batch": data.cache_batch_size,
    }


def input_fingerprint(shard: InputShard, settings: dict[str, Any]) -> str:
    """Changes when the input shard or anything that shapes its output changes; a journal from another is void."""
    return hashlib.sha256(json.dumps([shard.identity, settings], sort_keys=True).encode()).hexdigest()


def plan_fingerprint(plans: Sequence[ShardPlan]) -> str:
    """Changes when the input's content planned differently (a file replaced under the same name)."""
    digest = hashlib.sha256()
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


def journal_path(shard: InputShard) -> str:
    return f"{JOURNAL_DIR}/{shard.dataset}-{shard.index:06d}.json"


def _load_journal(store: Store, path: str, fingerprint: str, identity: dict[str, Any]) -> dict[str, Any]:
    if store.exists(path):
        journal = json.loads(store.read_bytes(path))
        if journal.get("input") == fingerprint:
            return journal
    return {"input": fingerprint, IDENTITY_KEY: identity, "plan": None, "complete": False, "shards": {},
            "planning_rejected": []}


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
    gather: Gather = lambda value: [value],
    on_images: Callable[[int], None] = lambda n: None,
    node: str = "",
) -> list[InputShard]:
    """Build (or finish building) this rank's input shards; returns every rank's (what finish_cache reads).
    `node` (the World's) goes into each journal it completes, with `rank`."""
    data = recipe.data
    listing = lambda dataset: list_images(dataset, data.storage_options)  # noqa: E731
    shards = list_input_shards(data, rank, world_size, gather, listing)
    built_by = {"rank": rank, "node": node}
    for shard in assign(shards, rank, world_size):
        build_input_shard(shard, recipe, store, encoders, shape, on_images, built_by)
    return shards


def read_journals(store: Store, shards: Sequence[InputShard]) -> Iterator[dict[str, Any]]:
    """The journal of each input shard, in order, one at a time."""
    for shard in shards:
        yield json.loads(store.read_bytes(journal_path(shard)))


def build_input_shard(shard: InputShard, recipe: Recipe, store: Store, encoders: Encoders, shape: SampleShape,
                      on_images: Callable[[int], None], built_by: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every output shard of one input shard, stored and journaled; returns the journal.

    `built_by` (rank and node) goes into the journal so a user can tell which node built, or
    stalled on, an input shard."""
    data = recipe.data
    dataset = next(d for d in data.datasets if d.id == shard.dataset)
    datasets = {dataset.id: dataset}
    buckets = tuple(tuple(b) for b in data.buckets)
    journal_file = journal_path(shard)
    journal = _load_journal(store, journal_file, input_fingerprint(shard, build_settings(data, dataset)),
                            dataset_identity(data))
    if journal["complete"]:
        on_images(journal["images"])
        return journal
    images, refused = read_input_shard(shard, dataset, data.storage_options)
    bucketed, unplaced = bucket_items(images, datasets, buckets, data.storage_options)
    target = data.shard_target_mb * 2**20
    plans = plan_shards(bucketed, lambda b: samples_per_shard(target, shape.bytes_for(b, data.cache_dtype)), shard)
    if journal["plan"] != plan_fingerprint(plans):  # the input changed since: start this shard afresh
        journal.update(plan=plan_fingerprint(plans), shards={}, planning_rejected=[])
    if not journal["planning_rejected"]:
        journal["planning_rejected"] = [dataclasses.asdict(r) for r in refused]
        for image in unplaced:
            outcome = prepare_image(image, dataset, buckets, data.storage_options, data.shuffle_seed)
            reason = outcome.reason if isinstance(outcome, Rejected) else "does not fit any bucket"
            journal["planning_rejected"].append({"dataset": image.dataset, "image": image.path, "reason": reason})
        store.write_bytes(journal_file, json.dumps(journal).encode())
    on_images(len(unplaced) + len(refused))
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
            entry.update(path=plan.path, dataset=shard.dataset, bucket=plan.bucket, samples=len(samples),
                         bytes=len(blob), sha256=sha256_hex(blob), dtype=data.cache_dtype)
        journal["shards"][plan.path] = entry
        store.write_bytes(journal_file, json.dumps(journal).encode())
        on_images(images_in_plan)
    journal.update(complete=True, images=len(images) + len(refused), built_by=built_by or {})
    store.write_bytes(journal_file, json.dumps(journal).encode())
    return journal


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
    journals: Iterable[dict[str, Any]],
    empty_prompt: ShardEntry,
    encoders_identity: dict[str, Any],
    vae_config: dict[str, float],
    recipe: Recipe,
) -> ShardManifest:
    """Rank 0, after every rank is done: report.json, then the manifest (last).

    `journals` are every input shard's, in input-shard order, read one at a time: the report lists
    the accepted images in that order (the same whatever the rank count), each as one compact line,
    so rank 0 holds about 150 bytes per image rather than the ranks' results (flat in the dataset's size
    but for that)."""
    fields = [f.name for f in dataclasses.fields(ShardEntry)]
    shards: list[ShardEntry] = []
    rejected: dict[tuple[str, str], dict[str, str]] = {}
    accepted: list[str] = []
    upscaled, max_upscale, max_cropped = 0, None, None
    for journal in journals:
        fitted: dict[tuple[str, str], dict[str, Any]] = {}
        for record in journal["planning_rejected"]:
            rejected[(record["dataset"], record["image"])] = record
        for entry in journal["shards"].values():
            if "sha256" in entry:
                shards.append(ShardEntry(**{k: entry[k] for k in fields}))
            # An image whose repeats straddle two output shards is prepared (and reported) once per shard.
            for record in entry["rejected"]:
                rejected[(record["dataset"], record["image"])] = record
            for record in entry["fitted"]:
                fitted.setdefault((record["dataset"], record["image"]), record)
        for record in fitted.values():
            accepted.append(json.dumps(record))
            upscaled += record["upscale"] > 1
            max_upscale = record["upscale"] if max_upscale is None else max(max_upscale, record["upscale"])
            cropped = record["cropped_fraction"]
            max_cropped = cropped if max_cropped is None else max(max_cropped, cropped)
    summary = {
        "rejected": [rejected[key] for key in sorted(rejected)],
        "rejected_count": len(rejected),
        "accepted_count": len(accepted),
        "upscaled_count": upscaled,
        "max_upscale": max_upscale,
        "max_cropped_fraction": max_cropped,
    }
    head = json.dumps(summary, indent=1)[: -len("\n}")]
    report = head + ',\n "accepted": [\n  ' + ",\n  ".join(accepted) + "\n ]\n}\n"
    store.write_bytes(REPORT_NAME, report.encode())
    manifest = ShardManifest(
        shards=tuple(sorted(shards, key=lambda s: s.path)),
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
