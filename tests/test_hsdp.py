"""`parallel.shard_degree` builds the HSDP mesh: shards within groups, replicas across them.

One 4-rank torchrun of `tests/hsdp_check.py` (shard_degree 2) checks the layout, the
gradient average over all four ranks, replica agreement and checkpoints moving between
HSDP and plain FSDP; the rest are the rules around it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sd35dist.config.loading import ConfigError
from sd35dist.config.recipe import Recipe
from sd35dist.parallel.fsdp2 import hsdp_replicas
from tests.conftest import PROJECT, venv_env
from tests.test_cache_build import tiny_model  # noqa: F401

# Gradients under HSDP against the 4-rank mean on plain models, relative to the largest
# gradient of each parameter (fp32; measured 1.9e-7). A mean over one replica group's two
# ranks instead of all four would be off by O(1).
GRAD_RTOL = 1e-5


@pytest.mark.dist
def test_shard_degree_two_on_four_ranks_is_hsdp(tiny_model, tmp_path):  # noqa: F811
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
         "-m", "tests.hsdp_check", str(tiny_model), str(tmp_path)],
        capture_output=True, text=True, cwd=PROJECT, env=venv_env(OMP_NUM_THREADS="1"), timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = json.loads((tmp_path / "result.json").read_text())["ranks"]
    layout = ranks[0]["layout"]
    assert layout, "the model has parameters"
    for name, entry in layout.items():
        assert entry["mesh"] == [2, 2] and entry["placements"] == ["R", "S(0)"], name
        assert entry["local"] * 2 == entry["full"], f"{name}: sharded in two, not four"
    for rank in ranks:
        assert rank["grad_error"] < GRAD_RTOL, "gradients are the mean over all four ranks"
        assert rank["meshes"] == [[2, 2], [4], [2, 2]]
        assert rank["resumed_equal"] == {"hsdp_to_fsdp": True, "fsdp_to_hsdp": True}
    assert len({rank["weights_sha256"] for rank in ranks}) == 1, "both replicas hold the same weights"
    assert "fsdp2: HSDP: 2 replicas × 2 shards" in proc.stdout, "the mesh that runs is logged"


@pytest.mark.unit
def test_shard_degree_sets_the_replica_count():
    assert hsdp_replicas(None, 8) == 1
    assert hsdp_replicas(8, 8) == 1
    assert hsdp_replicas(8, 32) == 4
    with pytest.raises(ConfigError) as error:
        hsdp_replicas(3, 8, "recipe.yaml")
    assert str(error.value) == "recipe.yaml: parallel.shard_degree: 3 must divide the world size 8"


@pytest.mark.unit
def test_shard_degree_needs_fsdp2():
    recipe = {"name": "t", "model": {"pretrained": "m"}, "data": {"cache_url": "c"}, "output": {"dir": "o"},
              "parallel": {"strategy": "zero3", "shard_degree": 2}}
    with pytest.raises(ValueError, match="shard_degree \\(HSDP\\) needs strategy fsdp2"):
        Recipe.model_validate(recipe)


@pytest.mark.unit
def test_every_strategy_a_recipe_names_has_one_class_with_the_whole_protocol():
    import typing

    from sd35dist.config.recipe import ParallelSection
    from sd35dist.parallel.strategy import STRATEGIES

    assert set(STRATEGIES) == set(typing.get_args(ParallelSection.model_fields["strategy"].annotation))
    for cls in STRATEGIES.values():
        for method in ("forward", "backward", "step", "update_ema", "save", "save_async", "load", "full_state_dict",
                       "read_full"):
            assert callable(getattr(cls, method)), f"{cls.__name__}.{method}"
        assert isinstance(cls.supports_async, bool)
