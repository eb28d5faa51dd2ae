"""`sd35dist submit | status | logs | cancel` — the submit side of the CLI (no torch)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from launcher import job_control, resource_report
from launcher.hub_datasets import resolve_hub_datasets
from launcher.hub_models import resolve_hub_model
from launcher.plan import JobPlan, build_plan, check_fit, split_overrides
from launcher.profile import Profile, load_profile, profile_path
from launcher.render import render_script
from launcher.submission import prepare_run_dir, submit
from sd35dist.checkpoint.layout import COMPLETE, BranchConflict, CheckpointDir, names_checkpoint
from sd35dist.config import ConfigError, Recipe, load_recipe, recipe_yaml, resolve_paths
from sd35dist.config.cli_args import CommandLineParser
from sd35dist.config.commands import COMMANDS, SUBMIT, SUBMITTABLE_JOBS
from sd35dist.config.input_checks import check_recipe_inputs
from sd35dist.config.loading import dump_yaml
from sd35dist.config.model_layout import check_pretrained
from sd35dist.config.recipe import is_url
from sd35dist.runtime.atomic_files import write_text_atomically
from sd35dist.runtime.save_budget import grace_warnings, read_save_estimate
from sd35dist.runtime.slurm_query import kill_wait_s

DEFAULT_RECIPE = "sd35dist.yaml"


def argument_parser() -> argparse.ArgumentParser:
    """The submit side's commands, one subparser each; a usage mistake is one line (cli_args)."""
    parser = CommandLineParser(prog="sd35dist", description="SD3.5 fine-tunes on Slurm clusters")
    sub = parser.add_subparsers(dest="command", required=True)
    summaries = {c.name: c.summary for c in COMMANDS if c.kind is SUBMIT}
    p = sub.add_parser("submit", help=summaries["submit"])
    p.add_argument("--profile", required=True, help="a name in cluster_configs/ or a YAML path")
    p.add_argument("--recipe", help=f"recipe YAML (default: the profile's default_recipe, else ./{DEFAULT_RECIPE})")
    p.add_argument("--job", default="train", choices=SUBMITTABLE_JOBS, help="what every rank runs (default: train)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile or recipe key, e.g. slurm.nodes=2 or train.learning_rate=1e-5")
    p.add_argument("--run-dir", help="run directory (default: <run_root>/<recipe>-<job>-<time>)")
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    p.add_argument("--output", metavar="FILE", help="write the script to FILE and prepare the run directory; submit nothing")
    p.add_argument("--force", action="store_true", help="let --output replace an existing file")
    p.add_argument("--wait", action="store_true", help="follow the job's log until it ends; exit with its status")
    q = sub.add_parser("plan", help=summaries["plan"])
    q.add_argument("--profile", required=True, help="a name in cluster_configs/ or a YAML path")
    q.add_argument("--recipe", help=f"recipe YAML (default: the profile's default_recipe, else ./{DEFAULT_RECIPE})")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile or recipe key, e.g. train.train_batch_size=2")
    for name in ("status", "logs", "cancel"):
        q = sub.add_parser(name, help=summaries[name])
        q.add_argument("job", help="job id or run directory")
        if name == "logs":
            q.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    return parser


def _recipe_path(arg: str | None, profile: Profile, profile_file: Path) -> Path:
    if arg:
        path = Path(arg)
        if not path.is_file():
            raise ConfigError(arg, "", "recipe file not found")
        return path
    if profile.default_recipe:
        for base in (Path.cwd(), profile_file.resolve().parent.parent):
            candidate = base / os.path.expanduser(profile.default_recipe)
            if candidate.is_file():
                return candidate
        raise ConfigError(profile_file.name, "default_recipe", f"{profile.default_recipe} not found")
    path = Path(DEFAULT_RECIPE)
    if not path.is_file():
        raise ConfigError(DEFAULT_RECIPE, "", "recipe file not found: pass --recipe or set default_recipe in the profile")
    return path


def _run_dir(arg: str | None, profile: Profile, recipe: Recipe, job: str) -> Path:
    if arg:
        return Path(arg).expanduser().resolve()
    root = Path(os.path.expandvars(os.path.expanduser(profile.run_root))).resolve()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = root / f"{recipe.name}-{job}-{stamp}"
    suffix = 2
    while candidate.exists():
        candidate = root / f"{recipe.name}-{job}-{stamp}-{suffix}"
        suffix += 1
    return candidate


def inputs_from_args(args: argparse.Namespace) -> tuple[Profile, Path, Recipe, Path]:
    """The profile and the recipe (with `--set` applied) and the files they came from."""
    profile_overrides, recipe_overrides = split_overrides(args.overrides)
    profile_file = profile_path(args.profile)
    profile = load_profile(profile_file, profile_overrides)
    recipe_file = _recipe_path(args.recipe, profile, profile_file)
    recipe = resolve_paths(load_recipe(recipe_file, recipe_overrides), Path.cwd(), recipe_file.resolve().parent)
    return profile, profile_file, recipe, recipe_file


def check_inputs(profile: Profile, recipe: Recipe, recipe_file: Path, job: str, *, model_dir: bool = True) -> list[str]:
    """Refuse what the job's ranks would fail on (the model directory, the files the recipe names,
    sizes and LoRA targets against the model's config); return notes on what this host cannot see."""
    here = profile.scheduler == "local"
    notes = [check_pretrained(recipe, job, visible_everywhere=here, recipe_file=recipe_file.name)] if model_dir else []
    notes += check_recipe_inputs(recipe, job, recipe_file.name, visible_everywhere=here)
    return [note for note in notes if note]


def plan_from_args(args: argparse.Namespace) -> tuple[JobPlan, Profile, Recipe, Path]:
    profile, profile_file, recipe, recipe_file = inputs_from_args(args)
    check_has_datasets(recipe, args.job, recipe_file.name)
    # Refusals first: nothing (not even a model download) happens for a submission that would be refused.
    if args.job == "train":
        refuse_resume_branch(recipe, recipe_file.name)
    if args.output:
        refuse_output_file(Path(args.output), args.force, (recipe_file, profile_file))
    download = not (args.dry_run and not args.output)
    hub = resolve_hub_model(recipe, args.job, profile.hf_home, recipe_file.name, download=download)
    hub_data = resolve_hub_datasets(hub.recipe, args.job, profile.hf_home, recipe_file.name, download=download)
    recipe = hub_data.recipe
    run_dir = _run_dir(args.run_dir, profile, recipe, args.job)
    plan = build_plan(
        profile=profile,
        recipe=recipe,
        profile_name=profile_file.stem,
        job=args.job,
        run_dir=str(run_dir),
        profile_file=profile_file.name,
        recipe_file=recipe_file.name,
    )
    hub_env = {**hub.env, **hub_data.env}
    if hub_env:
        plan = dataclasses.replace(plan, env=(*plan.env, *hub_env.items()))
    # A Hub id not yet in the cache is downloaded by submit: its directory is checked once it is there.
    notes = [note for note in (hub.note, hub_data.note) if note]
    for note in notes + check_inputs(profile, recipe, recipe_file, args.job, model_dir=hub.note is None):
        print(note, file=sys.stderr)
    if args.job == "train":
        for line in save_budget_warnings(profile, recipe):
            print(f"warning: {line}", file=sys.stderr)
    return plan, profile, recipe, recipe_file


def refuse_output_file(output: Path, force: bool, inputs: tuple[Path, ...]) -> None:
    """`--output FILE` replaces nothing unless asked (--force), and never the files this submission reads."""
    if any(output.resolve() == path.resolve() for path in inputs):
        raise ConfigError("--output", str(output), "is a file this submission reads (the recipe or the profile): "
                          "choose another name")
    if output.is_dir():
        raise ConfigError("--output", str(output), "is a directory: give a file name for the script")
    if output.exists() and not force:
        raise ConfigError("--output", str(output), "already exists: pass --force to replace it, or choose another name")
    parent = output.parent
    if not parent.is_dir():
        raise ConfigError("--output", str(output), f"directory {parent} does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("--output", str(output), f"directory {parent} is not writable")


def refuse_resume_branch(recipe: Recipe, recipe_file: str) -> None:
    """What the ranks refuse at start, refused at submit when this host sees the checkpoint: a
    `train.resume` path that training would overwrite or rotate away (docs/checkpoints.md)."""
    named = Path(recipe.train.resume)
    if not names_checkpoint(recipe.train.resume) or not (named / COMPLETE).is_file():
        return
    try:
        CheckpointDir(recipe.output.dir).branch_start(named, run_dir=None)  # a new run continues no branch
    except BranchConflict as err:
        raise ConfigError(recipe_file, "train.resume", str(err)) from None


MANIFEST_NAME = "manifest.json"  # sd35dist/data/manifest.py's (the launcher does not import the data package)


def check_has_datasets(recipe: Recipe, job: str, recipe_file: str) -> None:
    """`cache` builds from data.datasets, and `train` reads what they cached: without datasets, `cache` is
    refused, and so is `train` unless its cache exists (a local cache_url is checked here; a remote one
    by the ranks, which stop with one line when its manifest is missing)."""
    if recipe.data.datasets or job not in ("cache", "train"):
        return
    local = not is_url(recipe.data.cache_url) or recipe.data.cache_url.startswith("file://")
    cache = Path(recipe.data.cache_url.removeprefix("file://"))
    if job == "cache" or (local and not (cache / MANIFEST_NAME).is_file()):
        raise ConfigError(recipe_file, "data.datasets", f"empty{'' if job == 'cache' else f' and no cache at {cache}'}: "
                                                        "add the datasets (id, source, caption_strategy) to cache and "
                                                        "train from")


def save_budget_warnings(profile: Profile, recipe: Recipe) -> list[str]:
    """Whether a save fits the time Slurm gives it, from the last preflight's or run's measurement."""
    estimate = read_save_estimate(recipe.output.dir)
    if estimate is None or profile.slurm is None:
        return []
    kill_wait = kill_wait_s() if shutil.which("scontrol") else None
    lines = grace_warnings(signal_grace_s=profile.slurm.signal_grace_s, kill_wait_s=kill_wait,
                           save_s=estimate.save_s, step_s=estimate.step_s)
    return [f"{line} (save time {estimate.source})" for line in lines]


def _follow(record: dict[str, Any], out=sys.stdout, poll_s: float = 1.0) -> str:
    """Print the job's logs as they grow until it has ended for good; return its final state.

    A requeued job (time limit, preemption, node failure) is followed through its restarts,
    each reported, until it really ends.
    """
    offsets: dict[Path, int] = {}
    restarts = 0
    while True:
        ended = job_control.ended_state(record)
        for path in job_control.log_files(record):
            start = offsets.get(path, 0)
            with path.open("rb") as handle:
                handle.seek(start)
                chunk = handle.read()
            # Whole lines only (a progress bar's \r ends one too): the .out and .err logs are printed in
            # turn, and a line cut at this read would run into the other log's next line.
            if ended is None:
                chunk = chunk[:max(chunk.rfind(b"\n"), chunk.rfind(b"\r")) + 1]
            elif chunk and not chunk.endswith((b"\n", b"\r")):
                chunk += b"\n"  # the job's last, unterminated line; nothing more is read after it
            if chunk:
                out.write(chunk.decode(errors="replace"))
                out.flush()
                offsets[path] = start + len(chunk)
        if record["scheduler"] == "slurm" and ended is None:
            now = job_control.slurm_restarts(record["job_id"])
            if now > restarts:
                restarts = now
                out.write(f"sd35dist: job {record['job_id']} requeued (restart {restarts}); still following it\n")
                out.flush()
        if ended is not None:
            return ended
        time.sleep(poll_s)


def cmd_plan(args: argparse.Namespace) -> int:
    """`sd35dist plan`: memory, communication and step time per GPU; exit 2 when it cannot fit."""
    profile, profile_file, recipe, recipe_file = inputs_from_args(args)
    # What the ranks would fail on; the model directory's layout is submit's (a plan may start from a config.json).
    check_recipe_inputs(recipe, "train", recipe_file.name, visible_everywhere=profile.scheduler == "local")
    report = resource_report.build_report(profile, recipe, profile_file.stem, recipe_file.name)
    sys.stdout.write(resource_report.render_report(report))
    check_fit(profile, recipe, profile_file.name, recipe_file.name)
    resource_report.refuse_if_too_big(report)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    plan, profile, recipe, recipe_file = plan_from_args(args)
    # Only a profile that declares its GPU (hardware:) gets the fit check and the dry-run's plan line.
    report = None
    if profile.hardware.resolved() is not None:
        report = resource_report.build_report(profile, recipe, plan.profile_name, recipe_file.name)
        if args.job == "train":
            resource_report.refuse_if_too_big(report)
    script = render_script(plan)
    if args.dry_run and not args.output:
        if report is not None:
            print(resource_report.summary_line(report), file=sys.stderr)
        sys.stdout.write(script)
        return 0
    run_dir = prepare_run_dir(plan, recipe_yaml(recipe), dump_yaml(profile))
    if args.output:
        try:
            write_text_atomically(args.output, script)
        except OSError as err:
            shutil.rmtree(run_dir, ignore_errors=True)  # the script is its only way in: no orphan
            raise ConfigError("--output", args.output, f"cannot write: {err.strerror or err}") from None
        how = "sbatch" if plan.scheduler == "slurm" else "bash"
        print(f"wrote {args.output}; run directory {run_dir}; submit with: {how} {args.output}")
        return 0
    record = submit(plan, run_dir)
    print(f"submitted job {record['job_id']} ({plan.scheduler}, profile {plan.profile_name}, job {plan.job})")
    print(f"run directory: {run_dir}")
    print(f"logs: {record['stdout']}")
    print(f"      {record['stderr']}")
    if not args.wait:
        print(f"follow with: sd35dist logs {record['job_id']} --follow")
        return 0
    state = _follow(record)
    code = 0 if state == "COMPLETED" else (job_control.exit_code(record) or 1)
    print(f"job {record['job_id']} ended: {state}" + (f" (exit status {code})" if code else ""))
    return code


def cmd_status(args: argparse.Namespace) -> int:
    record = job_control.find_record(args.job)
    print(f"{record['job_id']} {job_control.job_state(record)} {record.get('run_dir', '')}".rstrip())
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    record = job_control.find_record(args.job)
    if args.follow:
        _follow(record)
        return 0
    files = job_control.log_files(record)
    if not files:
        print(f"job {record['job_id']}: no logs yet", file=sys.stderr)
        return 1
    for path in files:
        print(f"==> {path} <==")
        sys.stdout.write(path.read_text(errors="replace"))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    record = job_control.find_record(args.job)
    job_control.cancel(record)
    print(f"cancelled job {record['job_id']}")
    return 0


def main(argv: list[str]) -> int:
    args = argument_parser().parse_args(argv)
    handlers = {"submit": cmd_submit, "plan": cmd_plan, "status": cmd_status, "logs": cmd_logs, "cancel": cmd_cancel}
    handler = handlers[args.command]
    try:
        return handler(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
