"""The importer's option table covers SimpleTuner as it is at the commit it names: every option
of its parser (tests/fixtures/simpletuner/options.json, derived from its source by
derive_options.py) has an entry, the defaults the importer writes are SimpleTuner's, its
env-file names and old names are read as it reads them, every dataset key it reads has an
entry, and docs/simpletuner.md shows the table the importer holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd35dist.importers.simpletuner_doc import BEGIN, END, option_table
from sd35dist.importers.simpletuner_options import (
    DROPPED_BY_SIMPLETUNER,
    ENV_NAMES,
    MAPPED,
    RENAMED,
    SAME_HERE,
    SIMPLETUNER_COMMIT,
)
from sd35dist.importers.simpletuner_unapplied import DATASET_MAPPED, DATASET_NOT_APPLIED, NOT_APPLIED
from tests.cli_runs import PROJECT

pytestmark = pytest.mark.unit

DERIVED = json.loads((Path(__file__).parent / "fixtures" / "simpletuner" / "options.json").read_text())


def test_the_table_is_of_the_commit_the_option_list_was_derived_from():
    assert DERIVED["commit"] == SIMPLETUNER_COMMIT and DERIVED["source"] == "bghira/SimpleTuner"
    assert len(DERIVED["options"]) > 500, "the whole parser, not a hand-picked list"


def test_every_option_of_simpletuners_parser_has_an_entry():
    missing = sorted(name for name in DERIVED["options"] if name not in MAPPED and name not in NOT_APPLIED)
    assert missing == [], f"options of SimpleTuner {SIMPLETUNER_COMMIT[:12]} without an entry: {missing}"
    assert set(SAME_HERE) <= set(NOT_APPLIED), "a value other than the listed ones needs a reason"
    assert not set(MAPPED) & set(NOT_APPLIED), "an option is applied or not, not both"
    assert all(reason.strip() for reason in NOT_APPLIED.values())


def test_the_defaults_the_importer_writes_are_simpletuners():
    wrong = {name: (mapped.default, DERIVED["options"][name]["default"]) for name, mapped in MAPPED.items()
             if name in DERIVED["options"] and mapped.default != DERIVED["options"][name]["default"]}
    assert wrong == {}
    assert {"lora_dropout": 0.1, "ema_decay": 0.995, "adam_weight_decay": 0.01, "max_grad_norm": 2.0,
            "grad_clip_method": "value", "optimizer": "adamw_bf16", "lr_power": 0.8, "lr_end": 4e-7,
            "flow_schedule_shift": 3.0} == {k: MAPPED[k].default for k in ("lora_dropout", "ema_decay", "adam_weight_decay",
                                                                          "max_grad_norm", "grad_clip_method", "optimizer",
                                                                          "lr_power", "lr_end", "flow_schedule_shift")}


def test_old_names_are_read_as_simpletuners_loaders_read_them():
    derived_env = {name: option.split("=")[0] for name, option in DERIVED["env"].items()}
    assert ENV_NAMES == derived_env
    for old, new in DERIVED["renamed"].items():
        assert RENAMED.get(old) == new if new else old in DROPPED_BY_SIMPLETUNER, old
    aliases = {alias: name for name, option in DERIVED["options"].items() for alias in option["aliases"]}
    assert all(RENAMED[alias] == name for alias, name in aliases.items()), "parser aliases"
    assert RENAMED["checkpointing_steps"] == ENV_NAMES["CHECKPOINTING_STEPS"] == "checkpoint_step_interval"


def test_every_dataset_key_simpletuner_reads_has_an_entry():
    missing = sorted(key for key in DERIVED["dataset_keys"] if key not in DATASET_MAPPED and key not in DATASET_NOT_APPLIED)
    assert missing == []
    assert DERIVED["dataset_keys"]["crop"] is False and DERIVED["dataset_keys"]["crop_style"] == "random"
    assert DERIVED["dataset_keys"]["repeats"] == 0


def test_docs_show_the_importers_table():
    text = (PROJECT / "docs" / "simpletuner.md").read_text()
    assert BEGIN in text and END in text
    shown = BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
    assert shown == option_table(), "regenerate: python -m sd35dist.importers.simpletuner_doc docs/simpletuner.md"
    for name in ("lora_dropout", "validation_guidance_skip_layers", "crepa_enabled", "checkpointing_steps"):
        assert f"`{name}`" in shown
