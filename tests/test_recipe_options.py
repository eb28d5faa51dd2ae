"""Recipe keys that carry SimpleTuner's meanings reach the code that obeys them: the training
schedule's shift (train.flow_shift), the polynomial decay's end and power, the crop's place
(crop_style) and the attention_image LoRA preset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd35dist.config.recipe import DatasetSection, LoraSection, Recipe
from sd35dist.data.buckets import SD35_BUCKETS, plan_fit
from sd35dist.data.image_source import PreparedImage, SourceImage, prepare_image
from sd35dist.trainer.flow_matching import sample_timestep_indices
from sd35dist.trainer.loop import recipe_learning_rate, training_schedule

pytestmark = pytest.mark.unit


def recipe(model: Path, **train) -> Recipe:
    return Recipe.model_validate({"name": "r", "model": {"pretrained": str(model)}, "data": {"cache_url": "/c"},
                                  "output": {"dir": "/o"}, "train": train})


def test_flow_shift_changes_the_timesteps_training_draws(tiny_model):
    def drawn(**train) -> torch.Tensor:
        schedule = training_schedule(recipe(tiny_model, **train))
        indices = sample_timestep_indices("logit_normal", 4096, torch.Generator().manual_seed(0), logit_mean=0.0,
                                          logit_std=1.0, mode_scale=1.29)
        return schedule.timesteps_at(indices)

    model_default, shift_one, shift_three = drawn(), drawn(flow_shift=1.0), drawn(flow_shift=3.0)
    assert torch.equal(model_default, shift_three), "the tiny model's scheduler ships shift 3.0"
    assert not torch.equal(shift_one, shift_three)
    assert float(shift_one.median()) == pytest.approx(500, abs=15), "shift 1: logit-normal centred on the middle"
    assert float(shift_three.median()) > 700, "shift 3 pushes training towards noise"


def test_polynomial_decays_to_lr_end_with_lr_power_like_diffusers():
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup

    train = recipe(Path("/m"), learning_rate=1e-4, lr_scheduler="polynomial", lr_warmup_steps=3, lr_end=4e-7,
                   lr_power=0.8).train
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    reference = get_polynomial_decay_schedule_with_warmup(optimizer, 3, 30, lr_end=4e-7, power=0.8)
    for step in range(35):
        assert recipe_learning_rate(train, step, 30) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        reference.step()
    assert recipe_learning_rate(train, 40, 30) == pytest.approx(4e-7)


def test_crop_styles_place_the_crop_where_simpletuner_does(tmp_path):
    center = plan_fit((1920, 1080), SD35_BUCKETS)
    corner = plan_fit((1920, 1080), SD35_BUCKETS, crop_style="corner")
    randoms = {plan_fit((1920, 1080), SD35_BUCKETS, crop_style="random", crop_seed=s).crop_box for s in range(20)}
    assert corner.crop_box[:2] == (0, 0) and center.crop_box[0] == (center.resized[0] - 1344) // 2
    assert len(randoms) > 10 and all(box[2] - box[0] == 1344 and box[3] - box[1] == 768 for box in randoms)

    pixels = np.zeros((1080, 1920, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.linspace(0, 255, 1920, dtype=np.uint8)  # red grows left to right
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a wide image")

    def prepared(style: str, path: str = "wide.png", seed: int = 0) -> PreparedImage:
        dataset = DatasetSection(id="d", source=str(tmp_path), crop_style=style)
        result = prepare_image(SourceImage("d", path, str(tmp_path / "wide.png"), str(tmp_path / "wide.txt")),
                               dataset, SD35_BUCKETS, {}, seed)
        assert isinstance(result, PreparedImage)
        return result

    lefts = {style: prepared(style).fit.crop_box[0] for style in ("center", "corner", "random")}
    assert lefts["corner"] == 0 < lefts["random"] != lefts["center"]
    assert prepared("random").fit == prepared("random").fit, "the same crop on every build"
    assert prepared("random", seed=1).fit != prepared("random").fit, "drawn from data.shuffle_seed"
    red = {style: float(prepared(style).pixels[0].mean()) for style in ("center", "corner")}
    assert red["corner"] < red["center"], "the corner crop holds the image's left (darker) part"


def test_attention_image_preset_is_simpletuners_sd3_default():
    from sd35dist.config.model_size import SD35_LARGE_CONFIG
    from sd35dist.models.lora import inject_lora
    from sd35dist.models.transformer_build import build_on_meta

    model = build_on_meta({**SD35_LARGE_CONFIG, "num_layers": 2}, dtype=torch.bfloat16)
    inject_lora(model, LoraSection(rank=4, alpha=4, targets="attention_image"), dtype=torch.float32)
    adapted = sorted({n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_A" in n})
    assert adapted == [f"transformer_blocks.{b}.attn.{m}" for b in (0, 1) for m in ("to_k", "to_out.0", "to_q", "to_v")]
