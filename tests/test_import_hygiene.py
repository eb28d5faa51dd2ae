"""Imports point one way: the submit side stays light, every module imports on its own, no cycles.

- launcher/ and the dry-run path never import torch & co; the rank side never imports launcher/
  (except the one command that reads profiles on the submit host);
- every module of sd35dist/ and launcher/ imports first, in a process that has loaded no
  other project module;
- parallel/ imports nothing from train/, and the project's import graph — imports inside
  functions included, so a lazy import cannot hide a cycle — has no cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_runs import PROJECT

HEAVY = ("torch", "diffusers", "deepspeed", "transformers", "accelerate", "peft")
PACKAGES = ("sd35dist", "launcher")
SUBMIT_HOST_MODULES = {
    "sd35dist.jobs.steps": "counts steps for each cluster profile; runs on the submit host, never under torchrun",
}
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


def _module_files() -> dict[str, Path]:
    """Dotted name → file, for every module of the project's packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((PROJECT / package).rglob("*.py")):
            parts = path.relative_to(PROJECT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imported_names(path: Path, module: str, *, module_level_only: bool = False) -> set[str]:
    """Every dotted name `path` imports (`from a import b` gives a.b and a), relative imports resolved."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def _import_graph() -> dict[str, set[str]]:
    """Project module → the project modules it imports. Edges to parent packages are left out:
    a package's __init__ importing its own submodules is how packages work, not a cycle."""
    files = _module_files()
    graph = {}
    for module, path in files.items():
        graph[module] = {name for name in _imported_names(path, module) if name in files} - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, …, a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.process
def test_dry_run_imports_no_torch():
    body = (
        "from sd35dist.cli import main\n"
        "assert main(['submit', '--profile', 'h100x8', '--dry-run', '--run-dir', '/tmp/sd35dist-probe']) == 0"
    )
    assert _heavy_modules_after(body) == []


@pytest.mark.process
def test_help_imports_no_torch():
    body = (
        "from sd35dist.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as done:\n    assert done.code == 0\n"
    )
    assert _heavy_modules_after(body) == []


@pytest.mark.process
def test_every_launcher_module_imports_without_torch():
    modules = sorted(p.stem for p in (PROJECT / "launcher").glob("*.py"))
    body = "\n".join(f"import launcher.{m}" for m in modules)
    assert _heavy_modules_after(body) == []


@pytest.mark.unit
def test_launcher_source_names_no_heavy_import():
    for path in (PROJECT / "launcher").glob("*.py"):
        for name in _imported_names(path, f"launcher.{path.stem}"):
            assert name.split(".")[0] not in HEAVY, f"{path.name} imports {name}"
            # checkpoint.layout (torch-free) lets submit refuse a resume that would destroy checkpoints.
            assert not name.startswith("sd35dist.") or name.startswith(
                ("sd35dist.config", "sd35dist.runtime", "sd35dist.checkpoint.layout")), (
                f"{path.name} imports rank-side {name}"
            )


@pytest.mark.unit
def test_rank_side_never_imports_the_launcher():
    for module, path in _module_files().items():
        if module.startswith("sd35dist") and module not in SUBMIT_HOST_MODULES:
            launcher_imports = sorted(n for n in _imported_names(path, module) if n.split(".")[0] == "launcher")
            assert not launcher_imports, f"{path.relative_to(PROJECT)} imports {launcher_imports}"


@pytest.mark.unit
def test_parallel_imports_nothing_from_the_trainer():
    for module, path in _module_files().items():
        if module.startswith("sd35dist.parallel"):
            from_train = sorted(n for n in _imported_names(path, module) if n.startswith("sd35dist.trainer"))
            assert not from_train, f"{path.relative_to(PROJECT)} imports {from_train}"


@pytest.mark.unit
def test_project_import_graph_has_no_cycle():
    cycle = find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


@pytest.mark.unit
def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# Third-party modules are loaded once in the parent; each forked child then imports one project
# module first, as a fresh `python -c "import it"` would, in a fraction of a second.
FORKED_IMPORTS = """
import importlib, json, os, sys, traceback
preload, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in preload:
    try:
        importlib.import_module(name)
    except ImportError:  # `from module import attribute`: load the attribute (lazy packages)
        module, _, attribute = name.rpartition(".")
        try:
            getattr(importlib.import_module(module), attribute)
        except Exception:
            pass  # the child that needs it reports the failure
    except Exception:
        pass
assert not [m for m in sys.modules if m.split(".")[0] in ("sd35dist", "launcher")]
for module in modules:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            message = ""
        except BaseException:
            message = traceback.format_exc()
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    if message:
        print(f"--- {module}\\n{message}")
"""


@pytest.mark.process
def test_every_module_imports_on_its_own():
    files = _module_files()
    modules = [m for m in files if not m.endswith("__main__")]  # __main__ runs the program
    preload = sorted({
        name
        for module, path in files.items()
        for name in _imported_names(path, module, module_level_only=True)
        if name.split(".")[0] not in PACKAGES and name != "__future__"
    })
    proc = subprocess.run(
        [sys.executable, "-c", FORKED_IMPORTS, json.dumps(preload), json.dumps(modules)],
        capture_output=True, text=True, cwd=PROJECT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", "modules that fail when imported first:\n" + proc.stdout


def _folder(module: str) -> str:
    """The folder a module belongs to: sd35dist.checkpoint.layout → sd35dist.checkpoint; top-level
    modules of sd35dist (cli, __main__) and launcher's modules are their own package's."""
    parts = module.split(".")
    if parts[0] == "sd35dist" and len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0] if parts[0] == "launcher" else module


def _folder_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in _import_graph().items():
        edges = graph.setdefault(_folder(module), set())
        edges |= {_folder(t) for t in targets} - {_folder(module)}
    return graph


@pytest.mark.unit
def test_folders_import_one_way():
    """Imports inside functions counted: a lazy import is still an arrow between two folders."""
    cycle = find_cycle(_folder_graph())
    assert cycle is None, "folder-level import cycle: " + " → ".join(cycle or [])


@pytest.mark.unit
def test_checkpoint_owns_the_format_and_never_asks_parallel():
    """parallel/ asks checkpoint/ to write and read its part; checkpoint/ reads every format offline
    without a strategy, so the arrow between them runs one way."""
    graph = _folder_graph()
    assert "sd35dist.parallel" not in graph["sd35dist.checkpoint"]
    assert "sd35dist.checkpoint" in graph["sd35dist.parallel"]


def _env_reads(tree: ast.AST, names: frozenset[str]) -> list[tuple[int, str]]:
    """(line, name) of every string constant naming one of `names`, e.g. env.get("SLURM_JOB_ID")."""
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names]


@pytest.mark.unit
def test_only_the_environment_module_names_the_job_variables():
    from sd35dist.runtime.job_env import READ_HERE

    owner = PROJECT / "sd35dist" / "runtime" / "job_env.py"
    offenders = []
    for path in _module_files().values():
        if path != owner:
            offenders += [f"{path.relative_to(PROJECT)}:{line} {name}"
                          for line, name in _env_reads(ast.parse(path.read_text()), frozenset(READ_HERE))]
    assert not offenders, "read through sd35dist.runtime.job_env.JobEnvironment instead: " + ", ".join(offenders)


@pytest.mark.unit
def test_the_variable_check_sees_a_read():
    tree = ast.parse('import os\nx = os.environ.get("SLURM_JOB_ID")\ny = env["RANK"]\n')
    assert _env_reads(tree, frozenset({"SLURM_JOB_ID", "RANK"})) == [(2, "SLURM_JOB_ID"), (3, "RANK")]


@pytest.mark.unit
def test_nothing_writes_the_torchrun_variables_into_the_environment():
    """RANK/LOCAL_RANK/WORLD_SIZE are torchrun's to set: no module assigns them (job_env's scoped
    context for DeepSpeed's one-process start is the only place, tested on its own)."""
    offenders = []
    for path in _module_files().values():
        if path.name == "job_env.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            target = node.targets[0] if isinstance(node, ast.Assign) else None
            if isinstance(target, ast.Subscript) and "environ" in ast.unparse(target.value):
                offenders.append(f"{path.relative_to(PROJECT)}:{node.lineno}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in {"setdefault", "update", "__setitem__"}
                    and "environ" in ast.unparse(node.func.value)
                    and any(n in ast.unparse(node) for n in ("RANK", "WORLD_SIZE"))):
                offenders.append(f"{path.relative_to(PROJECT)}:{node.lineno}")
    assert not offenders, "os.environ written behind the caller's back: " + ", ".join(offenders)


@pytest.mark.process
def test_the_command_process_freezes_its_imports_and_a_python_caller_is_left_alone(tmp_path):
    """`python -m sd35dist` moves what the command imported out of the garbage collector's walks
    (gc.freeze: ~1 s less exit per rank); main() called from Python must not freeze its caller."""
    import gc

    from sd35dist.cli import main

    before = gc.get_freeze_count()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert gc.get_freeze_count() == before, "main(argv) froze the calling program's objects"
    probe = ("import gc, sys\nfrom sd35dist.cli import main\nsys.argv = ['sd35dist', 'report', sys.argv[1]]\n"
             "code = main()\nprint(code, gc.get_freeze_count())")
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "nope")], capture_output=True, text=True,
                          cwd=PROJECT, timeout=120)
    code, frozen = proc.stdout.split()[-2:]
    assert code == "2" and int(frozen) > 10000, proc.stdout + proc.stderr
