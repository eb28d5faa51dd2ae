"""Installs for three audiences: a cluster (runtime only), the demo (no root), the test suite."""

from __future__ import annotations

import re
import subprocess
import tomllib

import pytest

from tests.cli_runs import PROJECT


def planned(target: str) -> str:
    """Every command `make TARGET` would run from a clean clone (-B: as if nothing were installed)."""
    return subprocess.run(["make", "-n", "-B", target], capture_output=True, text=True, cwd=PROJECT,
                          check=True).stdout


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (PROJECT / name).read_text().splitlines():
        if line and not line.startswith(("#", "-r")):
            package, _, version = line.partition("==")
            out[package.lower().replace("_", "-")] = version
    return out


@pytest.mark.process
def test_the_demo_installs_no_system_packages():
    demo = planned("demo")
    assert "apt-get" not in demo and "devcluster.sh install" not in demo
    assert "pip install -q --no-compile -r requirements.txt" in demo and "requirements-test.txt" not in demo
    assert "-m sd35dist.demo" in demo


@pytest.mark.process
def test_the_install_compiles_the_venv_s_bytecode_on_every_core_before_anything_runs():
    """pip compiles one file at a time; make compiles after it, with one worker per core. Without it, where
    PYTHONDONTWRITEBYTECODE is set, every process would compile every module it imports from source."""
    for target, runs in (("demo", "-m sd35dist.demo"), ("test", "pytest -q"), ("check", "pytest -q")):
        plan = planned(target)
        compiles = plan.index("-m compileall -qq -j 0 .venv/lib/python3*/site-packages")
        assert plan.rindex("pip install") < compiles < plan.index(runs), target


@pytest.mark.process
def test_the_test_target_installs_the_cluster_packages_and_the_test_pins():
    test = planned("test")
    assert "devcluster.sh install" in test and "requirements-test.txt" in test
    assert test.index("requirements-test.txt") < test.index("pytest -q")


@pytest.mark.process
def test_check_is_lint_and_the_unit_tier_without_system_packages_and_test_lints_too():
    check = planned("check")
    assert "apt-get" not in check and "devcluster.sh install" not in check
    assert "requirements-test.txt" in check
    assert check.index("ruff check .") < check.index("pytest -q -m unit"), "lint first, then the unit tier"
    test = planned("test")
    assert test.index("ruff check .") < test.index("pytest -q -n 2 --durations"), "CI (make test) lints too"
    assert "-m " not in test.split("pytest -q", 1)[1].splitlines()[0], "make test runs every tier"


@pytest.mark.unit
def test_runtime_pins_hold_no_test_server_stack():
    runtime = pins("requirements.txt")
    for test_only in ("pytest", "moto", "flask", "docker", "werkzeug", "responses"):
        assert test_only not in runtime, f"{test_only} would land on every cluster install"
    test = pins("requirements-test.txt")
    assert {"pytest", "moto", "ruff"} <= set(test) and not set(test) & set(runtime), "each pin in one file"
    assert (PROJECT / "requirements-test.txt").read_text().count("-r requirements.txt") == 1


@pytest.mark.unit
def test_every_runtime_dependency_is_pinned_and_test_tools_are_an_extra():
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    runtime = pins("requirements.txt")
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower()
        assert name in runtime, f"{name} is a dependency but requirements.txt does not pin it"
    assert any(r.startswith("pytest") for r in project["optional-dependencies"]["test"])
    assert not any(r.startswith(("pytest", "moto")) for r in project["dependencies"])
