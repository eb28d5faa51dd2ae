"""The submit side stays light: launcher/ and the dry-run path never import torch & co."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tests.conftest import PROJECT

pytestmark = pytest.mark.unit

HEAVY = ("torch", "diffusers", "deepspeed", "transformers", "accelerate", "peft")
PROBE = """
import json, sys
{body}
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))))
"""


def _heavy_modules_after(body: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(body=body, heavy=HEAVY)],
        capture_output=True, text=True, cwd=PROJECT, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dry_run_imports_no_torch():
    body = (
        "from sd35dist.cli import main\n"
        "assert main(['submit', '--profile', 'h100x8', '--dry-run', '--run-dir', '/tmp/sd35dist-probe']) == 0"
    )
    assert _heavy_modules_after(body) == []


def test_every_launcher_module_imports_without_torch():
    modules = sorted(p.stem for p in (PROJECT / "launcher").glob("*.py"))
    body = "\n".join(f"import launcher.{m}" for m in modules)
    assert _heavy_modules_after(body) == []


def test_launcher_source_names_no_heavy_import():
    for path in (PROJECT / "launcher").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in HEAVY, f"{path.name} imports {name}"
                assert not name.startswith("sd35dist.") or name.startswith("sd35dist.config"), (
                    f"{path.name} imports rank-side {name}"
                )


def test_rank_side_never_imports_the_launcher():
    for path in (PROJECT / "sd35dist").rglob("*.py"):
        if path.name == "cli.py" and path.parent.name == "sd35dist":
            continue  # the command dispatcher hands submit-side commands to the launcher
        assert "launcher" not in {
            (n.module or "").split(".")[0] for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
        } | {a.name.split(".")[0] for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import) for a in n.names}, path
