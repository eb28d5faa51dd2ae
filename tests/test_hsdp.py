"""`parallel.shard_degree` builds the HSDP mesh: shards within groups, replicas across them.

One run of `tests/hsdp_check.py` on 4 gloo ranks started as 2 nodes × 2 (shard_degree
unset: HSDP by default across nodes) checks the layout, which collectives stay inside a
node and which cross, the gradient average over all four ranks, replica agreement and
checkpoints moving between HSDP and plain FSDP; the rest are the rules around it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from sd35dist.config.loading import ConfigError
from sd35dist.config.mesh_layout import refuse_zero3_across_gpu_nodes, resolve_mesh
from sd35dist.config.recipe import Recipe
from tests.cli_runs import PROJECT, venv_env
from tests.rank_runs import WARM_TORCHRUN
from tests.s3_server import free_port

# Gradients under HSDP against the 4-rank mean on plain models, relative to the largest
# gradient of each parameter (fp32; measured 1.9e-7). A mean over one replica group's two
# ranks instead of all four would be off by O(1).
GRAD_RTOL = 1e-5


def _run_as_two_nodes(tiny_model, out_dir):
    """Two torchrun agents of two workers each, meeting in one c10d rendezvous: 2 pretend nodes."""
    port = free_port()
    command = [*WARM_TORCHRUN, "--nnodes=2", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=hsdp-test",
               "-m", "tests.hsdp_check", str(tiny_model), str(out_dir)]
    agents = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT,
                               env=venv_env(OMP_NUM_THREADS="1"), start_new_session=True) for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=600) for agent in agents]
    finally:
        for agent in agents:  # a hung rendezvous must not outlive the test
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)  # the agent's own session: it and its workers
                agent.wait()
    return [agent.returncode for agent in agents], "".join(o for o, _ in outputs), "".join(e for _, e in outputs)


@pytest.fixture(scope="module")
def two_nodes(tiny_model, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("hsdp")
    codes, stdout, stderr = _run_as_two_nodes(tiny_model, out_dir)
    assert codes == [0, 0], stdout[-3000:] + stderr[-5000:]
    return json.loads((out_dir / "result.json").read_text())["ranks"], stdout


@pytest.mark.dist
def test_two_nodes_default_to_hsdp_sharded_inside_the_node(two_nodes):
    ranks, stdout = two_nodes
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
    assert ("fsdp2: HSDP 2 replicas × 2 shards over 2 node(s) (mesh [2, 2]; shard_degree = workers per node, "
            "the default across nodes)") in stdout, "the mesh that runs is logged"


@pytest.mark.dist
def test_under_hsdp_only_the_gradient_all_reduce_crosses_nodes(two_nodes):
    ranks, _ = two_nodes
    for rank_index, rank in enumerate(ranks):
        per_node = rank["local_world_size"]
        assert rank_index // per_node == rank["node_rank"], "torchrun numbers ranks node by node"
        calls = rank["collectives"]
        by_op: dict[str, list] = {}
        for op, group, size in calls:
            by_op.setdefault(op, []).append((group, size))
        assert set(by_op) == {"all_gather", "reduce_scatter", "all_reduce"}, by_op.keys()
        for op in ("all_gather", "reduce_scatter"):
            for group, _ in by_op[op]:
                assert len(group) == 2 and {r // per_node for r in group} == {rank_index // per_node}, \
                    f"{op} {group} stays in the node"
        shard_bytes = sum(4 * entry["local"] for entry in rank["layout"].values())  # fp32 gradient shards
        for group, _ in by_op["all_reduce"]:
            assert len(group) == 2 and len({r // per_node for r in group}) == 2, f"all_reduce {group} is across nodes"
        across = sum(size for _, size in by_op["all_reduce"])
        assert shard_bytes <= across <= shard_bytes * 1.05, "across nodes: one all-reduce of the gradient shard"
        gathered = sum(size for _, size in by_op["all_gather"])
        assert gathered >= shard_bytes, "every shard is all-gathered inside the node at least once"


@pytest.mark.dist
def test_measured_shard_bytes_equal_the_memory_plan(two_nodes, tiny_model):
    """Weights, Adam moments and EMA each rank holds are what `sd35dist plan` predicts (fp32 adamw, HSDP 2 × 2)."""
    from sd35dist.config.model_size import transformer_size
    from sd35dist.config.resource_plan import memory_plan, workload_from_recipe
    from tests.hsdp_check import recipe_for

    ranks, _ = two_nodes
    config = json.loads((tiny_model / "transformer" / "config.json").read_text())
    recipe = recipe_for(tiny_model, tiny_model, None)
    mesh = resolve_mesh(strategy="fsdp2", shard_degree=None, nodes=2, procs_per_node=2)
    rows = dict(memory_plan(transformer_size(config), workload_from_recipe(recipe, config, on_gpus=False), mesh).rows)
    predicted = {"weights": rows["weights (sharded master)"], "optimizer": rows["optimizer state (sharded)"],
                 "ema": rows["EMA, fp32 (sharded like the optimizer)"]}
    for kind, plan_bytes in predicted.items():
        measured = [rank["bytes"][kind] for rank in ranks]
        # Uneven splits give one rank at most one row more per tensor; a shard group's two ranks sum to the whole.
        assert measured[0] + measured[1] == measured[2] + measured[3] == 2 * plan_bytes, (kind, measured, plan_bytes)
        assert all(abs(m - plan_bytes) <= 4 * 64 * ranks[0]["bytes"]["tensors"] for m in measured), kind


@pytest.mark.unit
def test_the_default_across_gpu_nodes_is_hsdp_with_the_node_as_shard_group():
    hsdp = resolve_mesh(strategy="fsdp2", shard_degree=None, nodes=4, procs_per_node=8)
    assert (hsdp.mesh_shape, hsdp.recipe_shard_degree, hsdp.source) == ((4, 8), 8, "default across nodes")
    one_node = resolve_mesh(strategy="fsdp2", shard_degree=None, nodes=1, procs_per_node=8)
    assert (one_node.mesh_shape, one_node.recipe_shard_degree) == ((8,), None)
    one_worker_each = resolve_mesh(strategy="fsdp2", shard_degree=None, nodes=2, procs_per_node=1)
    assert one_worker_each.mesh_shape == (2,), "one worker per node: HSDP would only replicate"
    chosen = resolve_mesh(strategy="fsdp2", shard_degree=32, nodes=4, procs_per_node=8)
    assert (chosen.mesh_shape, chosen.source) == ((32,), "recipe"), "the recipe's shard_degree wins"
    assert resolve_mesh(strategy="fsdp2", shard_degree=16, nodes=4, procs_per_node=8).mesh_shape == (2, 16)
    assert resolve_mesh(strategy="zero2", shard_degree=None, nodes=4, procs_per_node=8).mesh_shape == (32,)
    with pytest.raises(ConfigError) as error:
        resolve_mesh(strategy="fsdp2", shard_degree=3, nodes=1, procs_per_node=8, recipe_file="recipe.yaml")
    assert str(error.value) == "recipe.yaml: parallel.shard_degree: 3 must divide the world size 8"


@pytest.mark.unit
def test_zero3_across_gpu_nodes_is_refused_with_what_to_use(tmp_path, capsys):
    from launcher.cli import main

    code = main(["submit", "--profile", "h100x8x4", "--recipe", str(PROJECT / "recipes/sd35l-full-zero3.yaml"),
                 "--dry-run", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: sd35l-full-zero3.yaml: parallel.strategy: zero3 across 4 nodes")
    assert "use fsdp2 (HSDP" in err[0] and not (tmp_path / "run").exists()
    refuse_zero3_across_gpu_nodes("zero3", 1, 8)  # one node: fine
    refuse_zero3_across_gpu_nodes("zero3", 2, 0)  # CPU test cluster: fine


@pytest.mark.unit
def test_shard_degree_needs_fsdp2():
    recipe = {"name": "t", "model": {"pretrained": "m"}, "data": {"cache_url": "c"}, "output": {"dir": "o"},
              "parallel": {"strategy": "zero3", "shard_degree": 2}}
    with pytest.raises(ValueError, match="shard_degree \\(HSDP\\) needs strategy fsdp2"):
        Recipe.model_validate(recipe)


@pytest.mark.unit
def test_every_strategy_a_recipe_names_has_one_class_with_the_whole_protocol():
    import typing

    from sd35dist.checkpoint.weights import FORMATS
    from sd35dist.config.recipe import ParallelSection
    from sd35dist.parallel.strategy import STRATEGIES

    names = set(typing.get_args(ParallelSection.model_fields["strategy"].annotation))
    assert set(STRATEGIES) == names
    assert set(FORMATS) == names, "every strategy's checkpoints need a reader in checkpoint/weights.py"
    for cls in STRATEGIES.values():
        for method in ("forward", "backward", "step", "update_ema", "save", "save_async", "load", "full_state_dict"):
            assert callable(getattr(cls, method)), f"{cls.__name__}.{method}"
        assert isinstance(cls.supports_async, bool)
    for module in FORMATS.values():
        for function in ("read_lazy", "read_full"):
            assert callable(getattr(module, function)), f"{module.__name__}.{function}"
