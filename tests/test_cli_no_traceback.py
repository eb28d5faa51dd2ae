"""Every command answers a bad value of each of its arguments with one line on stderr and exit status 2
— never a traceback, never a usage block.

The arguments come from each command's own argparse parser (config/commands.argument_parser), so a
flag added later without a bad value below fails `test_every_argument_has_a_bad_value`. Each case
starts from a command line that is good (GOOD) and spoils one argument: with the generic
malformations every parser must reject (a value left out, a value given to a switch, a required
argument missing) and with the values that command must refuse (BAD). An argument no value of
which is wrong is listed in FREE with the reason. Everything runs in this process (no job starts:
each case stops at its bad argument), on the tiny model and a DCP checkpoint written here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sd35dist.cli import main
from sd35dist.config.commands import COMMANDS, argument_parser
from tests.checkpoint_files import write_checkpoint

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Bad:
    args: tuple[str, ...]
    """Replaces the argument's tokens in the good command line ({name} is a path of the `paths` fixture)."""
    says: str
    """What the one line must contain."""


def bad(*args: str, says: str) -> Bad:
    return Bad(args, says)


GOOD: dict[str, dict[str, tuple[str, ...]]] = {
    "submit": {"profile": ("--profile", "{profile}"), "recipe": ("--recipe", "{recipe}"),
               "output": ("--output", "{tmp}/job.sh")},
    "plan": {"profile": ("--profile", "{profile}"), "recipe": ("--recipe", "{recipe}")},
    "status": {"job": ("{nothing}",)},
    "logs": {"job": ("{nothing}",)},
    "cancel": {"job": ("{nothing}",)},
    "train": {"recipe": ("--recipe", "{recipe}"), "run_dir": ("--run-dir", "{tmp}/run")},
    "preflight": {"recipe": ("--recipe", "{recipe}"), "run_dir": ("--run-dir", "{tmp}/run")},
    "cache": {"recipe": ("--recipe", "{recipe}"), "run_dir": ("--run-dir", "{tmp}/run")},
    "steps": {"recipe": ("--recipe", "{recipe}")},
    "cache inspect": {"url": ("{tmp}/cache",)},
    "export": {"checkpoint": ("{checkpoint}",), "out": ("--out", "{tmp}/exported")},
    "sample": {"source": ("{model}",), "prompt": ("--prompt", "a fox"), "out": ("--out", "{tmp}/samples")},
    "sweep": {"output_dir": ("{output}",)},
    "report": {"run_dirs": ("{run}",)},
    "inspect": {"path": ("{checkpoint}",)},
    "import simpletuner": {"config": ("{simpletuner}",), "out": ("-o", "{tmp}/imported.yaml")},
    "torchrun": {"training_script": ("train.py",)},
}

NOT_UTF8 = "not UTF-8"
BAD: dict[str, dict[str, list[Bad]]] = {
    "submit": {
        "profile": [bad("--profile", "{nothing}.yaml", says="file not found"),
                    bad("--profile", "{latin1}", says=NOT_UTF8)],
        "recipe": [bad("--recipe", "{nothing}", says="recipe file not found"), bad("--recipe", "{latin1}", says=NOT_UTF8),
                   bad("--recipe", "{bad_prompts_recipe}", says="validation.prompts_file")],
        "job": [bad("--job", "fly", says="invalid choice: 'fly'")],
        "overrides": [bad("--set", "novalue", says="expected KEY.PATH=VALUE"),
                      bad("--set", "train.learning_rate=.inf", says="must be a finite number"),
                      bad("--set", "validation.seeds=[-1]", says="must be ≥ 0"),
                      bad("--set", "validation.resolutions=[[4096, 4096]]", says="beyond the model's position embedding")],
        "run_dir": [bad("--run-dir", "{tmp}", says="already exists: pass another --run-dir")],
        "output": [bad("--output", "{tmp}/no/such/job.sh", says="does not exist"),
                   bad("--output", "{tmp}", says="is a directory"),
                   bad("--output", "{file}", says="already exists: pass --force")],
        "force": [bad("--force", "--output", "{recipe}", says="is a file this submission reads")],
    },
    "plan": {
        "profile": [bad("--profile", "{nothing}.yaml", says="file not found")],
        "recipe": [bad("--recipe", "{latin1}", says=NOT_UTF8), bad("--recipe", "{nothing}", says="recipe file not found")],
        "overrides": [bad("--set", "train.learning_rate=nan", says="must be a finite number"),
                      bad("--set", "train.lora={targets: [attn.to_qq]}", says="names no Linear module")],
    },
    "status": {"job": [bad("{corrupt_job}", says="not a job record"), bad("{nothing}/run", says="no such run directory"),
                       bad("not-a-job", says="no such job")]},
    "logs": {"job": [bad("{corrupt_job}", says="not a job record"), bad("{nothing}/run", says="no such run directory")]},
    "cancel": {"job": [bad("{corrupt_job}", says="not a job record"), bad("not-a-job", says="no such job")]},
    "train": {"recipe": [bad("--recipe", "{nothing}", says="file not found"), bad("--recipe", "{latin1}", says=NOT_UTF8),
                         bad("--recipe", "{bad_prompts_recipe}", says="validation.prompts_file")],
              "run_dir": [bad("--run-dir", "{file}", says="is a file")]},
    "preflight": {"recipe": [bad("--recipe", "{nothing}", says="recipe file not found")],
                  "run_dir": [bad("--run-dir", "{file}/run", says="is a file")]},
    "cache": {"recipe": [bad("--recipe", "{nothing}", says="file not found"),
                         bad("--recipe", "{bad_prompts_recipe}", says="validation.prompts_file")],
              "run_dir": [bad("--run-dir", "{file}", says="is a file")],
              "validation_only": [bad("--validation-only", "--recipe", "{no_validation_recipe}",
                                      says="no validation prompts to cache")]},
    "steps": {"recipe": [bad("--recipe", "{nothing}", says="file not found")],
              "profile": [bad("--profile", "{nothing}.yaml", says="file not found")]},
    "cache inspect": {"url": [bad("{nothing}", says="no manifest")],
                      "storage_option": [bad("--storage-option", "novalue", says="expected KEY=VALUE")]},
    "export": {
        "checkpoint": [bad("{nothing}", says="no such directory"), bad("{model}", says="neither a complete checkpoint")],
        "out": [bad("--out", "{read_only}/x", says="is not writable"), bad("--out", "{file}", says="already exists")],
        "ema": [bad("--ema", says="no EMA in this checkpoint")],
        "dtype": [bad("--dtype", "fp64", says="invalid choice"), bad("--dtype", "fp8_e4m3fn", says="--format single-file")],
        "format": [bad("--format", "onnx", says="invalid choice")],
        "with_vae": [bad("--with-vae", says="need --format single-file")],
        "vae": [bad("--format", "single-file", "--out", "{tmp}/m.safetensors", "--vae", "{model}/transformer",
                    says="not a VAE")],
        "title": [bad("--title", "x", says="need --format single-file")],
        "merge": [bad("--merge", says="--merge needs a LoRA checkpoint")],
    },
    "sample": {
        "source": [bad("{nothing}", says="no such file or directory"), bad("{random_dir}", says="not a readable JSON config"),
                   bad("{model}/vae", says="not of an SD3 transformer")],
        "model": [bad("--model", "{random_dir}", says="--model: ")],
        "prompts_file": [bad("--prompts-file", "{nothing}", says="does not exist"),
                         bad("--prompts-file", "{latin1}", says=NOT_UTF8)],
        "seed": [bad("--seed", str(2**70), says="must be between 0 and"), bad("--seed", "x", says="expected a seed")],
        "width": [bad("--width", "0", says="must be ≥ 1"), bad("--width", "16384", says="beyond the model's position")],
        "height": [bad("--height", "-16", says="must be ≥ 1"), bad("--height", "20", says="multiple of 16")],
        "max_sequence_length": [bad("--max-sequence-length", "0", says="between 1 and 512")],
        "ema": [bad("--ema", says="--ema needs a checkpoint")],
        "out": [bad("--out", "{file}", says="is a file"), bad("--out", "{earlier}", says="holds an earlier grid.png")],
        "force": [bad("--force", "--out", "{file}", says="is a file")],
        "steps": [bad("--steps", "0", says="must be ≥ 1"), bad("--steps", "abc", says="expected a positive integer")],
        "guidance": [bad("--guidance", "pag", says="invalid choice")],
        "scale": [bad("--scale", "-5", says="must be ≥ 1"), bad("--scale", "inf", says="must be a finite number")],
        "apg_eta": [bad("--apg-eta", "nan", says="must be a finite number")],
        "apg_momentum": [bad("--apg-momentum", "inf", says="must be a finite number")],
        "apg_norm_threshold": [bad("--apg-norm-threshold=-1", says="must be ≥ 0")],
        "skip_layers": [bad("--skip-layers", "7,x", says="expected block numbers"),
                        bad("--skip-layers", "2,9", says="has blocks 0–1"),
                        bad("--skip-layers", "1", "--scale", "1", says="--skip-layers needs --scale above 1")],
        "skip_scale": [bad("--skip-scale=-1", says="must be ≥ 0")],
        "skip_start": [bad("--skip-start", "2", says="must be between 0.0 and 1.0"),
                       bad("--skip-layers", "1", "--skip-start", "0.5", "--skip-stop", "0.2", says="must be below")],
        "skip_stop": [bad("--skip-stop", "nan", says="must be a finite number")],
    },
    "sweep": {
        "output_dir": [bad("{nothing}", says="no complete checkpoint")],
        "steps": [bad("--steps", "abc", says="expected comma-separated steps"),
                  bad("--steps", "8", says="no complete checkpoint for step(s) [8]")],
        "recipe": [bad("--recipe", "{latin1}", says=NOT_UTF8)],
        "ema": [bad("--ema", says="no EMA in this checkpoint")],
        "out": [bad("--out", "{file}", says="is a file"), bad("--out", "{earlier}", says="holds an earlier grid.png")],
        "force": [bad("--force", "--out", "{file}", says="is a file")],
        "run_dir": [bad("--run-dir", "{nothing}", says="not a directory")],
        # The rest of skip-layer guidance is checked against the recipe and the model (test_tool_refusals).
        "skip_layers": [bad("--skip-layers", "-1", says="expected block numbers")],
        "skip_scale": [bad("--skip-scale", "inf", says="must be a finite number")],
        "skip_start": [bad("--skip-start=-0.1", says="must be between 0.0 and 1.0")],
        "skip_stop": [bad("--skip-stop", "1.5", says="must be between 0.0 and 1.0")],
    },
    "report": {"run_dirs": [bad("{garbage_run}", says="not a run directory"), bad("{nothing}", says="no such run directory")],
               "out": [bad("--out", "{file}", says="is a file"), bad("--out", "{earlier}", says="already exists: pass --force")],
               "force": [bad("--force", "--out", "{file}", says="is a file")]},
    "inspect": {"path": [bad("{garbage}", says="not a readable safetensors file"), bad("{nothing}", says="no such file")],
                "ema": [bad("--ema", says="no EMA in this checkpoint")],
                "diff": [bad("--diff", "{nothing}", says="no such file or directory")],
                "png": [bad("--png", "{tmp}/p.png", says="add it")]},
    "import simpletuner": {
        "config": [bad("{nothing}", says="no such file"), bad("{latin1}", says=NOT_UTF8)],
        "backend": [bad("--backend", "{nothing}", says="no such file")],
        "out": [bad("-o", "{file}", says="exists already"), bad("-o", "{tmp}/no/such/r.yaml", says="does not exist")],
    },
}

FREE: dict[str, dict[str, str]] = {
    "submit": {"dry_run": "a switch that writes less; its bad values are the generic ones",
               "wait": "its bad case is a job that fails: test_local_submit.py::test_a_failing_job_with_wait_is_its_line"},
    "logs": {"follow": "a switch: what is bad is the job, covered above"},
    "cache inspect": {"verify": "a switch; the problems it finds are listed with exit 1, not a usage mistake"},
    "sample": {"prompt": "any text is a prompt, the empty one included",
               "negative_prompt": "any text is a negative prompt, the empty one included"},
    "sweep": {"compare_guidance": "a switch: it renders both guidance kinds"},
    "inspect": {"summary": "a switch: it prints less"},
    "import simpletuner": {"allow_unknown": "a switch: unknown options are listed instead of refused"},
}
TORCH_OWNS = "torch's own torchrun options (sd35dist renders them from a validated profile): usage mistakes only"


def arguments(command) -> list[argparse.Action]:
    return [a for a in argument_parser(command)._actions if not isinstance(a, argparse._HelpAction)]


def generic_cases(command) -> Iterator[tuple[str, tuple[str, ...] | None, str]]:
    """(argument, its bad tokens, what the line says) every argparse parser must refuse."""
    for action in arguments(command):
        if not action.option_strings:
            if action.required and action.nargs not in ("?", "*", argparse.REMAINDER):
                yield action.dest, None, "the following arguments are required"
        elif action.nargs == 0:
            yield action.dest, (f"{action.option_strings[-1]}=yes",), "ignored explicit argument 'yes'"
        elif action.nargs in (None, 1):  # "--" ends the options: the value is missing wherever the option stands
            yield action.dest, (action.option_strings[-1], "--"), "expected one argument"


def _cases() -> list:
    cases = []
    for command in COMMANDS:
        for dest, tokens, says in generic_cases(command):
            cases.append(pytest.param(command.name, dest, Bad(tokens or (), says), id=f"{command.name}-{dest}-generic"))
        for dest, bads in BAD.get(command.name, {}).items():
            for index, case in enumerate(bads):
                if isinstance(case, Bad):
                    cases.append(pytest.param(command.name, dest, case, id=f"{command.name}-{dest}-{index}"))
                else:  # a pytest.param with marks
                    cases.append(pytest.param(command.name, dest, *case.values, marks=case.marks,
                                              id=f"{command.name}-{dest}-{index}"))
    return cases


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_model) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hostile")
    (root / "images").mkdir()
    (root / "a-file").write_text("a regular file\n")
    (root / "latin1.txt").write_bytes("name: t\nm\u00fcnchen: 1\n".encode("latin-1"))
    (root / "garbage.safetensors").write_bytes(os.urandom(1000))
    random_dir = root / "random"
    random_dir.mkdir()
    (random_dir / "config.json").write_bytes(os.urandom(300))
    (root / "corrupt-job").mkdir()
    (root / "corrupt-job" / "job.json").write_text('{"job_id": "12", "sched')
    (root / "garbage-run").mkdir()
    (root / "garbage-run" / "metrics-rank00000.jsonl").write_text("[1]\nnot json\n")
    (root / "earlier").mkdir()  # what an earlier sample, sweep or report left
    (root / "earlier" / "grid.png").write_bytes(b"\x89PNG earlier")
    (root / "earlier" / "report.html").write_text("<html>earlier</html>")
    (root / "run").mkdir()
    (root / "run" / "metrics-rank00000.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, "rank": 0}) + "\n")
    (root / "profile.yaml").write_text(yaml.safe_dump({"scheduler": "local", "run_root": str(root / "runs")}))
    recipe = {"name": "t", "model": {"pretrained": str(tiny_model)}, "data": {
        "cache_url": str(root / "cache"), "datasets": [{"id": "d", "source": str(root / "images")}]},
        "output": {"dir": str(root / "out")}, "train": {"max_train_steps": 10},
        "validation": {"prompts": ["a fox"], "resolutions": [[64, 64]]}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "bad-prompts.yaml").write_text(yaml.safe_dump(
        {**recipe, "validation": {"prompts_file": str(root / "latin1.txt")}}))
    (root / "no-validation.yaml").write_text(yaml.safe_dump({k: v for k, v in recipe.items() if k != "validation"}))
    (root / "simpletuner.json").write_text(json.dumps({"model_family": "sd3", "learning_rate": 1e-4}))
    checkpoint = write_checkpoint(root / "output" / "checkpoints" / "step-00000004", tiny_model)
    read_only = Path("/sys/fs") if os.geteuid() == 0 else root / "read-only"
    if os.geteuid() != 0:
        read_only.mkdir()
        read_only.chmod(0o555)
    return {"tmp": str(root), "nothing": str(root / "nothing"), "file": str(root / "a-file"),
            "latin1": str(root / "latin1.txt"), "garbage": str(root / "garbage.safetensors"),
            "random_dir": str(random_dir), "corrupt_job": str(root / "corrupt-job"),
            "garbage_run": str(root / "garbage-run"), "run": str(root / "run"), "profile": str(root / "profile.yaml"),
            "recipe": str(root / "recipe.yaml"), "bad_prompts_recipe": str(root / "bad-prompts.yaml"),
            "no_validation_recipe": str(root / "no-validation.yaml"), "simpletuner": str(root / "simpletuner.json"),
            "model": str(tiny_model), "checkpoint": str(checkpoint), "output": str(root / "output"),
            "read_only": str(read_only), "earlier": str(root / "earlier")}


def command_line(command: str, dest: str, case: Bad, paths: dict[str, str]) -> list[str]:
    """The good command line with `dest`'s tokens replaced by the case's (left out when it has none):
    a positional's first, an option's last (last wins in argparse), torchrun's before its script."""
    others = [token for name, part in GOOD[command].items() if name != dest for token in part]
    spec = next(c for c in COMMANDS if c.name == command)
    positional = {a.dest for a in arguments(spec) if not a.option_strings}
    first = command == "torchrun" or dest in positional
    tokens = [*case.args, *others] if first else [*others, *case.args]
    return command.split() + [re.sub(r"\{(\w+)\}", lambda m: paths.get(m.group(1), m.group(0)), t) for t in tokens]


@pytest.mark.parametrize(("command", "dest", "case"), _cases())
def test_a_bad_argument_is_one_line_and_exit_2(command, dest, case, paths, capsys, monkeypatch):
    monkeypatch.setenv("SD35DIST_STATE_DIR", str(Path(paths["tmp"]) / "state"))
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no Slurm to ask: only this account's records
    argv = command_line(command, dest, case, paths)
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except BaseException as error:  # noqa: BLE001 — what a user would see as a traceback
        pytest.fail(f"sd35dist {' '.join(argv)}: traceback: {type(error).__name__}: {error}")
    err = capsys.readouterr().err
    assert code == 2, f"sd35dist {' '.join(argv)} exited {code}: {err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"sd35dist {' '.join(argv)}:\n{err}"
    assert case.says in lines[0], f"sd35dist {' '.join(argv)}: {lines[0]}"


def test_every_argument_has_a_bad_value():
    """A flag added to any command must get a bad value in BAD (or a reason in FREE) here."""
    for command in COMMANDS:
        dests = {a.dest for a in arguments(command)}
        if command.name == "torchrun":
            assert dests, TORCH_OWNS
            continue
        covered = set(BAD.get(command.name, {})) | set(FREE.get(command.name, {}))
        assert dests - covered == set(), f"{command.name}: no bad value for {sorted(dests - covered)}"
        assert covered - dests == set(), f"{command.name}: BAD/FREE name arguments it does not have: {covered - dests}"
        assert set(GOOD[command.name]) <= dests, command.name


def test_the_good_command_lines_are_good(paths, capsys, monkeypatch):
    """The cases would prove nothing if the line they start from were refused already: the parsers take it."""
    for command in COMMANDS:
        argv = command_line(command.name, "", Bad((), ""), paths)[len(command.words):]
        argument_parser(command).parse_args(argv)  # a usage mistake would exit here
