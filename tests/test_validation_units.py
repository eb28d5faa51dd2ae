"""Validation's pieces in one process: pair split, sampler == StableDiffusion3Pipeline pixel for pixel,
cached prompt embeddings (and the one-line error when the recipe's prompts changed), grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sd35dist.config.loading import ConfigError
from sd35dist.config.validation_section import ValidationSection
from sd35dist.data.manifest import ShardEntry, ShardManifest, read_manifest, write_manifest
from sd35dist.data.storage import Store
from sd35dist.data.validation_prompts import (
    PromptEmbeddings,
    read_validation_prompts,
    record_in_manifest,
    write_validation_prompts,
)
from sd35dist.validation.during_training import save_round
from sd35dist.validation.guidance import GuidanceSettings
from sd35dist.validation.render import Renderer, rank_rounds, validation_pairs
from sd35dist.validation.sampler import SampleSettings, latent_shape_of

pytestmark = pytest.mark.unit


def test_pairs_split_over_ranks_with_placeholders_where_they_run_out():
    assert rank_rounds(3, 0, 2) == [0, 2] and rank_rounds(3, 1, 2) == [1, None]
    assert rank_rounds(1, 3, 4) == [None]
    for pairs, world in ((3, 2), (5, 4), (8, 3), (1, 1)):
        rounds = [rank_rounds(pairs, r, world) for r in range(world)]
        assert len({len(r) for r in rounds}) == 1  # the same number of forwards on every rank
        assert sorted(i for r in rounds for i in r if i is not None) == list(range(pairs))


def test_images_equal_the_diffusers_pipeline_pixel_for_pixel(parts):
    from diffusers import StableDiffusion3Pipeline

    model_dir, embeddings, transformer, vae = parts
    config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    renderer = Renderer(forward=lambda **kw: transformer(**kw, return_dict=False)[0], vae=vae, scheduler_config=config,
                        latent_shape=latent_shape_of(transformer.config, vae), device=torch.device("cpu"))
    pairs = validation_pairs(2, [7], [(64, 48)])
    images = renderer.render(pairs, embeddings, SampleSettings(steps=4, guidance=GuidanceSettings(kind="cfg", scale=4.5)))
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, transformer=transformer, vae=vae, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for index, pair in enumerate(pairs):
        p = pair.prompt
        expected = pipe(prompt_embeds=embeddings.prompt_embeds[p : p + 1],
                        pooled_prompt_embeds=embeddings.pooled_prompt_embeds[p : p + 1],
                        negative_prompt_embeds=embeddings.negative_prompt_embeds,
                        negative_pooled_prompt_embeds=embeddings.negative_pooled_prompt_embeds,
                        width=64, height=48, num_inference_steps=4, guidance_scale=4.5,
                        generator=torch.Generator().manual_seed(7)).images[0]
        assert images[index].shape == (48, 64, 3)
        assert np.array_equal(images[index], np.asarray(expected))
    assert not np.array_equal(images[0], images[1])  # the prompt matters
    apg_settings = GuidanceSettings(kind="apg", scale=4.5, momentum=-0.5, norm_threshold=1.0, eta=0.0)
    apg = renderer.render(pairs[:1], embeddings, SampleSettings(steps=4, guidance=apg_settings))
    assert not np.array_equal(apg[0], images[0])  # APG is not CFG at these settings


def _manifest(store: Store) -> None:
    empty = ShardEntry("empty_prompt.safetensors", "", 1, 1, "0" * 64, "bf16")
    write_manifest(store, ShardManifest(shards=(), empty_prompt=empty, encoders={}, vae={}, dtype="bf16",
                                        max_sequence_length=32, buckets=(), rejected=0))


def test_cached_prompts_round_trip_and_a_changed_list_names_the_command(tmp_path: Path):
    store = Store(str(tmp_path / "cache"))
    _manifest(store)
    section = ValidationSection(prompts=["a fox", "a cat"], negative_prompt="blurry")
    with pytest.raises(ConfigError, match=r"r\.yaml: validation\.prompts: .*holds no validation prompts.*--validation-only"):
        read_validation_prompts(store, read_manifest(store), section, "r.yaml")
    g = torch.Generator().manual_seed(0)
    embeddings = PromptEmbeddings(("a fox", "a cat"), torch.randn(2, 5, 4, generator=g), torch.randn(2, 3, generator=g),
                                  torch.randn(1, 5, 4, generator=g), torch.randn(1, 3, generator=g))
    entry, digest = write_validation_prompts(store, embeddings, "blurry", 32, "fp32")
    record_in_manifest(store, entry, digest)
    manifest = read_manifest(store)
    assert manifest.validation_prompts == entry and manifest.validation_prompts_sha256 == digest
    back = read_validation_prompts(store, manifest, section, "r.yaml")
    assert torch.equal(back.prompt_embeds, embeddings.prompt_embeds)
    assert torch.equal(back.negative_pooled_prompt_embeds, embeddings.negative_pooled_prompt_embeds)
    for changed in (ValidationSection(prompts=["a fox", "a dog"], negative_prompt="blurry"),
                    ValidationSection(prompts=["a fox", "a cat"], negative_prompt="")):
        with pytest.raises(ConfigError, match=r"prompts differ.*sd35dist cache --recipe r\.yaml --validation-only"):
            read_validation_prompts(store, manifest, changed, "r.yaml")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a fox\n\n  a cat \n")
    from_file = ValidationSection(prompts_file=str(prompts_file), negative_prompt="blurry")
    assert read_validation_prompts(store, manifest, from_file, "r.yaml").prompts == ("a fox", "a cat")


def test_a_round_saves_single_images_and_a_labelled_grid(tmp_path: Path):
    pairs = validation_pairs(2, [0, 1], [(32, 16)])
    images = {i: np.full((16, 32, 3), 20 * i, np.uint8) for i in range(len(pairs) * 2)}
    grid = save_round(tmp_path / "step", images, pairs, ("a fox", "a cat"), ["model", "ema"], "step 4")
    from PIL import Image

    picture = np.asarray(Image.open(grid))
    assert len(list((tmp_path / "step").glob("*-p0*-seed*.png"))) == 8
    assert picture.shape[1] > 4 * 32 and picture.shape[0] > 2 * 16
    # Every image is in the grid: its uniform colour appears as a 16x32 block.
    for value in {20 * i for i in range(8)} - {0}:
        assert (picture == value).all(axis=2).sum() >= 16 * 32
