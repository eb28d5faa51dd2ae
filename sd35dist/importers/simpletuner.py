"""`sd35dist import simpletuner CONFIG [--backend multidatabackend.json] -o recipe.yaml [--allow-unknown]`

Reads SimpleTuner's `config.json` or `config.env` and the datasets of its
`multidatabackend.json`, and writes a recipe that trains what SimpleTuner would: its defaults
for every option the config leaves out are written into the recipe (commented), and a value
that means something else here is converted, with the meaning as a comment above it. Every
option with no place here is listed, one per line, with the reason, on the terminal and at the
end of the YAML. The option table (simpletuner_options.py, simpletuner_unapplied.py) is derived
from SimpleTuner's own source; docs/simpletuner.md shows it.

The recipe is validated before anything is written. An unreadable file, an unknown option (all
of them named), a family other than SD3, ControlNet, a value of the wrong type, or a credential
is one line and exit status 2; no credential reaches the recipe or the terminal.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35dist.config.cli_args import CommandLineParser
from sd35dist.config.credentials import first_credential
from sd35dist.config.loading import ConfigError, validate_mapping
from sd35dist.config.recipe import Recipe
from sd35dist.importers import simpletuner_formats as formats
from sd35dist.importers.simpletuner_datasets import (
    DatasetDefaults,
    bucket_side,
    buckets_for,
    checked_side,
    convert_datasets,
    holds_credential,
)
from sd35dist.importers.simpletuner_options import (
    DROPPED_BY_SIMPLETUNER,
    MAPPED,
    NEGATED_RENAMES,
    RENAMED,
    RETIRED,
    SAME_HERE,
    SIMPLETUNER_COMMIT,
    OptionError,
    parse_value,
)
from sd35dist.importers.simpletuner_reading import (
    EnvConfig,
    find_beside,
    read_backend,
    read_config,
)
from sd35dist.importers.simpletuner_settings import convert_settings
from sd35dist.importers.simpletuner_unapplied import NOT_APPLIED
from sd35dist.runtime.atomic_files import write_bytes_atomically, write_text_atomically

HIDDEN = "(a credential: not shown, not written)"


@dataclass
class Conversion:
    """The recipe being built, the comments it carries, and what found no place."""

    recipe: dict[str, Any] = field(default_factory=dict)
    comments: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    unmapped: list[tuple[str, Any, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Lines for the terminal that are not about one option (no dataset imported, legacy variables …)."""
    mapped: int = 0
    csv_lists: dict[int, tuple[str, str, str, str]] = field(default_factory=dict)
    """Dataset index → (csv_file, url column, caption column, where): CSV lists main() writes as parquet."""

    def put(self, path: tuple[str, ...], value: Any, comment: str | None = None) -> None:
        node = self.recipe
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        if comment:
            self.comments.setdefault(path, []).append(comment)

    def note(self, path: tuple[str, ...], comment: str) -> None:
        self.comments.setdefault(path, []).append(comment)

    def skip(self, key: str, value: Any, why: str) -> None:
        self.unmapped.append((key, value, why))


def classify(options: dict[str, Any], source: str, allow_unknown: bool, out: Conversion) -> dict[str, Any]:
    """Mapped options' values (typed, SimpleTuner's current names); everything else listed or refused."""
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for raw_key, raw in options.items():
        key = RENAMED.get(raw_key, raw_key)
        if raw_key in NEGATED_RENAMES:
            raw = not parse_value("bool", raw)
        secret = holds_credential(key, raw)
        if raw_key in DROPPED_BY_SIMPLETUNER:
            out.skip(raw_key, raw, DROPPED_BY_SIMPLETUNER[raw_key])
        elif key in MAPPED:
            if secret:
                raise ConfigError(source, f"--{raw_key}", "holds a credential (a user:password@ URL or a secret "
                                                          "value): credentials come from the environment here")
            try:
                values[key] = parse_value(MAPPED[key].kind, raw)
            except OptionError as err:
                raise ConfigError(source, f"--{raw_key}", str(err)) from None
        elif key in SAME_HERE:
            value = raw if isinstance(raw, (bool, type(None))) else _loose(raw)
            if value in SAME_HERE[key]:
                out.mapped += 1
            elif key in ("controlnet", "control") and parse_value("bool", raw):
                raise ConfigError(source, f"--{key}", "true: ControlNet training is not offered by sd35dist "
                                                      "(import a config without it)")
            else:
                out.skip(key, HIDDEN if secret else raw, NOT_APPLIED[key])
        elif key in NOT_APPLIED or key in RETIRED:
            if not switched_off(raw):  # an unapplied feature left off asks for nothing
                out.skip(key, HIDDEN if secret else raw, NOT_APPLIED.get(key) or RETIRED[key])
        else:
            unknown.append(raw_key)
    if unknown and not allow_unknown:
        raise ConfigError(source, ", ".join(f"--{k}" for k in unknown),
                          f"not {'options' if len(unknown) > 1 else 'an option'} of SimpleTuner's parser "
                          f"(at {SIMPLETUNER_COMMIT[:12]}): a typo? (--allow-unknown imports anyway, listing them)")
    for key in unknown:
        out.skip(key, HIDDEN if holds_credential(key, options[key]) else options[key],
                 f"unknown to SimpleTuner's parser at {SIMPLETUNER_COMMIT[:12]}: ignored (--allow-unknown)")
    return values


def switched_off(value: Any) -> bool:
    """null, false, 0, "" (and their strings), an empty list: the option's feature is off or unset."""
    if isinstance(value, str):
        return value.strip().lower() in ("", "false", "no", "off", "none", "null", "0", "0.0")
    return value is None or value is False or value == [] or value == {} or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


def _loose(value: Any) -> Any:
    """A SAME_HERE value as the tables spell it: "false"/"true" as booleans, numbers as numbers."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        try:
            return float(lowered)
        except ValueError:
            return value
    return value


def convert(options: dict[str, Any], entries: list[dict[str, Any]] | None, source: str,
            backend_source: str = "multidatabackend.json", *, config_path: Path | None = None,
            allow_unknown: bool = False) -> Conversion:
    """The recipe mapping for `options` (SimpleTuner's names, without `--`) and the backend's entries."""
    out = Conversion()
    values = classify(options, source, allow_unknown, out)
    out.mapped += len(values)
    settings = convert_settings(values, out, source, config_path)
    side = checked_side(bucket_side(settings.resolution, settings.resolution_type), source, "--resolution",
                        settings.resolution, settings.resolution_type)
    buckets = buckets_for(side)
    if entries is None:
        out.put(("data", "datasets"), [])
        out.notes.append("no multidatabackend.json read (pass --backend): the recipe has no datasets yet")
    else:
        defaults = DatasetDefaults(settings.caption_strategy, settings.instance_prompt, settings.only_instance_prompt,
                                   settings.minimum_image_size, settings.resolution, settings.resolution_type)
        outcome = convert_datasets(entries, defaults, side, backend_source)
        out.put(("data", "datasets"), outcome.datasets)
        out.comments.update(outcome.comments)
        out.unmapped += outcome.skipped
        out.csv_lists = outcome.csv_lists
        if outcome.storage_options:
            out.put(("data", "storage_options"), outcome.storage_options)
        if outcome.square:
            square = round(side / 64) * 64
            buckets = [[square, square]]
            out.note(("data", "buckets"), "every dataset crops to a square (crop true, crop_aspect square, SimpleTuner's "
                                          "default): one square bucket")
        if not outcome.datasets:
            out.notes.append(f"no dataset of {backend_source} could be imported (see the lines above): add "
                             "data.datasets before `sd35dist cache` or training")
    out.put(("data", "buckets"), buckets,
            f"SimpleTuner's resolution {settings.resolution:g} ({settings.resolution_type}): about {round(side)}² pixels")
    found = first_credential(out.recipe)
    if found is not None:  # a credential in a mapped value that no check above caught: never write it
        raise ConfigError(source, found.path, found.reason)
    return out


# ---- writing -------------------------------------------------------------------------------


def render_yaml(out: Conversion, header: str) -> str:
    """The recipe as YAML, each comment on its own line above the key it is about."""
    import yaml

    class Dumper(yaml.SafeDumper):
        """Block style, so every key has a line a comment can sit above; lists of scalars ([w, h]) inline."""

    def represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
        flow = all(not isinstance(item, (dict, list)) for item in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, represent_list)
    order = list(Recipe.model_fields)
    recipe = dict(sorted(out.recipe.items(), key=lambda item: order.index(item[0])))
    text = yaml.dump(recipe, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120)
    lines = [f"# {line}" for line in header.splitlines()]
    stack: list[tuple[int, str]] = []
    counters: dict[tuple[str, ...], int] = {}
    for line in text.splitlines():
        match = re.match(r"^( *)(- )?([^\s:#][^:]*):(?: |$)", line)
        if match:
            indent = len(match.group(1))
            # A list item's index sits between its list's key and its own keys (PyYAML indents items like the key).
            while stack and stack[-1][0] >= indent + (1 if match.group(2) else 0):
                stack.pop()
            if match.group(2):  # a new list item: its index joins the path
                parent = tuple(key for _, key in stack)
                index = counters.get(parent, 0)
                counters[parent] = index + 1
                stack.append((indent + 1, str(index)))
                indent += 2
            stack.append((indent, match.group(3)))
            for comment in out.comments.get(tuple(key for _, key in stack), []):
                lines.append(f"{' ' * indent}# {comment}")
        lines.append(line)
    if out.unmapped:
        lines += ["", "# Not applied from SimpleTuner (option = value: why):"]
        lines += [f"#   {key} = {shown(value)}: {why}" for key, value, why in out.unmapped]
    return "\n".join(lines) + "\n"


def shown(value: Any) -> str:
    return value if value == HIDDEN else json.dumps(value, ensure_ascii=False)


def argument_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="sd35dist import simpletuner", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("config", type=Path, help="SimpleTuner's config.json or config.env")
    parser.add_argument("--backend", type=Path, help="its multidatabackend.json (default: the config's data_backend_config)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the recipe YAML to write")
    parser.add_argument("--allow-unknown", action="store_true",
                        help="import options SimpleTuner's parser does not know (typos?) by listing them, not refusing")
    return parser


def main(argv: list[str]) -> int:
    args = argument_parser().parse_args(argv)
    try:
        if args.out.exists():
            raise ConfigError(str(args.out), "", "exists already: choose another -o or remove it")
        if not args.out.parent.is_dir():
            raise ConfigError(str(args.out), "", f"its directory {args.out.parent} does not exist: create it first")
        options, env = read_config(args.config)
        backend = args.backend or _backend_from(options, args.config)
        if args.backend is not None and not args.backend.is_file():
            raise ConfigError(str(args.backend), "", "no such file")
        entries = read_backend(backend) if backend is not None else None
        conversion = convert(options, entries, args.config.name, backend.name if backend else "",
                             config_path=args.config, allow_unknown=args.allow_unknown)
        _env_notes(env, conversion)
        tables = {}
        for index, (csv_file, url_column, caption_column, where) in conversion.csv_lists.items():
            dataset = conversion.recipe["data"]["datasets"][index]
            target = args.out.parent.resolve() / f"{args.out.stem}.{dataset['id']}.parquet"
            if target.exists():
                raise ConfigError(str(target), "", "exists already: choose another -o or remove it")
            dataset["source"] = str(target)
            tables[target] = formats.csv_parquet(csv_file, url_column, caption_column, where)
        validate_mapping(Recipe, conversion.recipe, args.out.name)
        sources = args.config.name + (f" and {backend.name}" if backend else "")
        header = (f"Imported from SimpleTuner's {sources} by `sd35dist import simpletuner` (option table of SimpleTuner "
                  f"{SIMPLETUNER_COMMIT[:12]}).\nSimpleTuner's defaults are written out; comments mark values whose "
                  "meaning was converted.")
        for target, blob in tables.items():
            write_bytes_atomically(target, blob)
        write_text_atomically(args.out, render_yaml(conversion, header))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {conversion.mapped} options applied, {len(conversion.unmapped)} not applied")
    for key, value, why in conversion.unmapped:
        print(f"not applied: {key} = {shown(value)}: {why}")
    for line in conversion.notes:
        print(f"note: {line}")
    return 0


def _env_notes(env: EnvConfig | None, out: Conversion) -> None:
    if env is None:
        return
    for name in env.legacy:
        out.notes.append(f"{name}: an older train.sh variable today's SimpleTuner ignores; read as it meant then")
    for name, why in env.unread.items():
        out.skip(f"${name}", "…", why)


def _backend_from(options: dict[str, Any], config: Path) -> Path | None:
    named = options.get("data_backend_config")
    if not isinstance(named, str) or not named:
        return None
    found = find_beside(named, config)
    if found is None:
        raise ConfigError(config.name, "--data_backend_config", f"{named} not found as given, beside the config or one "
                                                                 "folder up: pass --backend FILE")
    return found
