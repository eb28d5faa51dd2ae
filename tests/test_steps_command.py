"""`sd35dist steps`: steps per epoch and in total, for every profile, from the manifest alone."""

from __future__ import annotations

import pytest
import yaml

from sd35dist.cli import main
from sd35dist.data.manifest import ShardEntry, ShardManifest, write_manifest
from sd35dist.data.storage import Store

pytestmark = pytest.mark.unit


def _cache(tmp_path, buckets: dict[str, int]) -> str:
    entry = lambda path, bucket, n: ShardEntry(path, bucket, n, 1, "0" * 64, "bf16")  # noqa: E731
    shards = tuple(entry(f"shards/{b}/0.safetensors", b, n) for b, n in buckets.items())
    manifest = ShardManifest(shards, entry("empty_prompt.safetensors", "", 1), {}, {}, "bf16", 256, tuple(buckets), 0)
    write_manifest(Store(str(tmp_path / "cache")), manifest)
    return str(tmp_path / "cache")


def _recipe(tmp_path, cache: str, **train) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "model": {"pretrained": "m"}, "data": {"cache_url": cache},
                                    "train": train, "output": {"dir": "o"}}))
    return str(path)


def test_steps_per_profile_count_bucket_steps(tmp_path, capsys):
    # 1024x1024: 100 samples, 1152x896: 10. On 8 ranks × batch 6: 2 full steps of 1024²
    # (96 samples) + 1 remainder step, and 1 remainder step of 1152x896 → 4 steps per epoch.
    recipe = _recipe(tmp_path, _cache(tmp_path, {"1024x1024": 100, "1152x896": 10}), train_batch_size=6,
                     num_train_epochs=3)
    assert main(["steps", "--recipe", recipe, "--profile", "h100x8", "--profile", "local"]) == 0
    out = capsys.readouterr().out.split("\n")
    assert out[0].startswith("110 samples per epoch in 2 buckets")
    h100 = out[2].split()
    assert h100 == ["h100x8", "8", "48", "4", "12", "3"]
    local = out[3].split()  # 2 ranks × 6: 1024² 100 → 8 full + 1 remainder; 1152x896 10 → 1 step
    assert local == ["local", "2", "12", "10", "30", "3"]


def test_max_train_steps_wins_and_accumulation_divides(tmp_path, capsys):
    recipe = _recipe(tmp_path, _cache(tmp_path, {"1024x1024": 100}), train_batch_size=5,
                     gradient_accumulation_steps=2, max_train_steps=7)
    assert main(["steps", "--recipe", recipe, "--profile", "local"]) == 0
    row = capsys.readouterr().out.split("\n")[2].split()
    assert row == ["local", "2", "20", "5", "7", "2"]  # 10 micro-steps / 2 = 5 per epoch


def test_without_a_step_budget_is_a_config_error(tmp_path, capsys):
    recipe = _recipe(tmp_path, _cache(tmp_path, {"1024x1024": 4}))
    assert main(["steps", "--recipe", recipe]) == 2
    assert "train: set max_train_steps or num_train_epochs" in capsys.readouterr().err
