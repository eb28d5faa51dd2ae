"""`sd35dist import simpletuner`: the seed tutorial's config.json, config.env and
multidatabackend.json (fixtures/simpletuner/, copied from it) become a recipe that validates
and carries the tutorial's values; what means something else is converted with a comment;
what has no place is listed; bad configs are one line and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from sd35dist.cli import main as cli_main
from sd35dist.config.recipe import load_recipe
from sd35dist.importers.simpletuner import buckets_for, convert
from sd35dist.importers.simpletuner_options import MAPPED

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent / "fixtures" / "simpletuner"


def run_import(capsys, config: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = cli_main(["import", "simpletuner", str(config), *extra, "-o", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("config", ["config.json", "config.env"])
def test_the_tutorials_config_becomes_a_valid_recipe_with_its_values(capsys, tmp_path, config):
    out = tmp_path / "recipe.yaml"
    code, stdout, err = run_import(capsys, FIXTURES / config, out, "--backend", str(FIXTURES / "multidatabackend.json"))
    assert code == 0, err
    recipe = load_recipe(out)  # the schema accepts it (unknown keys would be errors)
    train = recipe.train
    assert (train.learning_rate, train.train_batch_size, train.gradient_accumulation_steps) == (1.05e-3, 6, 1)
    assert (train.max_train_steps, train.num_train_epochs) == (24000, None), "num_train_epochs 0: steps decide"
    assert (train.checkpointing_steps, train.checkpoints_total_limit, train.resume) == (400, 60, "latest")
    assert (train.optimizer, train.mixed_precision, train.gradient_checkpointing) == ("adamw_bf16", "bf16", True)
    assert (train.lr_scheduler, train.lr_warmup_steps, train.caption_dropout_probability) == ("cosine", 2400, 0.0)
    assert (train.ema.enabled, train.ema.decay) == (False, 0.999)
    assert recipe.seed == 42 and recipe.name == "simpletuner-fantasy-art-lora-01"
    assert recipe.model.pretrained == "stabilityai/stable-diffusion-3.5-large"
    assert recipe.output.dir.endswith("fantasy_art_L_01/datasets/models")
    assert (recipe.logging.report_to, recipe.logging.tracker_project_name) == ("wandb", "sd35-training")
    assert recipe.data.cache_batch_size == 12
    [dataset] = recipe.data.datasets  # the text-embeds entry is a cache, not a dataset
    assert (dataset.id, dataset.source) == ("fantasy_art_neo", "/weka2/home-yeo/datasets/SDXL/duplicate_shuffle_01")
    assert (dataset.caption_strategy, dataset.crop, dataset.minimum_image_size) == ("textfile", False, 1024)
    assert dataset.repeats == 2, "SimpleTuner repeats 1 = seen twice"
    text = out.read_text()
    for converted in ("# SimpleTuner's cosine restarts every lr_warmup_steps", "# SimpleTuner's adamw_bf16 rounds",
                      "# SimpleTuner repeats 1 means seen 2×", "# a hub id in SimpleTuner"):
        assert converted in text
    not_mapped = [line for line in stdout.splitlines() if line.startswith("not mapped: ")]
    lora = train.lora
    assert (lora.rank, lora.alpha, lora.targets) == (768, 768.0, "attention"), "model_type lora: the tutorial's LoRA"
    validation = recipe.validation
    [prompt] = validation.prompts  # the tutorial's config.json and config.env word it differently
    assert prompt.startswith("k4s4, a waist up view of a beautiful ") and prompt.endswith("blonde woman, green eyes")
    assert (validation.negative_prompt, validation.seeds, validation.every_n_steps) == ("blurry, cropped, ugly", [42],
                                                                                        {"config.json": 200, "config.env": 70}[config])
    assert (validation.guidance_scale, validation.num_inference_steps, validation.resolutions) == (7.5, 30, [(1024, 1024)])
    assert any(line.startswith("not mapped: validation_guidance_rescale = ") for line in not_mapped)
    assert any("cache_dir_vae" in line for line in not_mapped)
    assert any(line.startswith('not mapped: instance_prompt = "k4s4 "') for line in not_mapped)
    if config == "config.json":  # every option is mapped or listed with why
        keys = [key.removeprefix("--") for key in json.loads((FIXTURES / config).read_text())]
        listed = {line.split(" = ")[0].removeprefix("not mapped: ") for line in not_mapped}
        assert all(key in MAPPED or key in listed for key in keys)
        assert all(line.count(": ") >= 2 for line in not_mapped), "each with its reason"


def test_json_and_env_forms_give_the_same_recipe(capsys, tmp_path):
    recipes = {}
    for config in ("config.json", "config.env"):
        out = tmp_path / f"{config}.yaml"
        assert run_import(capsys, FIXTURES / config, out, "--backend", str(FIXTURES / "multidatabackend.json"))[0] == 0
        recipes[config] = load_recipe(out).model_dump()
        recipes[config].pop("validation")  # the tutorial's two files word the prompt and space the rounds differently
    assert recipes["config.json"] == recipes["config.env"]


def test_backend_found_through_data_backend_config(capsys, tmp_path):
    shutil.copy(FIXTURES / "multidatabackend.json", tmp_path / "multidatabackend.json")
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": "multidatabackend.json",
                                                      "train_batch_size": "2", "gradient_checkpointing": "false"}))
    code, stdout, err = run_import(capsys, tmp_path / "config.json", tmp_path / "r.yaml")
    assert code == 0, err
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.data.datasets[0].id == "fantasy_art_neo"
    assert recipe.train.train_batch_size == 2 and recipe.train.gradient_checkpointing is False, "strings as SimpleTuner writes"


@pytest.mark.parametrize("content, key", [
    ('{"--train_batch_sise": 6}', "--train_batch_sise"),
    ('{"--train_batch_size": "six"}', "--train_batch_size"),
    ('{"--learning_rate": 1e-4,}', "not JSON"),
    ('{"--model_family": "flux"}', "--model_family"),
])
def test_bad_config_is_one_line_with_exit_2_and_writes_nothing(capsys, tmp_path, content, key):
    (tmp_path / "config.json").write_text(content)
    code, _, err = run_import(capsys, tmp_path / "config.json", tmp_path / "r.yaml")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: config.json: ") and key in err
    assert not (tmp_path / "r.yaml").exists()


def test_bad_env_and_backend_are_one_line(capsys, tmp_path):
    (tmp_path / "config.env").write_text("export LR_WARMUP_STEPS=$((MAX_NUM_STEPS / 10))\n")
    code, _, err = run_import(capsys, tmp_path / "config.env", tmp_path / "r.yaml")
    assert code == 2 and "line 1" in err and err.count("\n") == 1
    (tmp_path / "config.env").write_text("export LEARNING_RATEE=1e-4\n")
    code, _, err = run_import(capsys, tmp_path / "config.env", tmp_path / "r.yaml")
    assert code == 2 and "LEARNING_RATEE" in err
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "backend.json").write_text('[{"id": "a", "instance_data_dir": "/d", "crop_sytle": "center"}]')
    code, _, err = run_import(capsys, tmp_path / "config.json", tmp_path / "r.yaml", "--backend", str(tmp_path / "backend.json"))
    assert code == 2 and "[0].crop_sytle" in err and not (tmp_path / "r.yaml").exists()


def test_schedules_with_another_meaning_are_converted_or_listed():
    constant = convert({"lr_scheduler": "constant", "lr_warmup_steps": 100}, None, "c.json")
    assert constant.recipe["train"]["lr_warmup_steps"] == 0, "SimpleTuner's constant never warms up"
    assert any("ignores lr_warmup_steps" in c for c in constant.comments[("train", "lr_warmup_steps")])
    sine = convert({"lr_scheduler": "sine", "lr_warmup_steps": 100}, None, "c.json")
    assert "lr_scheduler" not in sine.recipe.get("train", {})
    assert [key for key, _, _ in sine.unmapped] == ["lr_scheduler", "lr_warmup_steps"]
    assert buckets_for(1024)[0] == [1024, 1024] and buckets_for(512)[:2] == [[512, 512], [576, 448]]
    half = convert({"resolution": 512, "resolution_type": "pixel_area"}, None, "c.json")
    assert yaml.safe_load(yaml.safe_dump(half.recipe))["data"]["buckets"][0] == [512, 512]
