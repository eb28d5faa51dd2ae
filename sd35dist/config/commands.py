"""Every `sd35dist` command, once (no torch here): the CLI dispatches and the launcher submits from it.

Three kinds, each with one calling convention for its module's entry function:
- submit side: `launcher.cli.main(argv)` with the command word first; never imports torch.
- rank jobs: `python -m sd35dist JOB --recipe R [--run-dir D]` on every rank under torchrun;
  the entry gets the parsed namespace. These are exactly what `sd35dist submit --job` may run.
- tools: run by hand or by a job script; the entry gets the arguments after the command's words.
"""

from __future__ import annotations

import argparse
import enum
import importlib
from dataclasses import dataclass

WARM_START_METHOD = "forkserver"
"""torchrun's --start-method under which `sd35dist torchrun` forks every rank of a module from one warm
interpreter (sd35dist/jobs/warm_ranks.py); COLD_START_METHOD gives each rank a fresh interpreter."""
COLD_START_METHOD = "spawn"


def rank_start_method(warm_ranks: bool) -> str:
    """The --start-method a job's torchrun gets for the profile's launch.warm_ranks."""
    return WARM_START_METHOD if warm_ranks else COLD_START_METHOD


class CommandKind(enum.Enum):
    SUBMIT_SIDE = "submit side (imports no torch)"
    RANK_JOB = "rank jobs (under torchrun on every rank; `sd35dist submit --job <job>` runs one)"
    TOOL = "tools"


@dataclass(frozen=True, kw_only=True)
class Command:
    words: tuple[str, ...]
    """What the user types after `sd35dist`, e.g. ("cache", "inspect")."""
    kind: CommandKind
    summary: str
    """The one line `sd35dist --help` shows."""
    module: str
    entry: str = "main"
    run_dir_required: bool = False
    """Rank jobs only: whether `--run-dir` must be given (where the job writes its report)."""
    submittable: bool = False
    """Tools only: `sd35dist submit --job` may also run it on every rank; it then takes `--recipe R --run-dir D`
    (the frozen recipe and the run directory) in place of its own positional arguments."""
    parser: str = "argument_parser"
    """The function of `module` that returns the command's argparse parser (rank jobs: sd35dist.cli's;
    submit side: launcher.cli's, whose subparser `words` names)."""

    @property
    def name(self) -> str:
        return " ".join(self.words)


SUBMIT, RANK_JOB, TOOL = CommandKind.SUBMIT_SIDE, CommandKind.RANK_JOB, CommandKind.TOOL

COMMANDS: tuple[Command, ...] = (
    Command(words=("submit",), kind=SUBMIT, module="launcher.cli",
            summary="render a job from a profile and a recipe, and submit it (--dry-run prints it)"),
    Command(words=("plan",), kind=SUBMIT, module="launcher.cli",
            summary="memory, communication and step time per GPU of a recipe on a profile; exit 2 if it cannot fit"),
    Command(words=("status",), kind=SUBMIT, module="launcher.cli", summary="a job's state"),
    Command(words=("logs",), kind=SUBMIT, module="launcher.cli", summary="print a job's logs (--follow to keep printing)"),
    Command(words=("cancel",), kind=SUBMIT, module="launcher.cli", summary="cancel a job"),
    Command(words=("train",), kind=RANK_JOB, module="sd35dist.jobs.train",
            summary="the SD3.5 fine-tune every rank runs (FSDP2 or DeepSpeed ZeRO)"),
    Command(words=("preflight",), kind=RANK_JOB, module="sd35dist.jobs.preflight", run_dir_required=True,
            summary="check the cluster before a long job: collectives, recipe, storage"),
    Command(words=("cache",), kind=RANK_JOB, module="sd35dist.jobs.cache",
            summary="build the latent + text-embedding cache"),
    Command(words=("steps",), kind=TOOL, module="sd35dist.jobs.steps",
            summary="optimizer steps per epoch and in total, per profile, from the cache's manifest"),
    Command(words=("cache", "inspect"), kind=TOOL, module="sd35dist.jobs.cache", entry="inspect_main",
            parser="inspect_argument_parser",
            summary="summarise a cache from its manifest (--verify checks every shard's sha256)"),
    Command(words=("export",), kind=TOOL, module="sd35dist.checkpoint.export",
            summary="write a checkpoint's transformer as a diffusers directory (or one SD3.5 single file)"),
    Command(words=("sample",), kind=TOOL, module="sd35dist.validation.sample_command",
            summary="images from a checkpoint, an export or the base model (CFG or APG)"),
    Command(words=("sweep",), kind=TOOL, module="sd35dist.validation.sweep_command", submittable=True,
            summary="the validation prompts x seeds for every kept checkpoint as one grid (--compare-guidance: CFG vs APG)"),
    Command(words=("report",), kind=TOOL, module="sd35dist.validation.report",
            summary="a run's loss/lr/throughput plots and validation grids as one self-contained report.html"),
    Command(words=("inspect",), kind=TOOL, module="sd35dist.checkpoint.inspect",
            summary="what a checkpoint, diffusers folder, single file or LoRA holds (--diff BASE: what training changed)"),
    Command(words=("import", "simpletuner"), kind=TOOL, module="sd35dist.importers.simpletuner",
            summary="write a recipe from a SimpleTuner config.json/config.env (+ multidatabackend.json)"),
    Command(words=("torchrun",), kind=TOOL, module="sd35dist.jobs.torchrun",
            summary="torchrun that ends a failed job with one line (what job scripts run)"),
)

RANK_JOBS: tuple[str, ...] = tuple(c.name for c in COMMANDS if c.kind is RANK_JOB)
"""Rank-side commands `python -m sd35dist <job>` that a submission may run."""
SUBMITTABLE_JOBS: tuple[str, ...] = RANK_JOBS + tuple(c.name for c in COMMANDS if c.submittable)
"""What `sd35dist submit --job` may run on every rank."""


def find_command(argv: list[str]) -> Command | None:
    """The command `argv` starts with, the longest match first (`cache inspect` before `cache`)."""
    matches = [c for c in COMMANDS if tuple(argv[: len(c.words)]) == c.words]
    return max(matches, key=lambda c: len(c.words), default=None)


def argument_parser(command: Command) -> argparse.ArgumentParser:
    """The parser that reads `command`'s arguments (importing its module: a tool's imports torch)."""
    module = "sd35dist.cli" if command.kind is RANK_JOB else command.module
    parser = getattr(importlib.import_module(module), command.parser)()
    if command.kind is TOOL:
        return parser
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command.name]


def command_table() -> str:
    """Every command on one line, grouped by kind: the body of `sd35dist --help`."""
    width = max(len(c.name) for c in COMMANDS) + 2
    blocks = []
    for kind in CommandKind:
        lines = [f"{kind.value}:"] + [f"  {c.name:<{width}}{c.summary}" for c in COMMANDS if c.kind is kind]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
