"""Skip-layer guidance (SD3.5's SLG): the sampler equals StableDiffusion3Pipeline's
`skip_guidance_layers` pixel for pixel, changes the image, and the layer list reaches the
transformer's blocks; the recipe section, `sample` and `sweep` flags carry it."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from sd35dist.config.validation_section import ValidationSection
from sd35dist.validation.guidance import Guidance, GuidanceSettings
from sd35dist.validation.render import Renderer, validation_pairs
from sd35dist.validation.sample_command import argument_parser as sample_parser
from sd35dist.validation.sample_command import guidance_of
from sd35dist.validation.sampler import SampleSettings, latent_shape_of

pytestmark = pytest.mark.unit

STEPS = 6
SLG = {"skip_layers": (0,), "skip_scale": 2.8, "skip_start": 0.01, "skip_stop": 0.5}  # steps 1 and 2 of 6


def test_slg_equals_the_pipeline_changes_the_image_and_skips_the_named_blocks(parts):
    from diffusers import StableDiffusion3Pipeline

    model_dir, embeddings, transformer, vae = parts
    calls: list[list[int] | None] = []
    block_runs = {index: 0 for index in range(len(transformer.transformer_blocks))}
    hooks = [block.register_forward_pre_hook(lambda _m, _a, i=i: block_runs.__setitem__(i, block_runs[i] + 1))
             for i, block in enumerate(transformer.transformer_blocks)]

    def forward(**inputs):
        calls.append(inputs.get("skip_layers"))
        return transformer(**inputs, return_dict=False)[0]

    config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    renderer = Renderer(forward=forward, vae=vae, scheduler_config=config,
                        latent_shape=latent_shape_of(transformer.config, vae), device=torch.device("cpu"))
    pairs = validation_pairs(1, [7], [(64, 48)])
    plain = renderer.render(pairs, embeddings, SampleSettings(steps=STEPS, guidance=GuidanceSettings(scale=4.5)))
    calls.clear()
    runs_before = dict(block_runs)
    guided = renderer.render(pairs, embeddings, SampleSettings(steps=STEPS, guidance=GuidanceSettings(scale=4.5, **SLG)))
    for hook in hooks:
        hook.remove()
    assert calls == [None, None, [0], None, [0], None, None, None], "a third forward at steps 1 and 2 only"
    ran = {i: block_runs[i] - runs_before[i] for i in block_runs}
    assert ran == {0: STEPS, 1: STEPS + 2}, "block 0 sits out the skip-layer forwards"
    assert not np.array_equal(plain[0], guided[0]), "SLG changes the image"

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, transformer=transformer, vae=vae, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=embeddings.prompt_embeds[:1], pooled_prompt_embeds=embeddings.pooled_prompt_embeds[:1],
                    negative_prompt_embeds=embeddings.negative_prompt_embeds,
                    negative_pooled_prompt_embeds=embeddings.negative_pooled_prompt_embeds,
                    width=64, height=48, num_inference_steps=STEPS, guidance_scale=4.5,
                    skip_guidance_layers=[0], skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01,
                    skip_layer_guidance_stop=0.5, generator=torch.Generator().manual_seed(7)).images[0]
    assert np.array_equal(guided[0], np.asarray(expected))


def test_slg_needs_classifier_free_guidance_and_sane_layers():
    assert not Guidance(GuidanceSettings(scale=1.0, **SLG)).skips_layers_at(1, STEPS), "no CFG: no SLG (the pipeline's rule)"
    assert [i for i in range(28) if Guidance(GuidanceSettings(scale=4.0, skip_layers=(7,))).skips_layers_at(i, 28)] \
        == [1, 2, 3, 4, 5], "defaults 0.01–0.2 of 28 steps: steps 1–5"
    section = ValidationSection.model_validate({"prompts": ["x"], "guidance_scale": 4.0,
                                                "skip_layer_guidance": {"layers": [7, 8, 9]}})
    assert section.skip_layer_guidance.layers == [7, 8, 9] and section.skip_layer_guidance.scale == 2.8
    for bad in ({"guidance_scale": 1.0, "skip_layer_guidance": {"layers": [7]}},
                {"skip_layer_guidance": {"layers": []}}, {"skip_layer_guidance": {"layers": [-1]}},
                {"skip_layer_guidance": {"layers": [7], "start": 0.5, "stop": 0.2}}):
        with pytest.raises(ValueError):
            ValidationSection.model_validate({"prompts": ["x"], **bad})


def test_sample_flags_reach_the_guidance_settings():
    args = sample_parser().parse_args(["src", "--out", "o", "--skip-layers", "7,8,9", "--skip-scale", "3"])
    settings = guidance_of(args)
    assert (settings.skip_layers, settings.skip_scale, settings.skip_start, settings.skip_stop) == ((7, 8, 9), 3.0, 0.01, 0.2)
    assert guidance_of(sample_parser().parse_args(["src", "--out", "o"])).skip_layers == ()
    with pytest.raises(SystemExit):
        sample_parser().parse_args(["src", "--out", "o", "--skip-layers", "seven"])
    assert isinstance(args, argparse.Namespace)


def test_the_recipe_section_and_the_sweep_flag_reach_the_sampler_settings():
    from sd35dist.config.recipe import Recipe
    from sd35dist.validation.during_training import sample_settings
    from sd35dist.validation.sweep_command import argument_parser as sweep_parser

    recipe = Recipe.model_validate({
        "name": "r", "model": {"pretrained": "/m"}, "data": {"cache_url": "/c"}, "output": {"dir": "/o"},
        "validation": {"prompts": ["x"], "guidance_scale": 4.0,
                       "skip_layer_guidance": {"layers": [7, 8, 9], "scale": 3.0, "stop": 0.3}}})
    guidance = sample_settings(recipe).guidance
    assert (guidance.skip_layers, guidance.skip_scale, guidance.skip_start, guidance.skip_stop) == ((7, 8, 9), 3.0, 0.01, 0.3)
    assert sample_settings(recipe, "apg").guidance.kind == "apg" and sample_settings(recipe, "apg").guidance.skip_layers
    assert sweep_parser().parse_args(["out", "--skip-layers", "none"]).skip_layers == ()
    assert sweep_parser().parse_args(["out"]).skip_layers is None, "default: the recipe's section"
