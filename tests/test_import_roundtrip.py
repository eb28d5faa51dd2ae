"""Round trip: every real SD3 config of SimpleTuner's repository and SD3 guide (and the seed
tutorial's), kept with their commit in fixtures/simpletuner/ (SOURCES.md), imports with exit 0,
the recipe it writes validates, and `sd35dist submit --dry-run` renders its jobs with the model's
Hugging Face id resolved from the cache (no network). ControlNet is refused in one line; the
example whose dataset is a Hugging Face dataset (RareConcepts/Domokun) imports it as a parquet
dataset of its train split's files (hf://datasets/…), which the cache job's dry run finds cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main as submit_main
from sd35dist.cli import main as cli_main
from sd35dist.config.recipe import load_recipe
from tests.hub_cache import folder_files, lay_out_snapshot

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent / "fixtures" / "simpletuner"
QUICKSTART = FIXTURES / "roundtrip" / "quickstart-sd3"
DOMOKUN = "RareConcepts/Domokun"
# (config, backend or None: the config's own data_backend_config, datasets imported)
CONFIGS = [
    (FIXTURES / "config.json", FIXTURES / "multidatabackend.json", 1),
    (FIXTURES / "config.env", FIXTURES / "multidatabackend.json", 1),
    (FIXTURES / "roundtrip" / "sd3-peft-lora" / "config.json", None, 1),
    (QUICKSTART / "config.json", QUICKSTART / "multidatabackend.json", 1),
    (QUICKSTART / "config-quantised.json", QUICKSTART / "multidatabackend.json", 1),
    (QUICKSTART / "config-slg.json", QUICKSTART / "multidatabackend.json", 1),
    (QUICKSTART / "config-preview.json", QUICKSTART / "multidatabackend.json", 1),
    (QUICKSTART / "config.env", None, 1),
]


@pytest.fixture(scope="module")
def hf_home(tiny_model, tmp_path_factory) -> Path:
    """The tiny SD3 cached under the ids SimpleTuner's SD3 configs name (large, and medium: its default flavour),
    and the example's Hugging Face dataset as a one-file train split."""
    home = tmp_path_factory.mktemp("hf")
    for repo in ("stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-medium"):
        lay_out_snapshot(home / "hub", repo, folder_files(tiny_model))
    lay_out_snapshot(home / "hub", DOMOKUN, {"data/train-00000-of-00001.parquet": b"PAR1 (not read by a dry run)",
                                             "README.md": b"# Domokun\n"}, repo_type="dataset")
    return home


def dry_run(recipe: Path, hf_home: Path, tmp_path: Path, capsys, *args: str) -> tuple[int, str, str]:
    code = submit_main(["submit", "--profile", "local", "--recipe", str(recipe), "--dry-run", "--set", f"hf_home={hf_home}",
                        "--set", f"run_root={tmp_path / 'runs'}", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("config, backend, datasets", CONFIGS,
                         ids=[f"{c.parent.name}/{c.name}" for c, _, _ in CONFIGS])
def test_every_real_sd3_config_imports_validates_and_dry_runs(config, backend, datasets, hf_home, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing may be fetched: a closed port
    out = tmp_path / "recipe.yaml"
    code = cli_main(["import", "simpletuner", str(config), *(["--backend", str(backend)] if backend else []),
                     "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    recipe = load_recipe(out)
    assert len(recipe.data.datasets) == datasets and recipe.model.pretrained.startswith("stabilityai/")
    assert recipe.train.lora is not None and recipe.train.lora.targets in ("attention_image", ["to_q", "to_k"])
    # The tiny model stands in for SD3.5 Large: its position embedding covers 512 pixels a side, not SimpleTuner's
    # 1024, and it has 2 blocks, not the guide's skip-layer blocks 7-9 (submit checks both against the model).
    tiny = ["--set", "validation.resolutions=[[512, 512]]"]
    if recipe.validation.skip_layer_guidance is not None:
        tiny += ["--set", "validation.skip_layer_guidance.layers=[0, 1]"]
    hub_datasets = [d for d in recipe.data.datasets if d.source.startswith("hf://")]
    for job in ("train", "cache"):
        code, script, err = dry_run(out, hf_home, tmp_path, capsys, "--job", job, *tiny)
        assert code == 0, err
        # For the cache job, the model's encoders and the Hugging Face dataset's files are found in the cache.
        assert "export HF_HUB_OFFLINE=1" in script and "not in the Hugging Face cache" not in err
    if hub_datasets:
        assert [(d.source, d.format) for d in hub_datasets] == [(f"hf://datasets/{DOMOKUN}/data/train-*.parquet", "parquet")]
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def test_the_slg_guide_config_renders_with_skip_layer_guidance(tmp_path, capsys):
    out = tmp_path / "recipe.yaml"
    assert cli_main(["import", "simpletuner", str(QUICKSTART / "config-slg.json"), "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    validation = load_recipe(out).validation
    assert validation.skip_layer_guidance.layers == [7, 8, 9] and validation.guidance_scale == 4.0
    assert (validation.skip_layer_guidance.scale, validation.skip_layer_guidance.stop) == (2.8, 0.2)
    assert load_recipe(out).train.weighting_scheme == "uniform", "flow_use_uniform_schedule"
    assert "flow_schedule_auto_shift = true" in stdout
    assert validation.prompts[:3] == ["your main test prompt here", "your prompt to validate on",
                                      "another prompt to validate on"], "its user_prompt_library's prompts"


def test_controlnet_configs_are_refused_in_one_line(tmp_path, capsys):
    config = FIXTURES / "roundtrip" / "sd3-peft-controlnet-lora" / "config.json"
    code = cli_main(["import", "simpletuner", str(config), "-o", str(tmp_path / "r.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "ControlNet training is not offered" in err
    assert not (tmp_path / "r.yaml").exists()
