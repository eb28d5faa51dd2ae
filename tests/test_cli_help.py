"""`sd35dist --help` lists every command once, and the CLI and the launcher agree on the jobs."""

from __future__ import annotations

import ast
import re
import subprocess

import pytest

from sd35dist.cli import main
from sd35dist.config.commands import COMMANDS, RANK_JOB, RANK_JOBS, SUBMIT, SUBMITTABLE_JOBS, TOOL, find_command
from tests.cli_runs import PROJECT

pytestmark = pytest.mark.unit


def _sd35dist(capsys, *argv: str) -> subprocess.CompletedProcess:
    """`sd35dist ARGV` in this process (`python -m sd35dist` calls the same main), as a finished process."""
    try:
        status = main(list(argv))
    except SystemExit as exit_:  # argparse's way out after help or a usage error
        status = exit_.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["sd35dist", *argv], status, out.out, out.err)


def test_help_lists_every_command_with_its_line(capsys):
    proc = _sd35dist(capsys, "--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for command in COMMANDS:
        matching = [line for line in lines if re.fullmatch(rf"\s+{re.escape(command.name)}\s+{re.escape(command.summary)}", line)]
        assert len(matching) == 1, f"`{command.name}` with its summary, once, in:\n{proc.stdout}"
    for name in ("submit", "status", "logs", "cancel", "train", "preflight", "cache", "steps", "export", "torchrun",
                 "cache inspect"):
        assert find_command(name.split()) is not None, name


def test_every_summary_is_one_line():
    for command in COMMANDS:
        assert command.summary and "\n" not in command.summary, command.name


def test_launcher_submits_exactly_the_rank_jobs_and_the_sweep(capsys):
    assert RANK_JOBS == tuple(c.name for c in COMMANDS if c.kind is RANK_JOB) == ("train", "preflight", "cache")
    assert SUBMITTABLE_JOBS == (*RANK_JOBS, "sweep")
    proc = _sd35dist(capsys, "submit", "--help")
    assert proc.returncode == 0, proc.stderr
    choices = re.search(r"--job \{([^}]*)\}", proc.stdout)
    assert choices is not None, proc.stdout
    assert tuple(choices.group(1).split(",")) == SUBMITTABLE_JOBS


def test_every_submittable_job_takes_a_recipe_and_a_run_dir(capsys):
    for job in SUBMITTABLE_JOBS:
        proc = _sd35dist(capsys, job, "--help")
        assert proc.returncode == 0, proc.stderr
        assert f"usage: sd35dist {job}" in proc.stdout and "--recipe" in proc.stdout and "--run-dir" in proc.stdout


def test_unknown_command_names_the_choices(capsys):
    proc = _sd35dist(capsys, "trian")
    assert proc.returncode == 2
    assert "invalid choice: 'trian'" in proc.stderr and "'train'" in proc.stderr and "'steps'" in proc.stderr


def test_longest_command_wins():
    assert find_command(["cache", "inspect", "s3://bucket/cache"]).entry == "inspect_main"
    assert find_command(["cache", "--recipe", "r.yaml"]).kind is RANK_JOB
    assert find_command(["status", "123"]).kind is SUBMIT
    assert find_command(["export", "ckpt", "--out", "x"]).kind is TOOL
    assert find_command(["--help"]) is None


def test_every_command_module_defines_its_entry():
    for command in COMMANDS:
        path = PROJECT / (command.module.replace(".", "/") + ".py")
        functions = {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}
        assert command.entry in functions, f"{command.name}: {command.module} has no {command.entry}()"
