"""Every checkpoint holds its recipe; resuming with another model, data or optimizer is refused
(one line naming the keys), a listed change is accepted, step counts and the like change freely."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sd35dist.checkpoint.layout import CheckpointDir, read_info
from sd35dist.checkpoint.manager import check_recipe, resume_checkpoint
from sd35dist.checkpoint.recipe_match import (
    as_current_schema,
    changed_keys,
    is_guarded,
    matches,
    refused_changes,
    resume_refusal,
)
from sd35dist.config.loading import ConfigError
from sd35dist.config.recipe import Recipe, recipe_hash
from sd35dist.jobs.rank_inputs import load_rank_recipe
from tests.cli_runs import PROJECT, venv_env
from tests.train_runs import losses, train_recipe

BASE = {
    "name": "r", "seed": 0, "model": {"pretrained": "/m", "transformer_subfolder": "transformer"},
    "data": {"cache_url": "/c", "storage_options": {}, "datasets": [{"id": "a", "source": "/a"}],
             "buckets": [[64, 64]], "stream": {"prefetch_shards": 8}},
    "train": {"optimizer": "adamw", "adam_beta1": 0.9, "learning_rate": 1e-4, "max_train_steps": 10,
              "checkpointing_steps": 5, "resume_allow_changes": []},
    "parallel": {"strategy": "fsdp2", "shard_degree": None}, "logging": {"report_to": "none"},
    "output": {"dir": "/o"},
}


def changed(**paths) -> dict:
    """BASE with dotted keys set: changed(**{"train.optimizer": "adamw_bf16"})."""
    out = yaml.safe_load(yaml.safe_dump(BASE, sort_keys=False))
    for dotted, value in paths.items():
        node = out
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return out


@pytest.mark.unit
@pytest.mark.parametrize(("change", "refused"), [
    ({"model.pretrained": "/other"}, ["model.pretrained"]),
    ({"train.optimizer": "adamw_bf16", "train.adam_beta1": 0.8}, ["train.optimizer", "train.adam_beta1"]),
    ({"data.cache_url": "/c2"}, ["data.cache_url"]),
    ({"data.buckets": [[64, 64], [80, 48]]}, ["data.buckets"]),
    ({"data.datasets": [{"id": "a", "source": "/b"}]}, ["data.datasets[0].source"]),
    ({"data.datasets": [{"id": "a", "source": "/a"}, {"id": "b", "source": "/b"}]}, ["data.datasets"]),
    ({"seed": 1}, ["seed"]),
    ({"train.max_train_steps": 20, "train.checkpointing_steps": 2, "train.learning_rate": 5e-5,
      "parallel.shard_degree": 2, "logging.report_to": "wandb", "output.dir": "/o2", "name": "r2"}, []),
    ({"data.stream.prefetch_shards": 2, "data.storage_options": {"endpoint_url": "http://x"}}, []),
])
def test_what_a_resume_refuses(change, refused):
    assert refused_changes(BASE, changed(**change)) == refused


@pytest.mark.unit
def test_a_future_lora_section_is_guarded_wherever_it_sits():
    assert is_guarded("train.lora.rank") and is_guarded("lora.rank") and is_guarded("train.lora_rank")
    assert not is_guarded("logging.report_to") and not is_guarded("data.stream.block_shards")
    with_lora = changed(**{"train.lora": {"rank": 16}})
    assert refused_changes(changed(**{"train.lora": {"rank": 8}}), with_lora) == ["train.lora.rank"]
    assert refused_changes(BASE, with_lora) == ["train.lora"], "turning LoRA on counts"


@pytest.mark.unit
def test_allowed_changes_by_key_section_glob_or_everything():
    new = changed(**{"model.pretrained": "/other", "train.optimizer": "adamw_bf16", "train.adam_beta1": 0.8})
    assert refused_changes(BASE, new, ["model.pretrained"]) == ["train.optimizer", "train.adam_beta1"]
    assert refused_changes(BASE, new, ["model", "train.adam_*"]) == ["train.optimizer"]
    assert refused_changes(BASE, new, ["*"]) == []
    assert not matches("train.optimizer", "train.opt"), "a pattern names whole keys, not prefixes of words"


@pytest.mark.unit
def test_changed_keys_names_both_sides():
    saved = {"a": {"b": 1, "gone": 2}}
    assert changed_keys(saved, {"a": {"b": 1, "new": 3}}) == ["a.new", "a.gone"]
    assert changed_keys(saved, saved) == []


@pytest.mark.unit
def test_an_upgrade_that_adds_a_field_changes_nothing():
    recipe = Recipe.model_validate({"name": "r", "model": {"pretrained": "/m"}, "data": {"cache_url": "/c"},
                                    "output": {"dir": "/o"}})
    current = recipe.model_dump(mode="json")
    older = yaml.safe_load(yaml.safe_dump(current))
    del older["train"]["adam_epsilon"]  # as if written before the field existed
    assert changed_keys(older, current) == ["train.adam_epsilon"]
    assert refused_changes(as_current_schema(older, Recipe), current) == []


@pytest.mark.unit
def test_the_refusal_is_one_line_naming_the_keys_and_the_override():
    message = str(resume_refusal("recipe.yaml", "step-00000008", ["model.pretrained", "train.optimizer"]))
    assert message.startswith("recipe.yaml: train.resume: checkpoint step-00000008 was trained with a different "
                              "model.pretrained, train.optimizer")
    assert "train.resume_allow_changes: [model.pretrained, train.optimizer]" in message and "\n" not in message


def _train(recipe: Path, run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sd35dist", "torchrun", "--standalone", "--nproc-per-node=1",
         "-m", "sd35dist", "train", "--recipe", str(recipe), "--run-dir", str(run_dir)],
        capture_output=True, text=True, cwd=PROJECT, env=venv_env(OMP_NUM_THREADS="1"), timeout=300)


def _with(base: dict, path: Path, **sections) -> Path:
    data = yaml.safe_load(yaml.safe_dump(base))
    for section, values in sections.items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.dist
def test_resume_refuses_a_changed_model_and_optimizer_accepts_an_override_and_step_counts(cache, tmp_path):
    model, _ = cache
    out = tmp_path / "out"
    first = train_recipe(tmp_path / "recipe.yaml", cache, out, max_train_steps=2, checkpointing_steps=2,
                         ema={"enabled": False}, caption_dropout_probability=0.0)
    assert _train(first, tmp_path / "run1").returncode == 0
    base = yaml.safe_load(first.read_text())
    checkpoint = CheckpointDir(out).latest()
    saved = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    assert saved["train"]["max_train_steps"] == 2 and saved["model"]["pretrained"] == str(model)
    assert read_info(checkpoint)["recipe_sha256"] == recipe_hash(Recipe.model_validate(saved))

    other_model = tmp_path / "copy-of-model"
    shutil.copytree(model, other_model)
    changes = {"train": {"max_train_steps": 3, "optimizer": "adamw_bf16", "adam_beta2": 0.99},
               "model": {"pretrained": str(other_model)}}
    # The check every rank makes first thing, called here. A refusal of it ends the ranks as this one line
    # (`error: ` + the message), exit status 2 and no restart: test_train's crafted-metadata test runs a refusal
    # of this same function through torchrun.
    with pytest.raises(ConfigError) as refused:
        resume_checkpoint(load_rank_recipe(_with(base, tmp_path / "recipe.yaml", **changes)), "recipe.yaml")
    assert str(refused.value) == (
        "recipe.yaml: train.resume: checkpoint step-00000002 was trained with a different "
        "model.pretrained, train.optimizer, train.adam_beta2; to accept that, set "
        "train.resume_allow_changes: [model.pretrained, train.optimizer, train.adam_beta2] "
        "(see docs/checkpoints.md), or start fresh with train.resume: none")
    assert CheckpointDir(out).complete_steps() == [2]

    allowed = {"train": {"max_train_steps": 3, "adam_beta2": 0.99,
                         "resume_allow_changes": ["model.pretrained", "train.adam_beta2"]},
               "model": {"pretrained": str(other_model)}}
    accepted = _train(_with(base, tmp_path / "recipe.yaml", **allowed), tmp_path / "run3")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert sorted(losses(tmp_path / "run3")) == [3], "resumed at step 2, trained step 3"

    # The step-3 checkpoint holds the accepted recipe: only the step count changes now, so the next resume
    # needs no allowance.
    accepted_recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    more = _with(accepted_recipe, tmp_path / "recipe.yaml", train={"max_train_steps": 4, "resume_allow_changes": []})
    assert resume_checkpoint(load_rank_recipe(more)) == CheckpointDir(out).path(3)
    with pytest.raises(ConfigError, match=r"set train.resume_allow_changes: \[model.pretrained, train.adam_beta2\]"):
        check_recipe(CheckpointDir(out).path(2), load_rank_recipe(more))  # the step-2 checkpoint would still refuse it
