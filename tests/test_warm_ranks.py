"""Warm ranks (sd35dist/jobs/warm_ranks.py): under `sd35dist torchrun --start-method=forkserver -m
MODULE`, what each rank finds when its module starts, how it ends, and what is left afterwards.

The probe (tests/warm_rank_probe.py) records what was already imported at its first line: with the
fork server torch, diffusers and the train job are; with --start-method=spawn nothing is, which is
how these tests know the option reached the agent."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from sd35dist.jobs.warm_ranks import (
    FORK_SERVER_BEGIN,
    FORK_SERVER_SETUP,
    JOB_PRELOAD,
    PRELOAD,
    RankModule,
    fork_server_title,
    rank_module,
    rank_title,
)
from tests.cli_runs import PROJECT, tiny_recipe, venv_env, wait_for


def launch(tmp_path: Path, method: str, *how: str, restarts: int = 0) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "sd35dist", "torchrun", "--standalone", "--nproc-per-node=2",
         f"--max-restarts={restarts}", f"--start-method={method}", "-m", "tests.warm_rank_probe", str(tmp_path), *how],
        capture_output=True, text=True, cwd=PROJECT, timeout=180,
        env=venv_env(WARM_PROBE_VARIABLE="from the launching shell", SD35DIST_RUN_DIR=str(tmp_path)))
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    return proc, ranks


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.dist
def test_warm_ranks_start_with_the_libraries_imported_and_look_like_started_ones(tmp_path):
    proc, ranks = launch(tmp_path, "forkserver", "a b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(ranks) == [0, 1]
    for rank in ranks.values():
        assert rank["already_imported"] == {"torch": True, "diffusers": True, "sd35dist.jobs.train": True,
                                            "deepspeed": False}
        assert rank["argv"] == [str(tmp_path), "a b"] and rank["name"] == "__main__"
        assert rank["launch_variable"] == "from the launching shell" and rank["world_size"] == "2"
        assert rank["omp_threads"] == "1", "torchrun's OMP_NUM_THREADS for several ranks reaches forked ranks"
        assert rank["cmdline"] == rank_title("tests.warm_rank_probe", [str(tmp_path), "a b"]), "ps shows the rank's command"
        assert rank["sigterm_default"], "a rank is killed by SIGTERM until it installs its own handler"
        assert rank["parent_cmdline"] == fork_server_title(str(tmp_path)), "ps names the fork server and its run"
        collector = rank["gc"]
        assert collector["enabled"] and collector["frozen"] > 100_000, "the imports frozen, the collector on again"
        assert collector["full_collections"] == 0, "the fork server imported with the collector off"
    assert ranks[0]["parent"] == ranks[1]["parent"], "both forked from one fork server"
    wait_for(lambda: not alive(ranks[0]["parent"]), 10, "the fork server to end with its agent")


@pytest.mark.dist
def test_the_fork_server_outlives_a_sigterm_so_saving_ranks_are_not_interrupted(tmp_path):
    proc, ranks = launch(tmp_path, "forkserver", "sigterm-parent")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(rank["parent_alive_after_sigterm"] for rank in ranks.values())
    wait_for(lambda: not alive(ranks[0]["parent"]), 10, "the fork server to end with its agent")


@pytest.mark.dist
def test_spawn_keeps_one_fresh_interpreter_per_rank(tmp_path):
    proc, ranks = launch(tmp_path, "spawn")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in ranks.values():
        assert not any(rank["already_imported"].values()), rank
        assert rank["cmdline"].split()[1:4] == ["-u", "-m", "tests.warm_rank_probe"]
        assert rank["gc"]["enabled"] and rank["gc"]["frozen"] == 0, rank["gc"]


@pytest.mark.dist
def test_a_warm_rank_s_mistake_is_its_one_line_and_exit_2_without_restart(tmp_path):
    proc, ranks = launch(tmp_path, "forkserver", "fail", restarts=3)
    everything = proc.stdout + proc.stderr
    assert proc.returncode == 2, everything[-3000:]
    assert [line for line in everything.splitlines() if line.startswith("error:")] == ["error: the probe's mistake"]
    assert "Traceback" not in everything and "will restart worker group" not in everything, everything[-3000:]
    assert "sd35dist: stopped: rank 1 on" in everything and "exited with status 2 (a mistake: not restarted)" in everything


@pytest.mark.dist
def test_a_warm_rank_s_uncaught_exception_prints_its_traceback_and_exits_1(tmp_path):
    proc, ranks = launch(tmp_path, "forkserver", "raise")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "RuntimeError: a bug in the probe" in proc.stderr
    assert "sd35dist: stopped: rank 1 on" in proc.stderr and "exited with status 1" in proc.stderr


@pytest.mark.dist
def test_a_killed_warm_rank_s_last_output_is_not_lost(tmp_path):
    proc, ranks = launch(tmp_path, "forkserver", "die")
    assert proc.returncode == 128 + 9, proc.stderr[-3000:]
    assert "last words before SIGKILL" in proc.stdout
    for rank in ranks.values():
        assert not alive(rank["pid"])


@pytest.mark.unit
def test_only_a_module_under_the_forkserver_method_runs_warm():
    def args(**given):
        base = {"start_method": "forkserver", "module": True, "no_python": False, "run_path": False,
                "training_script": "sd35dist", "training_script_args": ["train", "--recipe", "r.yaml"]}
        return Namespace(**{**base, **given})

    assert rank_module(args()) == RankModule("sd35dist", ("train", "--recipe", "r.yaml"))
    assert rank_module(args(start_method="spawn")) is None
    assert rank_module(args(start_method="fork")) is None
    assert rank_module(args(module=False, training_script="train.py")) is None
    assert rank_module(args(no_python=True)) is None
    assert rank_module(args(run_path=True)) is None
    assert "deepspeed" not in " ".join(PRELOAD), "DeepSpeed picks its accelerator when imported"
    assert "sd35dist" not in RankModule("sd35dist", ()).preload(), "the module's own top level runs in the rank"


@pytest.mark.unit
def test_a_preflight_fork_server_imports_preflight_and_not_the_model_libraries():
    preflight = RankModule("sd35dist", ("preflight", "--recipe", "r.yaml")).preload()
    assert preflight == [FORK_SERVER_BEGIN, *JOB_PRELOAD["preflight"], FORK_SERVER_SETUP]
    assert "sd35dist.jobs.preflight" in preflight and not [name for name in preflight if name.startswith("diffusers")]
    for other in (("train", "--recipe", "r.yaml"), ("cache", "--recipe", "r.yaml"), ()):
        assert RankModule("sd35dist", other).preload() == [FORK_SERVER_BEGIN, *PRELOAD, FORK_SERVER_SETUP], other
    assert RankModule("tests.warm_rank_probe", ("preflight",)).preload()[1:-1] == list(PRELOAD), "only sd35dist's jobs"


PREFLIGHT_IMPORTS = """
import importlib, sys
for name in sys.argv[1:-2]:
    importlib.import_module(name)
from sd35dist.cli import main
code = main(["preflight", "--recipe", sys.argv[-2], "--run-dir", sys.argv[-1]])
print(code, sorted({m.split(".")[0] for m in sys.modules} & {"diffusers", "peft", "transformers", "torchao"}))
"""


@pytest.mark.process
def test_a_preflight_of_a_real_model_imports_no_model_library(tiny_model, tmp_path):
    """Preflight's fork server imports its own list (JOB_PRELOAD, without the fork server's own modules) and a rank
    then runs the whole preflight of a recipe whose model exists (it counts the model's parameters for the save
    estimate): neither imports diffusers or what it pulls in, or each rank would import them after the fork."""
    recipe = tiny_recipe(tmp_path)
    text = recipe.read_text().replace(str(tmp_path / "model"), str(tiny_model))
    recipe.write_text(text)
    names = JOB_PRELOAD["preflight"]
    proc = subprocess.run([sys.executable, "-c", PREFLIGHT_IMPORTS, *names, str(recipe), str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=PROJECT, env=venv_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout[-2000:]
    report = json.loads((tmp_path / "run" / "preflight.json").read_text())
    assert report["checkpoint_save"]["estimated"], report["checkpoint_save"]


@pytest.mark.unit
def test_torch_still_builds_the_entrypoint_where_warm_ranks_replace_it():
    import torch.distributed.run as torch_run

    assert callable(torch_run.config_from_args), "warm_ranks.ranks_forked_warm swaps this name during run()"
    assert os.path.basename(rank_title("m", ["x"])).startswith(os.path.basename(sys.executable) + " -u -m m x")


@pytest.mark.unit
def test_only_the_fork_server_imports_its_setup():
    """Importing warm_fork_server ignores SIGTERM in the importing process, and warm_fork_server_begin switches its
    garbage collector off: only the fork server may (RankModule.preload, first and last)."""
    statement = re.compile(r"^\s*(from sd35dist\.jobs\.warm_fork_server(_begin)? import"
                           r"|import sd35dist\.jobs\.warm_fork_server|from sd35dist\.jobs import .*warm_fork_server)",
                           re.MULTILINE)
    importers = [str(path.relative_to(PROJECT)) for folder in ("sd35dist", "tests", "benchmarks", "launcher")
                 for path in (PROJECT / folder).rglob("*.py") if statement.search(path.read_text())]
    assert importers == []
    for rank in (RankModule("sd35dist", ("train",)), RankModule("sd35dist", ("preflight",)), RankModule("tests.m", ())):
        preload = rank.preload()
        assert preload[-1] == FORK_SERVER_SETUP == "sd35dist.jobs.warm_fork_server", "last, once the libraries are in"
        assert preload[0] == FORK_SERVER_BEGIN == "sd35dist.jobs.warm_fork_server_begin", "first, before any library"
        assert preload.count(FORK_SERVER_BEGIN) == preload.count(FORK_SERVER_SETUP) == 1
