"""`sd35dist import simpletuner` with SimpleTuner's meaning: the seed tutorial's config.json,
config.env and multidatabackend.json (fixtures/simpletuner/) become a recipe that validates and
carries their values; what the config leaves out gets SimpleTuner's defaults, written out; its
spellings and semantics (instanceprompt, centre, crop defaults, constant with warmup,
polynomial end/power, value clipping, LoRA targets, flow shift, SLG) are honoured; unknown
options are all named in one line; bad input and credentials are one line, exit 2, nothing
written or printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sd35dist.cli import main as cli_main
from sd35dist.config.recipe import load_recipe
from sd35dist.importers.simpletuner import convert
from sd35dist.importers.simpletuner_datasets import buckets_for

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent / "fixtures" / "simpletuner"
SD3 = {"model_family": "sd3", "model_type": "lora"}


def run_import(capsys, config: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = cli_main(["import", "simpletuner", str(config), *extra, "-o", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def imported(tmp_path: Path, capsys, options: dict, backend: list | None = None, *extra: str) -> tuple[dict, str]:
    """Import `options` (and `backend`) written as SimpleTuner files; the recipe as a mapping and stdout."""
    (tmp_path / "config.json").write_text(json.dumps(options))
    args = []
    if backend is not None:
        (tmp_path / "backend.json").write_text(json.dumps(backend))
        args = ["--backend", str(tmp_path / "backend.json")]
    out = tmp_path / "recipe.yaml"
    out.unlink(missing_ok=True)
    code, stdout, err = run_import(capsys, tmp_path / "config.json", out, *args, *extra)
    assert code == 0, err
    load_recipe(out)  # the schema accepts it
    return yaml.safe_load(out.read_text()), stdout


@pytest.mark.parametrize("config", ["config.json", "config.env"])
def test_the_tutorials_config_becomes_a_valid_recipe_with_its_values(capsys, tmp_path, config):
    out = tmp_path / "recipe.yaml"
    code, stdout, err = run_import(capsys, FIXTURES / config, out, "--backend", str(FIXTURES / "multidatabackend.json"))
    assert code == 0, err
    recipe = load_recipe(out)
    train = recipe.train
    assert (train.learning_rate, train.train_batch_size, train.gradient_accumulation_steps) == (1.05e-3, 6, 1)
    assert (train.max_train_steps, train.num_train_epochs) == (24000, None), "num_train_epochs 0: steps decide"
    assert (train.checkpointing_steps, train.checkpoints_total_limit, train.resume) == (400, 60, "latest")
    assert (train.optimizer, train.mixed_precision, train.gradient_checkpointing) == ("adamw_bf16", "bf16", True)
    assert (train.lr_scheduler, train.lr_warmup_steps, train.caption_dropout_probability) == ("cosine", 2400, 0.0)
    assert (train.ema.enabled, train.ema.decay) == (False, 0.999)
    assert (train.max_grad_norm, train.grad_clip_method, train.adam_weight_decay) == (2.0, "value", 0.01), "its defaults"
    assert recipe.seed == 42 and recipe.name == "simpletuner-fantasy-art-lora-01"
    assert recipe.model.pretrained == "stabilityai/stable-diffusion-3.5-large", "a hub id, resolved by submit"
    assert recipe.output.dir.endswith("fantasy_art_L_01/datasets/models")
    assert (recipe.logging.report_to, recipe.logging.tracker_project_name) == ("wandb", "sd35-training")
    assert (recipe.data.cache_batch_size, recipe.data.max_sequence_length) == (12, 154)
    [dataset] = recipe.data.datasets  # the text-embeds entry is SimpleTuner's cache, not a dataset
    assert (dataset.id, dataset.source) == ("fantasy_art_neo", "/weka2/home-yeo/datasets/SDXL/duplicate_shuffle_01")
    assert (dataset.caption_strategy, dataset.crop, dataset.minimum_image_size) == ("textfile", False, 1024)
    assert dataset.repeats == 2, "SimpleTuner repeats 1 = seen twice"
    text = out.read_text()
    for converted in ("# SimpleTuner's cosine restarts every lr_warmup_steps", "# SimpleTuner's adamw_bf16 rounds",
                      "# SimpleTuner repeats 1 means seen 2×", "# SimpleTuner's default (max_grad_norm 2.0)"):
        assert converted in text
    lora = train.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (768, 768.0, 0.1, "attention_image")
    validation = recipe.validation
    assert validation.prompts[0].startswith("k4s4, a waist up view of a beautiful ") and validation.prompts[1] == ""
    assert (validation.negative_prompt, validation.seeds, validation.every_n_steps) == (
        "blurry, cropped, ugly", [42], {"config.json": 200, "config.env": 70}[config])
    assert (validation.guidance_scale, validation.num_inference_steps, validation.resolutions) == (7.5, 30, [(1024, 1024)])
    not_applied = [line for line in stdout.splitlines() if line.startswith("not applied: ")]
    assert any(line.startswith("not applied: snr_gamma = ") for line in not_applied)
    assert all(line.count(": ") >= 2 for line in not_applied), "each with its reason"
    if config == "config.json":  # every option is applied, listed with why, or off
        listed = {line.split(" = ")[0].removeprefix("not applied: ") for line in not_applied}
        assert {"push_checkpoints_to_hub", "hub_model_id", "enable_xformers_memory_efficient_attention"} <= listed
        assert "push_to_hub" not in listed and "delete_unwanted_images" not in listed, "off: nothing to say"


def test_json_and_env_forms_give_the_same_recipe(capsys, tmp_path):
    recipes = {}
    for config in ("config.json", "config.env"):
        out = tmp_path / f"{config}.yaml"
        assert run_import(capsys, FIXTURES / config, out, "--backend", str(FIXTURES / "multidatabackend.json"))[0] == 0
        recipes[config] = load_recipe(out).model_dump()
        recipes[config].pop("validation")  # the tutorial's two files word the prompt and space the rounds differently
    assert recipes["config.json"] == recipes["config.env"]


def test_what_the_config_leaves_out_gets_simpletuners_defaults_written_out(capsys, tmp_path):
    recipe, _ = imported(tmp_path, capsys, {**SD3, "validation_prompt": "a fox"}, [
        {"id": "d", "type": "local", "instance_data_dir": "/data", "caption_strategy": "instanceprompt",
         "instance_prompt": "k4s4"}])
    train, lora, validation = recipe["train"], recipe["train"]["lora"], recipe["validation"]
    assert (train["learning_rate"], train["train_batch_size"], train["adam_weight_decay"]) == (4e-7, 4, 0.01)
    assert (train["max_grad_norm"], train["grad_clip_method"], train["optimizer"]) == (2.0, "value", "adamw_bf16")
    assert (train["ema"]["decay"], train["caption_dropout_probability"], train["flow_shift"]) == (0.995, 0.1, 3.0)
    assert (train["checkpointing_steps"], train["checkpoints_total_limit"], train["num_train_epochs"]) == (500, 5, 1)
    assert (train["lr_scheduler"], train["lr_warmup_steps"]) == ("constant", 0), "constant_with_warmup, 0 steps"
    assert (lora["rank"], lora["alpha"], lora["dropout"], lora["targets"]) == (16, 16.0, 0.1, "attention_image")
    assert recipe["model"]["pretrained"] == "stabilityai/stable-diffusion-3.5-medium", "SimpleTuner's SD3 flavour medium"
    assert (recipe["seed"], recipe["output"]["dir"], recipe["logging"]["report_to"]) == (0, "simpletuner-results", "none")
    assert (validation["every_n_steps"], validation["guidance_scale"], validation["resolutions"]) == (100, 7.5, [[256, 256]])
    assert validation["prompts"] == ["a fox", ""] and validation["negative_prompt"] == "blurry, cropped, ugly"
    [dataset] = recipe["data"]["datasets"]
    assert (dataset["caption_strategy"], dataset["instance_prompt"], dataset["crop"]) == ("instance_prompt", "k4s4", False)
    assert dataset["repeats"] == 1 and "crop_style" not in dataset


def test_simpletuners_spellings_and_semantics(capsys, tmp_path):
    recipe, stdout = imported(tmp_path, capsys, {
        **SD3, "lr_scheduler": "polynomial", "lr_warmup_steps": 10, "max_train_steps": 100, "learning_rate": 1e-4,
        "flow_schedule_shift": 1, "grad_clip_method": "norm", "validation_prompt": "x", "validation_guidance": 4.0,
        "validation_guidance_skip_layers": "[7, 8, 9]", "validation_guidance_skip_scale": 3.0,
        "validation_disable_unconditional": True, "peft_lora_target_modules": ["to_q", "to_k"],
        "checkpointing_steps": 250, "validation_steps": 50, "resolution": 512, "resolution_type": "pixel_area"},
        [{"id": "a b", "instance_data_dir": "/a", "crop": True, "crop_style": "centre", "caption_strategy": "filename"},
         {"id": "r", "instance_data_dir": "/r", "crop": True, "repeats": 3},
         {"id": "hf", "type": "huggingface", "dataset_name": "someone/images", "revision": "v2", "crop": True,
          "huggingface": {"caption_column": "text", "filter_func": {"min_width": 512}}},
         {"id": "ws", "type": "webshart", "source": "someone/shards"},
         {"id": "embeds", "dataset_type": "text_embeds", "cache_dir": "cache/text"}])
    train = recipe["train"]
    assert (train["lr_scheduler"], train["lr_end"], train["lr_power"]) == ("polynomial", 4e-7, 0.8)
    assert (train["flow_shift"], train["grad_clip_method"], train["checkpointing_steps"]) == (1, "norm", 250)
    assert train["lora"]["targets"] == ["to_q", "to_k"]
    validation = recipe["validation"]
    assert validation["skip_layer_guidance"] == {"layers": [7, 8, 9], "scale": 3.0, "start": 0.01, "stop": 0.2}
    assert validation["prompts"] == ["x"] and validation["every_n_steps"] == 50
    first, second, hub = recipe["data"]["datasets"]
    assert (first["id"], first["crop_style"], second["crop_style"], second["repeats"]) == ("a-b", "center", "random", 4)
    assert hub == {"id": "hf", "source": "hf://datasets/someone/images@v2/data/train-*.parquet", "format": "parquet",
                   "image_column": "image", "caption_column": "text", "caption_strategy": "textfile", "repeats": 1,
                   "crop": True, "crop_style": "random"}, "its train split's parquet files, SimpleTuner's column defaults"
    assert recipe["data"]["buckets"] == [[512, 512]], "crop with crop_aspect square (its default): one square bucket"
    assert any("(hf).huggingface.filter_func" in line and "every row of the split is used here" in line
               for line in stdout.splitlines())
    assert any("type webshart cannot be read here yet" in line for line in stdout.splitlines())
    constant, _ = imported(tmp_path, capsys, {**SD3, "lr_scheduler": "constant", "lr_warmup_steps": 100})
    assert (constant["train"]["lr_scheduler"], constant["train"]["lr_warmup_steps"]) == ("constant", 100), \
        "SimpleTuner's constant with warmup warms up"


def test_family_controlnet_lycoris_and_optimizers_are_refused(capsys, tmp_path):
    cases = [({"model_type": "lora"}, "--model_family: missing"), ({"model_family": "hidream"}, "hidream: sd35dist trains"),
             ({"model_family": "flux", "model_flavour": "kontext"}, "flux: sd35dist trains"),
             ({**SD3, "controlnet": True}, "--controlnet: true: ControlNet training is not offered"),
             ({**SD3, "lora_type": "lycoris"}, "--lycoris_config: config/lycoris_config.json: no such file"), ({**SD3, "optimizer": "prodigy"}, "prodigy")]
    for options, expected in cases:
        (tmp_path / "config.json").write_text(json.dumps(options))
        code, _, err = run_import(capsys, tmp_path / "config.json", tmp_path / "r.yaml")
        assert code == 2 and err.count("\n") == 1 and expected in err, (options, err)
        assert not (tmp_path / "r.yaml").exists()


def test_unknown_options_are_all_named_in_one_line_unless_allowed(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SD3, "--train_batch_sise": 6, "lerning_rate": 1, "seed": 1}))
    code, _, err = run_import(capsys, tmp_path / "config.json", tmp_path / "r.yaml")
    assert code == 2 and err.count("\n") == 1 and "--train_batch_sise, --lerning_rate" in err and "--allow-unknown" in err
    code, out, err = run_import(capsys, tmp_path / "config.json", tmp_path / "r.yaml", "--allow-unknown")
    assert code == 0, err
    assert "not applied: train_batch_sise = 6: unknown to SimpleTuner's parser" in out and "lerning_rate = 1" in out


def test_config_env_reads_helper_variables_and_refuses_near_misses(capsys, tmp_path):
    (tmp_path / "config.env").write_text('export BASE_DIR="/home/me"\nexport OUTPUT_DIR="${BASE_DIR}/out"\n'
                                         "export MODEL_FAMILY=sd3\nexport CHECKPOINTING_STEPS=300\nexport MY_NOTE=hello\n"
                                         'export TRAINER_EXTRA_ARGS="--lora_rank=8 --flow_schedule_shift 2"\n')
    code, out, err = run_import(capsys, tmp_path / "config.env", tmp_path / "r.yaml")
    assert code == 0, err
    recipe = load_recipe(tmp_path / "r.yaml")
    assert (recipe.output.dir, recipe.train.checkpointing_steps, recipe.train.flow_shift) == ("/home/me/out", 300, 2.0)
    assert "$BASE_DIR" in out and "$MY_NOTE" in out and "hello" not in out, "listed, values never printed"
    (tmp_path / "config.env").write_text("export MODEL_FAMILY=sd3\nexport LEARNING_RATEE=1e-4\n")
    code, _, err = run_import(capsys, tmp_path / "config.env", tmp_path / "r2.yaml")
    assert code == 2 and "LEARNING_RATEE: not a variable SimpleTuner reads: did you mean LEARNING_RATE?" in err
    (tmp_path / "config.env").write_text("export LR_WARMUP_STEPS=$((MAX_NUM_STEPS / 10))\n")
    code, _, err = run_import(capsys, tmp_path / "config.env", tmp_path / "r3.yaml")
    assert code == 2 and "line 1" in err and err.count("\n") == 1


@pytest.mark.parametrize("options, backend, key", [
    ({"learning_rate": float("inf")}, None, "--learning_rate: inf is not a finite number"),
    ({"learning_rate": "NaN"}, None, "--learning_rate: 'NaN' is not a finite number"),
    ({"max_grad_norm": -1}, None, "--max_grad_norm: -1 is negative"),
    ({"pretrained_model_name_or_path": None}, None, "--pretrained_model_name_or_path: is null"),
    ({"resolution": 10000, "resolution_type": "pixel_area"}, None, "--resolution: 10000 as pixel_area gives 14375-pixel"),
    ({"resolution": 1024, "resolution_type": "area"}, None, "takes megapixels"),
    ({"validation_prompt": "x", "validation_resolution": "10000x1024"}, None, "--validation_resolution: 10000x1024"),
    ({}, [{"id": "d", "instance_data_dir": "/d", "repeats": -2}], "backend.json[0]: repeats: -2 is negative"),
    ({}, [{"id": "d", "instance_data_dir": "/d", "crop_sytle": "center"}], "[0].crop_sytle: not dataset key SimpleTuner reads"),
    ({"train_batch_size": "six"}, None, "--train_batch_size: expected an integer"),
])
def test_bad_values_are_one_line_with_exit_2_and_write_nothing(capsys, tmp_path, options, backend, key):
    (tmp_path / "config.json").write_text(json.dumps({**SD3, **options}))
    args = []
    if backend is not None:
        (tmp_path / "backend.json").write_text(json.dumps(backend))
        args = ["--backend", str(tmp_path / "backend.json")]
    code, _, err = run_import(capsys, tmp_path / "config.json", tmp_path / "r.yaml", *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and key in err, err
    assert not (tmp_path / "r.yaml").exists() and "None" not in err


def test_unreadable_files_and_outputs_are_one_line(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SD3))
    (tmp_path / "backend.json").write_bytes(b'[{"id": "caf\xe9", "instance_data_dir": "/d"}]')
    code, _, err = run_import(capsys, tmp_path / "config.json", tmp_path / "r.yaml", "--backend", str(tmp_path / "backend.json"))
    assert code == 2 and "backend.json: not UTF-8 text" in err and err.count("\n") == 1
    code, _, err = run_import(capsys, tmp_path / "config.json", tmp_path / "missing" / "r.yaml")
    assert code == 2 and "does not exist: create it first" in err and not (tmp_path / "missing").exists()
    (tmp_path / "bad.json").write_text('{"learning_rate": 1e-4,}')
    code, _, err = run_import(capsys, tmp_path / "bad.json", tmp_path / "r.yaml")
    assert code == 2 and "not JSON" in err


def test_credentials_never_reach_the_recipe_or_the_terminal(capsys, tmp_path):
    key_id, secret = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    recipe, out = imported(tmp_path, capsys, SD3, [{"id": "s3", "type": "aws", "aws_bucket_name": "images",
                                                      "aws_access_key_id": key_id, "aws_secret_access_key": secret,
                                                      "aws_endpoint_url": "https://s3.example.org"}])
    text = (tmp_path / "recipe.yaml").read_text()
    assert key_id not in text + out and secret not in text + out
    assert recipe["data"]["datasets"][0]["source"] == "s3://images/"
    assert recipe["data"]["storage_options"] == {"endpoint_url": "https://s3.example.org"}
    assert "aws_secret_access_key = (a credential: not shown, not written)" in out and "env.passthrough" in out
    (tmp_path / "config.env").write_text(f"export MODEL_FAMILY=sd3\nexport OUTPUT_DIR=s3://{key_id}:{secret}@bucket/out\n"
                                         f"export AWS_SECRET_ACCESS_KEY={secret}\n")
    code, out, err = run_import(capsys, tmp_path / "config.env", tmp_path / "env.yaml")
    assert code == 2 and "--output_dir: holds a credential" in err and secret not in out + err and key_id not in err
    assert not (tmp_path / "env.yaml").exists()


def test_bucket_scaling_and_conversion_without_files():
    assert buckets_for(1024)[0] == [1024, 1024] and buckets_for(512)[:2] == [[512, 512], [576, 448]]
    half = convert({**SD3, "resolution": 512, "resolution_type": "pixel_area"}, None, "c.json")
    assert yaml.safe_load(yaml.safe_dump(half.recipe))["data"]["buckets"][0] == [512, 512]
    assert half.recipe["data"]["datasets"] == [] and any("no multidatabackend.json read" in n for n in half.notes)
