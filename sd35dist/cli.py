"""The `sd35dist` command: finds the command in sd35dist/config/commands.py and calls its module.

Submit-side commands go to the launcher (no torch imported), rank jobs (run under torchrun on
every rank) to sd35dist.jobs, tools to their own modules; only the module asked for is imported.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

from sd35dist.config.cli_args import CommandLineParser
from sd35dist.config.commands import COMMANDS, RANK_JOB, SUBMIT, Command, command_table, find_command


def argument_parser() -> argparse.ArgumentParser:
    """`sd35dist --help`, and the options of the rank jobs (the other commands parse their own)."""
    parser = CommandLineParser(
        prog="sd35dist",
        description="SD3.5 fine-tunes on Slurm clusters. `sd35dist <command> -h` shows a command's options.",
        epilog=command_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>", help="one of the commands below")
    for command in COMMANDS:
        if len(command.words) > 1:
            continue  # reached by its words before parsing; listed in the table
        if command.kind is RANK_JOB:
            p = sub.add_parser(command.name, description=command.summary)
            p.add_argument("--recipe", required=True, help="recipe YAML (the frozen copy in the run directory)")
            p.add_argument("--run-dir", required=command.run_dir_required, help="run directory for reports and metrics")
            if command.name == "cache":
                p.add_argument("--validation-only", action="store_true",
                               help="re-encode only the recipe's validation prompts into the existing cache")
        else:
            sub.add_parser(command.name, add_help=False)
    return parser


def run_command(command: Command, argv: list[str], own_process: bool = False) -> int:
    """Call the command's entry with what its kind takes (sd35dist/config/commands.py)."""
    if command.kind is RANK_JOB:
        args = argument_parser().parse_args(argv)  # before the import: `-h` or a usage error loads no torch
        return _entry(command, own_process)(args)
    if command.kind is SUBMIT:
        return _entry(command, own_process)(argv)
    return _entry(command, own_process)(argv[len(command.words):])


def _entry(command: Command, own_process: bool):
    entry = getattr(importlib.import_module(command.module), command.entry)
    if own_process:
        # What the command imported lives as long as the process: keep it out of the garbage
        # collector's walks. Otherwise the collection at exit walks torch's, diffusers' and
        # transformers' objects for ~1 s (every rank of every launch), and full collections
        # during training walk them again. Not done when main() is called inside another program.
        gc.freeze()
    return entry


def main(argv: list[str] | None = None) -> int:
    """`argv` None: this process is the `sd35dist` command (sys.argv); a list: called from Python."""
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = find_command(argv)
    if command is None:
        argument_parser().parse_args(argv)  # prints help, or names the unknown command, and exits
        return 2
    return run_command(command, argv, own_process)


def console() -> None:
    sys.exit(main())
