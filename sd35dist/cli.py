"""The `sd35dist` command: submit-side commands go to the launcher (no torch imported),
rank-side commands (run under torchrun on every rank) to sd35dist.jobs."""

from __future__ import annotations

import argparse
import importlib
import sys

LAUNCHER_COMMANDS = ("submit", "status", "logs", "cancel")
RANK_COMMANDS = {
    "preflight": ("sd35dist.jobs.preflight", "check the cluster before a long job: collectives, recipe, storage"),
    "cache": ("sd35dist.jobs.cache", "build the latent + text-embedding cache (`sd35dist cache inspect URL` to read one)"),
}
RUN_DIR_REQUIRED = ("preflight",)


def _rank_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd35dist",
        description="SD3.5 fine-tunes on Slurm clusters. Submit side: "
        + ", ".join(LAUNCHER_COMMANDS)
        + " (see `sd35dist submit -h`). Rank side, under torchrun: "
        + ", ".join(RANK_COMMANDS)
        + ".",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in LAUNCHER_COMMANDS:
        sub.add_parser(name, help=f"(submit side) sd35dist {name} -h", add_help=False)
    for name, (_, helptext) in RANK_COMMANDS.items():
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--recipe", required=True, help="recipe YAML (the frozen copy in the run directory)")
        p.add_argument("--run-dir", required=name in RUN_DIR_REQUIRED, help="run directory for reports and metrics")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LAUNCHER_COMMANDS:
        from launcher.cli import main as launcher_main

        return launcher_main(argv)
    if argv[:2] == ["cache", "inspect"]:
        from sd35dist.jobs.cache import inspect_main

        return inspect_main(argv[2:])
    args = _rank_parser().parse_args(argv)
    module = importlib.import_module(RANK_COMMANDS[args.command][0])
    return module.main(args)


def console() -> None:
    sys.exit(main())
