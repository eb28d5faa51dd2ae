"""`sd35dist import simpletuner CONFIG [--backend multidatabackend.json] -o recipe.yaml`

Reads SimpleTuner's `config.json` (keys with or without the leading `--`) or its `config.env`
shell form, and the datasets of its `multidatabackend.json`; writes a recipe. Where a value
means something else here it is converted and the YAML says so in a comment above it (the
cosine schedule, adamw_bf16, repeats …). Every option with no place here is listed, one per
line, with the reason, on the terminal and at the end of the YAML. The result is validated
by the recipe schema before anything is written. A file that cannot be read, an unknown
option or a value of the wrong type is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sd35dist.runtime.atomic_files import write_text_atomically
from sd35dist.config.cli_args import CommandLineParser
from sd35dist.config.loading import ConfigError, validate_mapping
from sd35dist.config.recipe import DEFAULT_BUCKETS, Recipe
from sd35dist.importers.simpletuner_options import (BACKEND_MAPPED, BACKEND_UNMAPPED, ENV_ARGUMENT_LISTS, ENV_IGNORED,
                                                    ENV_NAMES, UNMAPPED, OptionError, option_kind, parse_value)

NAME_PATTERN = re.compile(r"[^A-Za-z0-9._-]+")
REFERENCE_SIDE = 1024  # SimpleTuner's area 1.0 and our default buckets are about 1024² pixels
ADAMW_NAMES = ("adamw", "adamw_torch", "optimi-adamw", "adamw-torch")


@dataclass
class Conversion:
    """The recipe being built, the comments it carries, and what found no place."""

    recipe: dict[str, Any] = field(default_factory=dict)
    comments: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    unmapped: list[tuple[str, Any, str]] = field(default_factory=list)
    mapped: int = 0

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


# ---- reading -------------------------------------------------------------------------------


def read_json_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(path.name, "", f"cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(path.name, "", f"not JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(path.name, "", "expected a JSON object of options")
    return {key.removeprefix("--"): value for key, value in data.items()}


def read_env_config(path: Path) -> dict[str, Any]:
    """`export NAME=value` lines (comments and quotes as in a shell); ${NAME} of earlier lines expands."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(path.name, "", f"cannot read: {err}") from None
    variables: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as err:
            raise ConfigError(path.name, f"line {number}", f"not shell syntax ({err})") from None
        if any("$((" in word or "$(" in word for word in words):
            raise ConfigError(path.name, f"line {number}", "shell arithmetic or commands ($(…)) are not run: write the value")
        if words[:1] == ["export"]:
            words = words[1:]
        if not words:
            continue
        if len(words) != 1 or "=" not in words[0]:
            raise ConfigError(path.name, f"line {number}", "expected NAME=value")
        name, value = words[0].split("=", 1)
        variables[name] = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), value)
    options: dict[str, Any] = {}
    for name, value in variables.items():
        if name in ENV_ARGUMENT_LISTS:
            options.update(_argument_list(value, path.name, name))
        elif name in ENV_NAMES:
            options[ENV_NAMES[name]] = value
        elif name in ENV_IGNORED:
            options[f"${name}"] = value
        else:
            raise ConfigError(path.name, name, "not a SimpleTuner config.env variable this importer knows (a typo?)")
    return options


def _argument_list(text: str, source: str, variable: str) -> dict[str, Any]:
    """`--lora_rank=768 --report_to wandb --use_ema` → {"lora_rank": "768", "report_to": "wandb", "use_ema": True}."""
    options: dict[str, Any] = {}
    words = shlex.split(text)
    index = 0
    while index < len(words):
        word = words[index]
        if not word.startswith("--"):
            raise ConfigError(source, variable, f"expected --option[=value], got {word!r}")
        if "=" in word:
            key, value = word[2:].split("=", 1)
        elif index + 1 < len(words) and not words[index + 1].startswith("--"):
            key, value = word[2:], words[index + 1]
            index += 1
        else:
            key, value = word[2:], True
        options[key] = value
        index += 1
    return options


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), "", "no such file")
    return read_env_config(path) if path.suffix == ".env" else read_json_config(path)


def read_backend(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(path.name, "", f"cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(path.name, "", f"not JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, list) or not all(isinstance(entry, dict) for entry in data):
        raise ConfigError(path.name, "", "expected a JSON list of dataset objects")
    return data


# ---- converting ----------------------------------------------------------------------------


def bucket_side(resolution: float, resolution_type: str) -> float:
    """The side of the square with the training area, in pixels."""
    if resolution_type == "area":
        return REFERENCE_SIDE * math.sqrt(resolution)
    return resolution  # pixel_area: the side itself; pixel: the shorter edge, the nearest square


def buckets_for(side: float) -> list[list[int]]:
    """The SD3.5 tutorial's 8 buckets scaled to `side` (multiples of 64, distinct)."""
    scale = side / REFERENCE_SIDE
    scaled: list[list[int]] = []
    for width, height in DEFAULT_BUCKETS:
        bucket = [max(64, round(width * scale / 64) * 64), max(64, round(height * scale / 64) * 64)]
        if bucket not in scaled:
            scaled.append(bucket)
    return scaled


def min_side(value: float, resolution_type: str) -> int:
    """SimpleTuner's minimum_image_size (megapixels for area, pixels otherwise) as a shorter side in pixels."""
    return round(REFERENCE_SIDE * math.sqrt(value)) if resolution_type == "area" and value else int(value)


def convert(options: dict[str, Any], datasets: list[dict[str, Any]] | None, source: str,
            backend_source: str = "multidatabackend.json") -> Conversion:
    """The recipe mapping for `options` (names without `--`) and the backend's entries."""
    values: dict[str, Any] = {}
    out = Conversion()
    for key, raw in options.items():
        if key.startswith("$"):
            out.skip(key[1:], raw, ENV_IGNORED[key[1:]])
            continue
        kind = option_kind(key)
        if kind is None:
            raise ConfigError(source, f"--{key}", "not a SimpleTuner option this importer knows (a typo?)")
        try:
            value = parse_value(kind, raw)
        except OptionError as err:
            raise ConfigError(source, f"--{key}", str(err)) from None
        if key in UNMAPPED:
            out.skip(key, value, UNMAPPED[key][1])
        else:
            values[key] = value
    _model_and_output(values, out, source)
    _training(values, out)
    _schedule(values, out)
    _logging(values, out)
    _validation(values, out, source)
    for key in [k for k in values if k.startswith("lora_")]:  # a full fine-tune has no adapters
        out.skip(key, values.pop(key), "model_type is full: LoRA options have no effect")
    resolution_type = str(values.pop("resolution_type", "pixel_area"))
    side = bucket_side(float(values.pop("resolution", REFERENCE_SIDE)), resolution_type)
    if round(side) != REFERENCE_SIDE:
        out.put(("data", "buckets"), buckets_for(side), f"the tutorial's 8 buckets scaled to about {round(side)}² pixels")
    out.mapped += 2
    minimum = min_side(float(values.pop("minimum_image_size", 0)), resolution_type)
    instance_prompt = values.pop("instance_prompt", None)
    if datasets is not None:
        _datasets(datasets, out, backend_source, minimum, instance_prompt)
    elif instance_prompt is not None:
        out.skip("instance_prompt", instance_prompt, "no backend file read (--backend) to apply it to")
    assert not values, f"options read but not converted: {sorted(values)}"
    return out


def _take(values: dict[str, Any], out: Conversion, key: str, path: tuple[str, ...], comment: str | None = None) -> None:
    if key in values:
        out.put(path, values.pop(key), comment)
        out.mapped += 1


def _model_and_output(values: dict[str, Any], out: Conversion, source: str) -> None:
    family = values.pop("model_family", "sd3")
    if family != "sd3":
        raise ConfigError(source, "--model_family", f"{family}: sd35dist trains SD3/SD3.5 only (model_family sd3)")
    model_type = values.pop("model_type", "full")
    if model_type == "lora":
        _lora(values, out)
    elif model_type != "full":
        raise ConfigError(source, "--model_type", f"{model_type}: expected full or lora")
    out.mapped += 2
    pretrained = str(values.pop("pretrained_model_name_or_path", "stabilityai/stable-diffusion-3.5-large"))
    out.put(("model", "pretrained"), pretrained,
            None if Path(pretrained).is_dir() else "a hub id in SimpleTuner; here a local diffusers directory: "
                                                   "download the model and put its path here")
    out.mapped += 1
    output_dir = str(values.pop("output_dir", "output"))
    run_name = str(values.get("tracker_run_name") or Path(source).stem)
    out.recipe = {"name": NAME_PATTERN.sub("-", run_name).strip("-._") or "simpletuner-import", **out.recipe}
    out.put(("seed",), values.pop("seed", 0))
    out.put(("output", "dir"), output_dir)
    out.put(("data", "cache_url"), f"{output_dir.rstrip('/')}/cache",
            "one latent + text-embedding cache, built by `sd35dist cache` (SimpleTuner's caches are not reused)")
    out.mapped += 2
    if "data_backend_config" in values:
        values.pop("data_backend_config")
        out.mapped += 1


def _training(values: dict[str, Any], out: Conversion) -> None:
    for key in ("train_batch_size", "gradient_accumulation_steps", "learning_rate", "adam_beta1", "adam_beta2",
                "adam_weight_decay", "adam_epsilon", "max_grad_norm", "gradient_checkpointing",
                "caption_dropout_probability", "checkpointing_steps", "checkpoints_total_limit", "weighting_scheme",
                "logit_mean", "logit_std", "mode_scale"):
        _take(values, out, key, ("train", key))
    for key in ("max_train_steps", "num_train_epochs"):
        if key in values:
            value = values.pop(key)
            out.mapped += 1
            if value:
                out.put(("train", key), value)
    _take(values, out, "use_ema", ("train", "ema", "enabled"))
    _take(values, out, "ema_decay", ("train", "ema", "decay"))
    _take(values, out, "ema_update_interval", ("train", "ema", "update_interval"))
    _take(values, out, "vae_batch_size", ("data", "cache_batch_size"), "images per VAE batch while building the cache")
    _take(values, out, "tokenizer_max_length", ("data", "max_sequence_length"))
    if "mixed_precision" in values:
        precision = values.pop("mixed_precision")
        if precision in ("bf16", "no", "fp32"):
            out.put(("train", "mixed_precision"), "bf16" if precision == "bf16" else "fp32")
            out.mapped += 1
        else:
            out.skip("mixed_precision", precision, "only bf16 or fp32 here")
    if "optimizer" in values:
        optimizer = values.pop("optimizer")
        if optimizer == "adamw_bf16":
            out.put(("train", "optimizer"), "adamw_bf16",
                    "SimpleTuner's adamw_bf16 rounds bf16 updates stochastically; here bf16 weights take "
                    "Kahan-compensated updates: same intent (no update lost to rounding), not the same bits")
            out.mapped += 1
        elif optimizer in ADAMW_NAMES:
            out.put(("train", "optimizer"), "adamw", f"SimpleTuner {optimizer}: AdamW with fp32 master weights here")
            out.mapped += 1
        else:
            out.skip("optimizer", optimizer, "no such optimizer here (adamw or adamw_bf16); the recipe keeps adamw")
    resume = values.pop("resume_from_checkpoint", None)
    if resume is not None:
        if resume in ("latest", "none"):
            out.put(("train", "resume"), resume)
            out.mapped += 1
        else:
            out.skip("resume_from_checkpoint", resume, "SimpleTuner checkpoints do not resume here; "
                                                         "train.resume latest continues sd35dist's own")


def _schedule(values: dict[str, Any], out: Conversion) -> None:
    had_warmup = "lr_warmup_steps" in values
    warmup = int(values.pop("lr_warmup_steps", 0))
    scheduler = values.pop("lr_scheduler", None)
    lr_end, lr_power = values.pop("lr_end", None), values.pop("lr_power", None)
    for key, value, default in (("lr_end", lr_end, 1e-7), ("lr_power", lr_power, 1.0)):
        if value is not None and value != default:
            out.skip(key, value, f"the polynomial schedule here ends at lr 1e-7 with power 1.0 (not {value})")
        elif value is not None:
            out.mapped += 1
    if scheduler is None:
        if had_warmup:
            out.put(("train", "lr_warmup_steps"), warmup)
            out.mapped += 1
        return
    out.mapped += 2
    if scheduler == "cosine":
        out.put(("train", "lr_scheduler"), "cosine",
                f"SimpleTuner's cosine restarts every lr_warmup_steps × GPUs ({warmup} × GPUs) steps, without warmup; "
                "here cosine is one decay to 0 over the run, after a linear warmup of lr_warmup_steps")
        out.put(("train", "lr_warmup_steps"), warmup)
    elif scheduler == "constant":
        out.put(("train", "lr_scheduler"), "constant")
        out.put(("train", "lr_warmup_steps"), 0,
                f"SimpleTuner's constant ignores lr_warmup_steps ({warmup}); here constant would warm up over it"
                if warmup else None)
    elif scheduler == "constant_with_warmup":
        out.put(("train", "lr_scheduler"), "constant", "constant_with_warmup: constant warms up over lr_warmup_steps here")
        out.put(("train", "lr_warmup_steps"), warmup)
    elif scheduler in ("linear", "polynomial"):
        out.put(("train", "lr_scheduler"), scheduler)
        out.put(("train", "lr_warmup_steps"), warmup)
    else:
        out.mapped -= 2
        out.skip("lr_scheduler", scheduler, "no such schedule here (constant, linear, cosine, polynomial); "
                                            "the recipe keeps constant")
        out.skip("lr_warmup_steps", warmup, f"belongs to the {scheduler} schedule")


def _lora(values: dict[str, Any], out: Conversion) -> None:
    given = sum(key in values for key in ("lora_type", "lora_rank", "lora_alpha"))
    lora_type = values.pop("lora_type", "standard")
    if lora_type != "standard":
        out.skip("lora_type", lora_type, "only standard (peft) LoRA here: the recipe trains one")
        given -= 1
    rank = int(values.pop("lora_rank", 16))
    out.put(("train", "lora", "rank"), rank)
    had_alpha = "lora_alpha" in values
    alpha = float(values.pop("lora_alpha", rank))
    out.put(("train", "lora", "alpha"), alpha, None if had_alpha else
            "SimpleTuner's lora_alpha defaults to lora_rank (a scale of 1); here the default would be 16")
    out.put(("train", "lora", "targets"), "attention",
            "SimpleTuner's SD3 default adapts the attention projections; here `attention` covers both streams'")
    _take(values, out, "lora_dropout", ("train", "lora", "dropout"))
    init = values.pop("lora_init_type", None)
    if init in ("default", "gaussian"):
        out.put(("train", "lora", "init"), init)
        out.mapped += 1
    elif init is not None:
        out.skip("lora_init_type", init, "only peft's default or gaussian init here (train.lora.init)")
    out.mapped += given


def _validation(values: dict[str, Any], out: Conversion, source: str) -> None:
    keys = [k for k in values if k.startswith("validation_")]
    if "validation_prompt" not in values:
        for key in keys:
            out.skip(key, values.pop(key), "no validation_prompt: nothing to render")
        return
    out.put(("validation", "prompts"), [values.pop("validation_prompt")],
            "encoded by `sd35dist cache` with the dataset: run it (or cache --validation-only) after editing")
    for key, name in (("validation_negative_prompt", "negative_prompt"), ("validation_steps", "every_n_steps"),
                      ("validation_guidance", "guidance_scale"), ("validation_num_inference_steps", "num_inference_steps")):
        if key in values:
            out.put(("validation", name), values.pop(key))
    if "validation_seed" in values:
        out.put(("validation", "seeds"), [values.pop("validation_seed")])
    if "validation_resolution" in values:
        raw = str(values.pop("validation_resolution"))
        try:
            sizes = [[int(x) for x in (part.split("x") if "x" in part else (part, part))]
                     for part in raw.replace(" ", "").split(",") if part]
        except ValueError:
            raise ConfigError(source, "--validation_resolution", f"{raw}: expected 1024, 1024x768 or a comma list") from None
        out.put(("validation", "resolutions"), sizes)
    out.mapped += len(keys)


def _logging(values: dict[str, Any], out: Conversion) -> None:
    if "report_to" in values:
        tracker = values.pop("report_to")
        if tracker in ("wandb", "none"):
            out.put(("logging", "report_to"), tracker,
                    "wandb runs offline by default here: set logging.wandb_mode online to upload"
                    if tracker == "wandb" else None)
            out.mapped += 1
        else:
            out.skip("report_to", tracker, "only wandb (or none) here")
    _take(values, out, "tracker_project_name", ("logging", "tracker_project_name"))
    _take(values, out, "tracker_run_name", ("logging", "tracker_run_name"))


def _datasets(entries: list[dict[str, Any]], out: Conversion, source: str, minimum: int, instance_prompt: Any) -> None:
    datasets = []
    for number, entry in enumerate(entries):
        where = f"[{number}]"
        unknown = sorted(set(entry) - BACKEND_MAPPED - set(BACKEND_UNMAPPED))
        if unknown:
            raise ConfigError(source, f"{where}.{unknown[0]}", "not a dataset key this importer knows (a typo?)")
        label = f"{source}{where} ({entry.get('id', '?')})"
        for key in sorted(set(entry) & set(BACKEND_UNMAPPED)):
            out.skip(f"{label}.{key}", entry[key], BACKEND_UNMAPPED[key])
        kind = entry.get("dataset_type", "image")
        if entry.get("disabled") in (True, "true"):
            out.skip(label, "disabled", "a disabled dataset is left out")
        elif kind != "image":
            if kind != "text_embeds":
                out.skip(label, kind, f"dataset_type {kind} is not trained from here (images only)")
        else:
            dataset = _dataset(entry, out, label, len(datasets), minimum, instance_prompt)
            if dataset is not None:
                datasets.append(dataset)
    out.put(("data", "datasets"), datasets)
    if instance_prompt is not None and not any(d["caption_strategy"] == "instance_prompt" for d in datasets):
        out.skip("instance_prompt", instance_prompt, "used only by datasets with caption_strategy instance_prompt "
                                                     "here; textfile captions are used as written")


def _dataset(entry: dict[str, Any], out: Conversion, label: str, index: int, minimum: int,
             instance_prompt: Any) -> dict[str, Any] | None:
    path = ("data", "datasets", str(index))
    try:
        repeats = parse_value("int", entry.get("repeats", 0))
        crop = parse_value("bool", entry.get("crop", True))
        resolution = parse_value("float", entry.get("resolution", REFERENCE_SIDE))
    except OptionError as err:
        raise ConfigError(label.split(" (")[0], "repeats/crop/resolution", str(err)) from None
    strategy = "instance_prompt" if entry.get("only_instance_prompt") in (True, "true") else entry.get("caption_strategy", "filename")
    if strategy not in ("textfile", "filename", "instance_prompt"):
        out.skip(label, strategy, f"caption_strategy {strategy} is not read here (textfile, filename, instance_prompt)")
        return None
    if entry.get("type", "local") == "local":
        source = str(entry.get("instance_data_dir", ""))
    elif entry.get("type") == "aws":
        source = f"s3://{entry.get('aws_bucket_name', '')}/{str(entry.get('aws_data_prefix', '')).lstrip('/')}"
        if entry.get("aws_endpoint_url"):
            out.put(("data", "storage_options", "endpoint_url"), entry["aws_endpoint_url"])
        if entry.get("aws_region_name"):
            out.put(("data", "storage_options", "client_kwargs"), {"region_name": entry["aws_region_name"]})
    else:
        out.skip(label, entry.get("type"), f"backend type {entry.get('type')} is not read here (local or aws)")
        return None
    dataset_id = NAME_PATTERN.sub("-", str(entry.get("id", f"dataset-{index}"))).strip("-._") or f"dataset-{index}"
    dataset: dict[str, Any] = {"id": dataset_id, "source": source, "caption_strategy": strategy}
    prompt = entry.get("instance_prompt", instance_prompt)
    if strategy == "instance_prompt":
        dataset["instance_prompt"] = prompt
    elif "instance_prompt" in entry:
        out.skip(f"{label}.instance_prompt", prompt, "used only by caption_strategy instance_prompt here")
    dataset["repeats"] = repeats + 1
    out.note(path + ("repeats",), f"SimpleTuner repeats {repeats} means seen {repeats + 1}× per epoch; here repeats counts "
                                  "appearances")
    dataset["crop"] = crop
    if entry.get("crop_style", "center") != "center":
        out.skip(f"{label}.crop_style", entry["crop_style"], "crops are centered here")
    resolution_type = str(entry.get("resolution_type", "pixel_area"))
    if round(bucket_side(resolution, resolution_type)) != round(_buckets_side(out)):
        out.skip(f"{label}.resolution", resolution, "one bucket list (data.buckets) serves every dataset here")
    if "minimum_image_size" in entry:
        dataset["minimum_image_size"] = min_side(parse_value("float", entry["minimum_image_size"]), resolution_type)
        out.note(path + ("minimum_image_size",), "shorter side in pixels here (SimpleTuner: "
                                                 f"{entry['minimum_image_size']} as {resolution_type})")
    elif minimum:
        dataset["minimum_image_size"] = minimum
    out.mapped += 1
    return dataset


def _buckets_side(out: Conversion) -> float:
    buckets = out.recipe.get("data", {}).get("buckets")
    return math.sqrt(buckets[0][0] * buckets[0][1]) if buckets else REFERENCE_SIDE


# ---- writing -------------------------------------------------------------------------------


class _RecipeDumper(yaml.SafeDumper):
    """Block style, so every key has a line a comment can sit above; lists of scalars ([w, h]) inline."""

    def represent_list(self, data: list) -> yaml.Node:
        flow = all(not isinstance(item, (dict, list)) for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _RecipeDumper.represent_list)


def render_yaml(out: Conversion, header: str) -> str:
    """The recipe as YAML, each comment on its own line above the key it is about."""
    order = list(Recipe.model_fields)
    recipe = dict(sorted(out.recipe.items(), key=lambda item: order.index(item[0])))
    text = yaml.dump(recipe, Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True, width=120)
    lines = [f"# {line}" for line in header.splitlines()]
    stack: list[tuple[int, str]] = []
    counters: dict[tuple[str, ...], int] = {}
    for line in text.splitlines():
        match = re.match(r"^( *)(- )?([^\s:#][^:]*):(?: |$)", line)
        if match:
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent + (2 if match.group(2) else 0):
                stack.pop()
            if match.group(2):  # a new list item: its index joins the path
                parent = tuple(key for _, key in stack)
                index = counters.get(parent, 0)
                counters[parent] = index + 1
                stack.append((indent, str(index)))
                indent += 2
            stack.append((indent, match.group(3)))
            for comment in out.comments.get(tuple(key for _, key in stack), []):
                lines.append(f"{' ' * indent}# {comment}")
        lines.append(line)
    if out.unmapped:
        lines.append("")
        lines.append("# Not mapped from SimpleTuner (option = value: why):")
        lines += [f"#   {key} = {json.dumps(value)}: {why}" for key, value, why in out.unmapped]
    return "\n".join(lines) + "\n"


def argument_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="sd35dist import simpletuner", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("config", type=Path, help="SimpleTuner's config.json or config.env")
    parser.add_argument("--backend", type=Path, help="its multidatabackend.json (default: the config's data_backend_config)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the recipe YAML to write")
    return parser


def main(argv: list[str]) -> int:
    args = argument_parser().parse_args(argv)
    try:
        options = read_config(args.config)
        backend = args.backend or _backend_from(options, args.config)
        datasets = read_backend(backend) if backend is not None else None
        conversion = convert(options, datasets, args.config.name, backend.name if backend else "")
        validate_mapping(Recipe, conversion.recipe, args.out.name)
        if args.out.exists():
            raise ConfigError(str(args.out), "", "exists already: choose another -o or remove it")
        sources = args.config.name + (f" and {backend.name}" if backend else "")
        header = (f"Imported from SimpleTuner's {sources} by `sd35dist import simpletuner`.\n"
                  "Comments mark values converted because they mean something else here.")
        write_text_atomically(args.out, render_yaml(conversion, header))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {conversion.mapped} options mapped, {len(conversion.unmapped)} not mapped"
          + ("" if datasets is not None else " (no multidatabackend.json read: no datasets; pass --backend)"))
    for key, value, why in conversion.unmapped:
        print(f"not mapped: {key} = {json.dumps(value)}: {why}")
    return 0


def _backend_from(options: dict[str, Any], config: Path) -> Path | None:
    """The config's data_backend_config, looked for as given, beside the config, and one folder up."""
    named = options.get("data_backend_config")
    if not isinstance(named, str) or not named:
        return None
    for candidate in (Path(named), config.parent / named, config.parent.parent / named, config.parent / Path(named).name):
        if candidate.is_file():
            return candidate
    return None
