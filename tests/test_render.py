"""Rendering is pure and pinned: golden files for every profile in cluster_configs/."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pydantic
import pytest

from launcher.plan import build_plan
from launcher.profile import PROFILE_DIR, LaunchSection, available_profiles, load_profile
from launcher.render import render_script, shell_word
from sd35dist.cli import main as sd35dist_main
from sd35dist.config import load_recipe, resolve_paths
from tests.cli_runs import PROJECT, wait_for

GOLDEN = Path(__file__).parent / "golden"
RUN_DIR = "/shared/runs/golden-run"
UPDATE = os.environ.get("SD35DIST_UPDATE_GOLDEN") == "1"


def _plan(profile_name: str, job: str, run_dir: str = RUN_DIR):
    profile = load_profile(PROFILE_DIR / f"{profile_name}.yaml")
    recipe = resolve_paths(load_recipe(PROJECT / (profile.default_recipe or "recipes/tiny.yaml")), PROJECT)
    return build_plan(profile=profile, recipe=recipe, profile_name=profile_name, job=job, run_dir=run_dir)


CASES = [(name, "train") for name in available_profiles()] + [("slurm-dev", "preflight"), ("h100x8", "preflight")]


@pytest.mark.unit
def test_every_profile_has_a_golden_case():
    assert {"local", "slurm-dev", "h100x8", "h100x8x4"} <= set(available_profiles())
    assert {name for name, _ in CASES} == set(available_profiles())


@pytest.mark.unit
@pytest.mark.parametrize(("profile_name", "job"), CASES)
def test_rendered_script_matches_golden(profile_name, job):
    text = render_script(_plan(profile_name, job))
    golden = GOLDEN / f"{profile_name}.{job}.sh"
    if UPDATE:
        golden.write_text(text)
    assert golden.is_file(), f"missing {golden}: run with SD35DIST_UPDATE_GOLDEN=1 and review the diff"
    assert text == golden.read_text()


@pytest.mark.unit
def test_rendering_is_deterministic():
    assert render_script(_plan("h100x8x4", "train")) == render_script(_plan("h100x8x4", "train"))


@pytest.mark.process
def test_slurm_script_has_what_a_cluster_needs():
    text = render_script(_plan("h100x8x4", "train"))
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        f"#SBATCH --output={RUN_DIR}/logs/%j.out",
        "set -euo pipefail",
        'scontrol show hostnames "$SLURM_JOB_NODELIST"',
        "srun --kill-on-bad-exit=1",
        "--rdzv-backend=c10d",
        '--rdzv-endpoint="$SD35DIST_RDZV_HOST:$SD35DIST_RDZV_PORT"',
        "--max-restarts=3",
        "-m sd35dist train",
        f"--recipe {RUN_DIR}/recipe.yaml",
        "export NCCL_SOCKET_IFNAME=ib0",
    ):
        assert line in text, line
    # bash accepts it
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


@pytest.mark.unit
def test_the_time_limit_warning_reaches_the_batch_shell_only_and_becomes_the_preempt_file():
    text = render_script(_plan("h100x8x4", "train"))
    assert f"--run-dir {RUN_DIR} &\n" in text, "srun runs in the background while the shell waits for signals"
    trap = text.index("trap 'TIME_LIMIT_WARNED=1")
    assert trap < text.index("echo 'sd35dist: "), "the trap comes before the setup: Slurm may warn at the start"
    assert trap < text.index("source ") < text.index("scontrol show"), "... and before the profile's setup lines"
    assert f'rm -f "$PREEMPT_REQUEST" {RUN_DIR}/MISTAKE' in text.split("TIME_LIMIT_WARNED=0", 1)[0], \
        "a requeued job starts without the old request, before the trap can write a new one"
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text.split("STEP_STATUS=0", 1)[1], "requeue only after the step ended"
    assert "export SD35DIST_SIGNAL_GRACE_S=300" in text


@pytest.mark.process
def test_a_time_limit_warning_during_the_setup_is_kept_and_requeues_the_job(tmp_path):
    """Slurm may send the warning up to a minute early (sbatch(1)): with a short time limit, while the
    shell still runs its setup. The shell must take it (bash dies of an untrapped USR1), ask the ranks
    to save and requeue once the step has ended. The Slurm commands are stand-ins: `scontrol show node`
    holds the setup until the test has sent the signal; srun's step ends at once."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = tmp_path / "job.sbatch"
    script.write_text(render_script(_plan("slurm-dev", "train", run_dir=str(run_dir))))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    in_setup = tmp_path / "in-setup"
    stand_ins = {
        "scontrol": f"""case "$1 $2" in
  "show hostnames") echo n1 ;;
  "show node") touch {in_setup}; for _ in $(seq 100); do [ -e {in_setup}.go ] && break; sleep 0.1; done
               echo "NodeName=n1 NodeAddr=127.0.0.1" ;;
  *) echo "$@" >> {tmp_path}/scontrol-calls ;;
esac""",
        "srun": "exit 0",
        "sd35dist": "exit 0",
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2"}
    shell = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(in_setup.exists, 30, "the shell to reach its rendezvous query")
        shell.send_signal(signal.SIGUSR1)  # pending in bash at once; it runs the trap when scontrol returns
        (tmp_path / "in-setup.go").touch()
        out, err = shell.communicate(timeout=30)
    finally:
        shell.kill()
    assert shell.returncode == 0, (shell.returncode, err)
    assert "time-limit warning: asking the ranks to save" in err
    assert (run_dir / "PREEMPT").exists(), "the ranks are asked to save"
    assert (tmp_path / "scontrol-calls").read_text().split() == ["requeue", "7"]
    assert "sd35dist: job 7 restart 0" in out, "the setup went on after the warning"


@pytest.mark.process
def test_each_job_gets_its_own_rendezvous_port():
    text = render_script(_plan("h100x8x4", "train"))
    line = next(line for line in text.splitlines() if line.startswith("export SD35DIST_RDZV_PORT="))
    ports = {
        job_id: subprocess.run(["bash", "-c", f"SLURM_JOB_ID={job_id}; {line}; echo $SD35DIST_RDZV_PORT"],
                               capture_output=True, text=True, check=True).stdout.strip()
        for job_id in ("41", "42", "1041")
    }
    assert ports == {"41": "29541", "42": "29542", "1041": "29541"}, "rdzv_port + job id % rdzv_port_span"


@pytest.mark.unit
def test_a_port_range_past_65535_is_refused():
    with pytest.raises(pydantic.ValidationError, match="runs past port 65535"):
        LaunchSection(rdzv_port=65000, rdzv_port_span=1000)


@pytest.mark.unit
def test_local_script_runs_torchrun_standalone():
    text = render_script(_plan("local", "preflight"))
    assert "#SBATCH" not in text
    assert "exec sd35dist torchrun \\\n    --standalone" in text
    assert "--nproc-per-node=2" in text


@pytest.mark.unit
def test_override_changes_only_what_it_names(capsys, monkeypatch):
    monkeypatch.chdir(PROJECT)  # the profile's default recipe is a path relative to the project
    dry_run = ["submit", "--profile", "h100x8x4", "--dry-run", "--run-dir", RUN_DIR]
    assert sd35dist_main(dry_run) == 0
    base = capsys.readouterr().out
    assert sd35dist_main([*dry_run, "--set", "slurm.nodes=2", "--set", "slurm.partition=h100-long"]) == 0
    changed = capsys.readouterr().out
    assert base == render_script(_plan("h100x8x4", "train"))  # the CLI prints exactly the pure rendering
    diff = [(a, b) for a, b in zip(base.splitlines(), changed.splitlines()) if a != b]
    mesh = "echo 'sd35dist: fsdp2: HSDP {} replicas × 8 shards over {} node(s) (mesh [{}, 8]; " \
           "shard_degree = workers per node, the default across nodes)'"
    assert diff == [("#SBATCH --nodes=4", "#SBATCH --nodes=2"), ("#SBATCH --partition=gpu", "#SBATCH --partition=h100-long"),
                    (mesh.format(4, 4, 4), mesh.format(2, 2, 2))], "the mesh the ranks build follows the node count"


@pytest.mark.process
def test_shell_words_expand_only_variables():
    assert shell_word("--nnodes=$SLURM_NNODES") == '--nnodes="$SLURM_NNODES"'
    assert shell_word("/path with space/x") == "'/path with space/x'"
    assert shell_word("plain") == "plain"
    out = subprocess.run(
        ["bash", "-c", f"X='a b'; printf '%s\\n' {shell_word('--v=$X')} {shell_word('$notavar; rm -rf /')}"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert out.splitlines() == ["--v=a b", "; rm -rf /"]


@pytest.mark.unit
def test_warm_ranks_choose_torchrun_s_start_method(capsys, monkeypatch):
    monkeypatch.chdir(PROJECT)
    dry_run = ["submit", "--profile", "h100x8", "--dry-run", "--run-dir", RUN_DIR]
    assert sd35dist_main(dry_run) == 0
    assert "--start-method=forkserver" in capsys.readouterr().out, "warm ranks are the default"
    assert sd35dist_main([*dry_run, "--set", "launch.warm_ranks=false"]) == 0
    text = capsys.readouterr().out
    assert "--start-method=spawn" in text and "forkserver" not in text
