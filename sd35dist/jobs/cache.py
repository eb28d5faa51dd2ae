"""`sd35dist cache --recipe R` (every rank, under torchrun or alone) and `sd35dist cache inspect URL`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sd35dist.config.cli_args import CommandLineParser, key_value
from sd35dist.config.loading import ConfigError, parse_override
from sd35dist.config.recipe import Recipe
from sd35dist.data.cache_builder import (
    Encoders,
    SampleShape,
    build_rank,
    finish_cache,
    read_journals,
    write_empty_prompt,
)
from sd35dist.data.cache_identity import dataset_identity, foreign_cache
from sd35dist.data.input_shards import DatasetInputError
from sd35dist.data.manifest import ManifestError, read_manifest
from sd35dist.data.shard_fetcher import is_transient
from sd35dist.data.shard_format import shard_metadata
from sd35dist.data.storage import Store, sha256_hex
from sd35dist.jobs.rank_failure import rank_from_env, report_before_group, report_failure
from sd35dist.jobs.rank_inputs import check_dataset_sources, check_pretrained, check_rank_inputs, load_rank_recipe
from sd35dist.parallel.process_group import World, destroy, init_process_group_from_env

# Ranks that finish their shards early wait here for the slowest; torchrun stops the job if
# a rank dies, so this bounds only a genuinely stuck rank.
CACHE_COLLECTIVE_TIMEOUT_S = 24 * 3600


def _sample_shape(encoders: Encoders) -> SampleShape:
    vae_config = encoders.vae.config
    text = encoders.text
    return SampleShape(
        latent_channels=vae_config.latent_channels,
        vae_scale=2 ** (len(vae_config.block_out_channels) - 1),
        text_tokens=text.clip_l_tokenizer.model_max_length + encoders.max_sequence_length,
        joint_dim=text.t5.config.d_model,
        pooled_dim=text.clip_l.config.projection_dim + text.clip_g.config.projection_dim,
    )


def checked_recipe(recipe_file: Path, run_dir: Path | None = None) -> Recipe:
    """The recipe, once its model directory and every dataset source are known to be there."""
    from sd35dist.models.sd3_components import CACHE_INPUT_PARTS

    recipe = load_rank_recipe(recipe_file)
    if not recipe.data.datasets:
        raise ConfigError(recipe_file.name, "data.datasets", "no datasets to cache")
    check_pretrained(recipe, recipe_file.name, CACHE_INPUT_PARTS)
    check_dataset_sources(recipe.data, recipe_file.name)
    check_rank_inputs(recipe, "cache", recipe_file.name, run_dir)
    store = Store(recipe.data.cache_url, recipe.data.storage_options)
    problem = foreign_cache(store, dataset_identity(recipe.data))
    if problem:
        raise ConfigError(recipe_file.name, "data.cache_url", f"{store.url}: {problem}; nothing was written: choose "
                          "another data.cache_url, or delete that cache to rebuild it there")
    return recipe


def build(recipe: Recipe, world: World) -> int:
    from tqdm import tqdm

    from sd35dist.models.sd3_components import encoder_identity, load_text_encoders, load_vae

    device = torch.device(world.device) if torch.cuda.is_available() else torch.device("cpu")
    text_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_dir = Path(recipe.model.pretrained)
    # The VAE stays fp32, as in the diffusers SD3 example: bf16 latents drift visibly.
    encoders = Encoders(
        vae=load_vae(model_dir, device, torch.float32),
        text=load_text_encoders(model_dir, device, text_dtype),
        max_sequence_length=recipe.data.max_sequence_length,
    )
    store = Store(recipe.data.cache_url, recipe.data.storage_options)
    # Closed on the way out of a failure too: an error line must not continue the bar's line.
    with tqdm(desc="caching", unit="img", disable=not world.is_main, dynamic_ncols=True) as bar:
        shards = build_rank(recipe, store, encoders, _sample_shape(encoders), world.rank, world.world_size,
                            gather=_all_gather(world), on_images=lambda n: bar.update(n * world.world_size),
                            node=world.node)
    dist.barrier()  # every input shard's journal is complete and stored
    if world.is_main:
        empty = write_empty_prompt(store, encoders, recipe.data.cache_dtype)
        vae_config = {k: float(encoders.vae.config[k]) for k in ("scaling_factor", "shift_factor")}
        manifest = finish_cache(store, read_journals(store, shards), empty, encoder_identity(model_dir), vae_config,
                                recipe)
        print(f"cache {store.url}: {manifest.total_samples} samples in {len(manifest.shards)} shards, "
              f"{manifest.total_bytes / 2**20:.1f} MiB, {manifest.rejected} images rejected (see report.json)")
        if recipe.validation.enabled:
            cache_validation_prompts(recipe, store, encoders.text)
    dist.barrier()
    return 0


def _all_gather(world: World):
    def gather(value: Any) -> list[Any]:
        values: list[Any] = [None] * world.world_size
        dist.all_gather_object(values, value)
        return values

    return gather


def dataset_mistake(err: DatasetInputError, recipe: Recipe, recipe_name: str) -> ConfigError:
    """A dataset's bad input as the one line naming the recipe, the dataset's key and the dataset."""
    index = next(i for i, d in enumerate(recipe.data.datasets) if d.id == err.dataset)
    return ConfigError(recipe_name, f"data.datasets[{index}].{err.key}", f"dataset {err.dataset}: {err.message}")


def cache_validation_prompts(recipe: Recipe, store: Store, text_encoders) -> None:
    """Encode the recipe's validation prompts and record them in the (existing) manifest."""
    from sd35dist.data.validation_prompts import encode_validation_prompts, record_in_manifest, write_validation_prompts

    manifest = read_manifest(store)  # its T5 length and dtype, which training reads, not the recipe's
    section, length = recipe.validation, manifest.max_sequence_length
    prompts = section.prompt_list()
    embeddings = encode_validation_prompts(text_encoders, prompts, section.negative_prompt, length)
    entry, digest = write_validation_prompts(store, embeddings, section.negative_prompt, length, manifest.dtype)
    record_in_manifest(store, entry, digest)
    print(f"cache {store.url}: {len(prompts)} validation prompts encoded ({entry.path})")


def validation_only(recipe_file: Path) -> int:
    """`sd35dist cache --validation-only`: re-encode just the validation prompts, in this process."""
    from sd35dist.models.sd3_components import CACHE_INPUT_PARTS, load_text_encoders

    recipe = load_rank_recipe(recipe_file)
    check_pretrained(recipe, recipe_file.name, CACHE_INPUT_PARTS)
    check_rank_inputs(recipe, "cache", recipe_file.name)
    if not recipe.validation.enabled:
        raise ConfigError(recipe_file.name, "validation.prompts", "no validation prompts to cache")
    store = Store(recipe.data.cache_url, recipe.data.storage_options)
    read_manifest(store)  # the cache must exist: its manifest records the prompts
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    text = load_text_encoders(Path(recipe.model.pretrained), device,
                              torch.bfloat16 if device.type == "cuda" else torch.float32)
    cache_validation_prompts(recipe, store, text)
    return 0


def inspect(url: str, storage_options: dict[str, Any], verify: bool, out=sys.stdout) -> int:
    """Print what a cache holds; with `verify`, read every shard and check its sha256 and header."""
    store = Store(url, storage_options)
    manifest = read_manifest(store)
    problems: list[str] = []
    print(f"cache {store.url}", file=out)
    print(f"  format {manifest.format}, dtype {manifest.dtype}, T5 tokens {manifest.max_sequence_length}", file=out)
    print(f"  {manifest.total_samples} samples, {len(manifest.shards)} shards, {manifest.total_bytes / 2**20:.1f} MiB", file=out)
    for bucket, count in manifest.samples_per_bucket().items():
        print(f"  bucket {bucket}: {count} samples", file=out)
    for dataset, per_bucket in manifest.samples_per_dataset().items():
        buckets = ", ".join(f"{bucket} {count}" for bucket, count in per_bucket.items())
        print(f"  dataset {dataset or '(not recorded)'}: {sum(per_bucket.values())} samples ({buckets})", file=out)
    for part, identity in sorted(manifest.encoders.items()):
        print(f"  encoder {part}: {identity.get('class', '?')} config {str(identity.get('config_sha256', ''))[:12]}", file=out)
    print(f"  rejected images: {manifest.rejected} (report.json)", file=out)
    entries = [*manifest.shards, manifest.empty_prompt] if verify else []
    for entry in entries:
        try:
            blob = store.read_bytes(entry.path)
        except FileNotFoundError:
            problems.append(f"{entry.path}: missing")
            continue
        if len(blob) != entry.bytes or sha256_hex(blob) != entry.sha256:
            problems.append(f"{entry.path}: sha256/size mismatch")
        elif entry.bucket and json.loads(shard_metadata(blob)["samples"]).__len__() != entry.samples:
            problems.append(f"{entry.path}: sample count differs from the manifest")
    for problem in problems:
        print(f"  problem: {problem}", file=out)
    print(f"  problems: {len(problems)}" + ("" if verify else " (add --verify to read every shard)"), file=out)
    return 1 if problems else 0


def inspect_argument_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="sd35dist cache inspect", description="print what a latent cache holds")
    parser.add_argument("url", help="cache root: a path, file://… or s3://bucket/prefix")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                        help="fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000 (the value is read as YAML)")
    parser.add_argument("--verify", action="store_true", help="read every shard and check its sha256")
    return parser


def main(args: argparse.Namespace) -> int:
    if getattr(args, "validation_only", False):
        try:
            return validation_only(Path(args.recipe))
        except (ConfigError, ManifestError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        recipe = checked_recipe(Path(args.recipe), Path(args.run_dir) if args.run_dir else None)
        world = init_process_group_from_env(CACHE_COLLECTIVE_TIMEOUT_S)
    except ConfigError as err:
        return report_before_group(err, rank_from_env())
    try:
        try:
            return build(recipe, world)
        except DatasetInputError as err:
            raise dataset_mistake(err, recipe, Path(args.recipe).name) from None
    except Exception as err:  # noqa: BLE001 — one line once for a mistake; a bug is re-raised
        return report_failure(err, world.rank, Path(args.run_dir) if args.run_dir else None)
    finally:
        destroy()


def inspect_main(argv: list[str]) -> int:
    args = inspect_argument_parser().parse_args(argv)
    try:
        options = {key: parse_override(f"value={value}")[1] for key, value in args.storage_option}
        return inspect(args.url, options, args.verify)
    except (ManifestError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not (isinstance(err, OSError) or is_transient(err)):
            raise
        print(f"error: {args.url}: cannot read the cache: {type(err).__name__}: {' '.join(str(err).split())}",
              file=sys.stderr)
        return 2
