"""Shared by the validation checks in test_train.py (FSDP2) and test_train_zero.py (ZeRO-3): a training
run with validation on next to the module's straight run with it off, and a 1-process render to compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from sd35dist.cli import main as sd35dist_main

PROMPTS = ["a red fox", "k4s4, a blue square", "a green circle"]  # 3 pairs on 2 ranks: a placeholder round
VALIDATION = {"prompts": PROMPTS, "negative_prompt": "blurry", "seeds": [5], "every_n_steps": 3, "at_start": True,
              "num_inference_steps": 3, "guidance_scale": 4.0, "resolutions": [[32, 32]]}


def with_validation(recipe: Path, **validation) -> Path:
    data = yaml.safe_load(recipe.read_text())
    data["validation"] = {**VALIDATION, **validation}
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    return recipe


def cache_validation_prompts(recipe: Path) -> None:
    """`sd35dist cache --validation-only` on an existing cache: one process, text encoders only."""
    assert sd35dist_main(["cache", "--recipe", str(with_validation(recipe)), "--validation-only"]) == 0


def render_one_process(cache: tuple[Path, Path], state: dict[str, torch.Tensor],
                       dtype: torch.dtype = torch.float32) -> dict[int, np.ndarray]:
    """The same pairs with a checkpoint's weights in one plain process (world size 1, no process group);
    in bf16 as the ranks compute: weights and inputs bf16, the timestep fp32."""
    from diffusers import SD3Transformer2DModel

    from sd35dist.config.validation_section import ValidationSection
    from sd35dist.data.manifest import read_manifest
    from sd35dist.data.storage import Store
    from sd35dist.data.validation_prompts import read_validation_prompts
    from sd35dist.models.sd3_components import load_vae
    from sd35dist.validation.guidance import GuidanceSettings
    from sd35dist.validation.render import Renderer, validation_pairs
    from sd35dist.validation.sampler import SampleSettings, latent_shape_of
    from tests.cli_runs import one_torch_thread

    model_dir, cache_dir = cache
    store = Store(str(cache_dir))
    embeddings = read_validation_prompts(store, read_manifest(store), ValidationSection(**VALIDATION), "r.yaml")
    transformer = SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    transformer.load_state_dict(state)
    transformer.to(dtype)
    vae = load_vae(model_dir)
    config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    def forward(**inputs: torch.Tensor) -> torch.Tensor:
        cast = {k: v if k == "timestep" else v.to(dtype) for k, v in inputs.items()}
        return transformer(**cast, return_dict=False)[0]

    renderer = Renderer(forward=forward, vae=vae,
                        scheduler_config=config, latent_shape=latent_shape_of(transformer.config, vae),
                        device=torch.device("cpu"))
    settings = SampleSettings(steps=VALIDATION["num_inference_steps"],
                              guidance=GuidanceSettings(kind="cfg", scale=VALIDATION["guidance_scale"]))
    with one_torch_thread():  # as the ranks run (OMP_NUM_THREADS=1)
        return renderer.render(validation_pairs(len(PROMPTS), VALIDATION["seeds"], [(32, 32)]), embeddings, settings)


def images_of(run_dir: Path, step: int, weights: str) -> dict[int, np.ndarray]:
    folder = run_dir / "validation" / f"step-{step:06d}"
    return {p: np.asarray(Image.open(folder / f"{weights}-p{p:02d}-seed5-32x32.png")) for p in range(len(PROMPTS))}




def check_validation_run(run: Path, straight_losses: dict[int, float], cache: tuple[Path, Path],
                         final_states: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype = torch.float32) -> None:
    """The asserts on one validation-on run; `final_states`: weights name -> the last checkpoint's tensors."""
    last = max(straight_losses)
    rounds = sorted(p.name for p in (run / "validation").iterdir())
    every = VALIDATION["every_n_steps"]
    assert rounds == [f"step-{s:06d}" for s in range(0, last + 1, every)]  # at_start, then every N steps
    for name in rounds:
        grid = Image.open(run / "validation" / name / "grid.png")
        assert grid.width > len(final_states) * 32 and grid.height > len(PROMPTS) * 32
        assert len(list((run / "validation" / name).glob("*-p0*-seed5-32x32.png"))) == len(PROMPTS) * len(final_states)
    # The training job wrote the report at its checkpoints and at the end, with every round's grid.
    page = (run / "report.html").read_text()
    assert page.count("<h3>step ") == len(rounds)
    assert (run / "plots" / "loss.png").is_file()
    # Validation does not change training: the same losses, bit for bit.
    assert losses_of(run) == straight_losses
    # Training moved the weights, and the images show it.
    assert any(not np.array_equal(a, b) for a, b in zip(images_of(run, 0, "model").values(),
                                                          images_of(run, last, "model").values()))
    # Images are a function of (weights, prompt, seed, settings): 2 ranks == 1 process, pixel for pixel.
    for weights, state in final_states.items():
        expected = render_one_process(cache, state, dtype)
        got = images_of(run, last, weights)
        for p in range(len(PROMPTS)):
            if dtype == torch.float32:
                assert np.array_equal(got[p], expected[p]), (weights, p)
            else:  # bf16 rounds differently inside DeepSpeed's engine: ~1/255 apart, training moves them ~20
                diff = np.abs(got[p].astype(int) - expected[p].astype(int))
                assert diff.mean() < 3, (weights, p, diff.mean())


def losses_of(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics-rank00000.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}
