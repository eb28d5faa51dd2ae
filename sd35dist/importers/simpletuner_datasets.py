"""multidatabackend.json entries → `data.datasets[]`, with SimpleTuner's defaults for what an
entry leaves out (crop false, crop_style random, repeats 0, the config's caption_strategy,
instance_prompt and minimum_image_size), and its bucket geometry (`resolution`,
`resolution_type`) turned into the recipe's bucket list.

A parquet caption table, a CSV list of URLs and a Hugging Face dataset (its split's parquet files,
hf://datasets/…) become parquet datasets (simpletuner_formats.py); a dataset of a kind sd35dist
cannot read yet (webshart …) is listed with why and left out; the importer says so when none is left.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from sd35dist.config.credentials import first_credential, looks_secret
from sd35dist.config.loading import ConfigError
from sd35dist.config.recipe import DEFAULT_BUCKETS
from sd35dist.importers import simpletuner_formats as formats
from sd35dist.importers.simpletuner_options import OptionError, parse_value
from sd35dist.importers.simpletuner_unapplied import (
    DATASET_MAPPED,
    DATASET_NOT_APPLIED,
    DATASET_NOT_APPLIED_DEFAULTS,
    DATASET_SOURCE_REASON,
)

NAME_PATTERN = re.compile(r"[^A-Za-z0-9._-]+")
REFERENCE_SIDE = 1024
"""SimpleTuner's area 1.0 and our default buckets are about 1024² pixels."""
MAX_SIDE = 3072
"""SD3.5's position embedding covers 192 patches × 2 × 8 = 3072 pixels a side."""
MIN_SIDE = 64
CAPTION_STRATEGIES = {"textfile": "textfile", "filename": "filename", "instanceprompt": "instance_prompt",
                      "instance_prompt": "instance_prompt", "parquet": "textfile", "csv": "textfile"}
"""SimpleTuner's caption strategies this recipe reads (its data code spells instanceprompt, its UI instance_prompt)."""
CROP_STYLES = {"center": "center", "centre": "center", "random": "random", "corner": "corner", "face": "random"}
READABLE_TYPES = ("local", "aws", "csv", "huggingface")
HF_CAPTION_STRATEGIES = ("huggingface", "instanceprompt")
"""What SimpleTuner accepts for a huggingface dataset (it refuses the others); huggingface is its default there."""


# A password in a URL even where the secret holds "/" (unencoded, as AWS secrets often are), and AWS key ids.
_URL_PASSWORD = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s@]*:[^\s@]*@")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


def holds_credential(key: str, value: Any) -> bool:
    """The project's credential rule (config/credentials.py), plus what SimpleTuner files hold in the wild:
    an unencoded secret in a URL's user-info and bare AWS access key ids."""
    if first_credential({key: value}) is not None:
        return True
    texts = [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return any(_URL_PASSWORD.search(t) or _AWS_KEY_ID.search(t) for t in texts)


def bucket_side(resolution: float, resolution_type: str) -> float:
    """The side of the square with SimpleTuner's training area, in pixels."""
    if resolution_type == "area":
        return REFERENCE_SIDE * math.sqrt(resolution)  # megapixels (1.0 ≈ 1024²)
    return resolution  # pixel_area: the square's side; pixel: the shorter edge, taken as the square's side


def buckets_for(side: float) -> list[list[int]]:
    """The SD3.5 tutorial's 8 buckets scaled to `side` (multiples of 64, distinct)."""
    scale = side / REFERENCE_SIDE
    scaled: list[list[int]] = []
    for width, height in DEFAULT_BUCKETS:
        bucket = [max(64, round(width * scale / 64) * 64), max(64, round(height * scale / 64) * 64)]
        if bucket not in scaled:
            scaled.append(bucket)
    return scaled


def checked_side(side: float, source: str, key: str, resolution: Any, resolution_type: str) -> float:
    """`side` when buckets around it are trainable, else one line naming the key."""
    widest = max(w for w, _ in DEFAULT_BUCKETS) * side / REFERENCE_SIDE
    if not math.isfinite(side) or side < MIN_SIDE or widest > MAX_SIDE:
        hint = " (resolution_type area takes megapixels: 1.0 ≈ 1024²)" if resolution_type == "area" else ""
        shown = f"{resolution:g}" if isinstance(resolution, (int, float)) else resolution
        raise ConfigError(source, key, f"{shown} as {resolution_type} gives {round(widest)}-pixel-wide buckets: "
                                       f"SD3.5 trains {MIN_SIDE}–{MAX_SIDE} pixels a side{hint}")
    return side


def min_side(value: float, resolution_type: str) -> int:
    """SimpleTuner's minimum_image_size (megapixels for area, and for pixel_area values ≤ 10) as a shorter side."""
    if resolution_type == "area" or (resolution_type == "pixel_area" and value <= 10):
        return round(REFERENCE_SIDE * math.sqrt(value))
    return int(value)


@dataclass
class DatasetDefaults:
    """What the config says for every dataset that does not say it itself."""

    caption_strategy: str
    instance_prompt: str | None
    only_instance_prompt: bool
    minimum_image_size: float | None
    resolution: float
    resolution_type: str


@dataclass
class DatasetOutcome:
    datasets: list[dict[str, Any]]
    comments: dict[tuple[str, ...], list[str]]
    skipped: list[tuple[str, Any, str]]
    storage_options: dict[str, Any]
    square: bool
    """Every dataset crops to a square (crop with crop_aspect square): one square bucket serves them."""
    csv_lists: dict[int, tuple[str, str, str, str]] = field(default_factory=dict)
    """Dataset index → (csv_file, url column, caption column, where): CSV lists the importer writes as parquet."""


def convert_datasets(entries: list[dict[str, Any]], defaults: DatasetDefaults, side: float, source: str) -> DatasetOutcome:
    out = DatasetOutcome([], {}, [], {}, square=True)
    for number, entry in enumerate(entries):
        where = f"[{number}]"
        unknown = sorted(set(entry) - set(DATASET_MAPPED) - set(DATASET_NOT_APPLIED))
        if unknown:
            raise ConfigError(source, f"{where}.{unknown[0]}" if len(unknown) == 1 else where,
                              f"not dataset key{'s' if len(unknown) > 1 else ''} SimpleTuner reads: "
                              f"{', '.join(unknown)} (a typo?)")
        label = f"{source}{where} ({entry.get('id', '?')})"
        unreadable = str(entry.get("type", "local")) not in READABLE_TYPES  # its own line says why
        for key in sorted(set(entry) & set(DATASET_NOT_APPLIED)):
            value = entry[key]
            if value in (None, "") or value in DATASET_NOT_APPLIED_DEFAULTS.get(key, ()):
                continue
            if unreadable and DATASET_NOT_APPLIED[key] == DATASET_SOURCE_REASON:
                continue
            hidden = looks_secret(key) or holds_credential(key, value)
            out.skipped.append((f"{label}.{key}", "(a credential: not shown, not written)" if hidden else value,
                                DATASET_NOT_APPLIED[key] + ("; export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and list "
                                                            "them in the profile's env.passthrough" if hidden else "")))
        kind = str(entry.get("dataset_type", "image"))
        if entry.get("disabled", entry.get("disable")) in (True, "true", 1):
            out.skipped.append((label, "disabled", "a disabled dataset is left out"))
        elif kind in ("text_embeds", "image_embeds"):
            continue  # SimpleTuner's caches; their keys were listed above when they matter
        elif kind != "image":
            out.skipped.append((label, kind, f"dataset_type {kind} is not trained from here (images only)"))
        else:
            dataset = _dataset(entry, out, label, len(out.datasets), defaults, side, source + where)
            if dataset is not None:
                out.datasets.append(dataset)
    out.square = out.square and bool(out.datasets)
    return out


def _number(entry: dict[str, Any], key: str, kind: str, default: Any, where: str) -> Any:
    try:
        value = parse_value(kind, entry.get(key, default))
    except OptionError as err:
        raise ConfigError(where, key, str(err)) from None
    if kind != "bool" and value < 0:
        raise ConfigError(where, key, f"{value:g} is negative")
    return value


def _dataset(entry: dict[str, Any], out: DatasetOutcome, label: str, index: int, defaults: DatasetDefaults,
             side: float, where: str) -> dict[str, Any] | None:
    path = ("data", "datasets", str(index))
    note = out.comments.setdefault
    backend_type = str(entry.get("type", "local"))
    if backend_type not in READABLE_TYPES:
        name = entry.get("dataset_name") or entry.get("csv_file") or entry.get("source") or ""
        hint = {"csv": f"a CSV list of image URLs ({name}): download the images into a folder (or S3) first"
                }.get(backend_type, "put the images in a folder or S3 bucket")
        out.skipped.append((label, backend_type, f"type {backend_type} cannot be read here yet: {hint}"))
        return None
    only = parse_value("bool", entry.get("only_instance_prompt", defaults.only_instance_prompt))
    hub = backend_type == "huggingface"
    # A huggingface dataset's strategy comes from its own entry (default huggingface), never the config's.
    raw_strategy = "instanceprompt" if only else str(entry.get("caption_strategy") or
                                                     ("huggingface" if hub else defaults.caption_strategy))
    if hub and raw_strategy not in HF_CAPTION_STRATEGIES:
        raise ConfigError(where, "caption_strategy", f"{raw_strategy}: SimpleTuner reads a huggingface dataset's "
                                                     "captions with huggingface (its caption column) or instanceprompt")
    strategy = "textfile" if hub and raw_strategy == "huggingface" else CAPTION_STRATEGIES.get(raw_strategy)
    if strategy is None:
        out.skipped.append((label, raw_strategy, f"caption_strategy {raw_strategy} is not read here "
                                                 "(textfile, filename, instanceprompt)"))
        return None
    weight = formats.probability(entry, where)
    if weight is None:
        out.skipped.append((label, "probability 0", "SimpleTuner never draws a dataset of probability 0: it is left out"))
        return None
    bucket_root = ""
    if backend_type in ("csv", "huggingface"):
        source = ""  # csv: the parquet file written from the list; huggingface: its hf:// URL
    elif backend_type == "local":
        source = str(entry.get("instance_data_dir") or "")
        if not source:
            raise ConfigError(where, "instance_data_dir", "missing: a local dataset needs its folder")
    else:
        bucket_root = f"s3://{entry.get('aws_bucket_name') or ''}"
        source = f"{bucket_root}/{str(entry.get('aws_data_prefix') or '').lstrip('/')}"
        if entry.get("aws_endpoint_url"):
            out.storage_options["endpoint_url"] = entry["aws_endpoint_url"]
        if entry.get("aws_region_name"):
            out.storage_options["client_kwargs"] = {"region_name": entry["aws_region_name"]}
    if holds_credential("source", source):
        raise ConfigError(where, "instance_data_dir" if backend_type == "local" else "aws_bucket_name",
                          "holds a credential (user:password@ in a URL): credentials come from the environment here")
    dataset_id = NAME_PATTERN.sub("-", str(entry.get("id", f"dataset-{index}"))).strip("-._") or f"dataset-{index}"
    format_keys, format_notes = {}, []
    try:
        if backend_type == "csv":
            format_keys, format_notes = formats.csv_keys(entry, f"{dataset_id}.parquet")  # main() names the file
            out.csv_lists[index] = (str(entry["csv_file"]), format_keys["image_column"], format_keys["caption_column"],
                                    where)
        elif hub:
            format_keys, format_notes, hub_skipped = formats.huggingface_keys(entry, strategy == "textfile", where)
            out.skipped.extend((f"{label}.{key}", value, why) for key, value, why in hub_skipped)
        elif raw_strategy == "parquet" or entry.get("metadata_backend") == "parquet":
            format_keys, format_notes = formats.parquet_keys(entry, source, bucket_root)
    except formats.NotExpressible as err:
        out.skipped.append((label, backend_type if backend_type in ("csv", "huggingface") else "parquet captions",
                            str(err)))
        return None
    if format_keys:
        source = format_keys.pop("source")
        note(path + ("format",), []).extend(format_notes)
    dataset: dict[str, Any] = {"id": dataset_id, "source": source, **format_keys, "caption_strategy": strategy}
    if weight != 1.0:
        dataset["probability"] = weight
        note(path + ("probability",), []).append(
            "SimpleTuner's probability: how often a step draws from this dataset while it has samples left in the epoch")
    if strategy == "instance_prompt":
        prompt = entry.get("instance_prompt", defaults.instance_prompt)
        if not prompt:
            raise ConfigError(where, "instance_prompt", "caption_strategy instanceprompt needs an instance_prompt")
        dataset["instance_prompt"] = str(prompt)
    elif strategy == "filename":
        note(path + ("caption_strategy",), []).append(
            "SimpleTuner turns _ into spaces; here - and a trailing copy counter (2) go too")
    elif hub:
        note(path + ("caption_strategy",), []).append(
            f"SimpleTuner's caption_strategy huggingface: the caption column {format_keys.get('caption_column')}")
    elif strategy == "textfile":
        note(path + ("caption_strategy",), []).append(
            "a multi-line .txt: SimpleTuner samples one line per step; here the first non-empty line is the caption")
    repeats = _number(entry, "repeats", "int", 0, where)
    dataset["repeats"] = repeats + 1
    note(path + ("repeats",), []).append(f"SimpleTuner repeats {repeats} means seen {repeats + 1}× per epoch; "
                                         "here repeats counts appearances")
    crop = _number(entry, "crop", "bool", False, where)
    dataset["crop"] = crop
    if "crop" not in entry:
        note(path + ("crop",), []).append("SimpleTuner's default (crop false)")
    if crop:
        raw_style = str(entry.get("crop_style", "random"))
        if raw_style not in CROP_STYLES:
            raise ConfigError(where, "crop_style", f"{raw_style!r}: SimpleTuner knows random, center (centre), corner, face")
        dataset["crop_style"] = CROP_STYLES[raw_style]
        if "crop_style" not in entry:
            note(path + ("crop_style",), []).append("SimpleTuner's default (crop_style random)")
        elif raw_style == "face":
            note(path + ("crop_style",), []).append("face: no face detector here; SimpleTuner falls back to random "
                                                    "crops where it finds no face")
        aspect = str(entry.get("crop_aspect", "square"))
        out.square = out.square and aspect == "square"
        if aspect == "random":
            out.skipped.append((f"{label}.crop_aspect", aspect, "crops take the nearest bucket's shape here"))
    else:
        out.square = False
        note(path + ("crop",), []).append("crop false: images must already have a bucket's shape (others are rejected, "
                                          "listed in the cache's report.json); SimpleTuner buckets by each image's "
                                          "own aspect ratio instead")
    resolution_type = str(entry.get("resolution_type") or defaults.resolution_type)
    resolution = _number(entry, "resolution", "float", defaults.resolution, where)
    own = checked_side(bucket_side(resolution, resolution_type), where, "resolution", resolution, resolution_type)
    if round(own) != round(side):
        out.skipped.append((f"{label}.resolution", resolution, f"one bucket list (data.buckets, about {round(side)}² "
                                                               f"pixels) serves every dataset here"))
    minimum = entry.get("minimum_image_size", defaults.minimum_image_size)
    if minimum not in (None, 0, "0"):
        value = _number({"minimum_image_size": minimum}, "minimum_image_size", "float", 0, where)
        dataset["minimum_image_size"] = min_side(value, resolution_type)
        note(path + ("minimum_image_size",), []).append(
            f"shorter side in pixels here (SimpleTuner: {minimum} as {resolution_type})")
    for key in ("maximum_image_size", "target_downsample_size"):
        if entry.get(key) not in (None, "", 0):
            out.skipped.append((f"{label}.{key}", entry[key], "images are resized straight to their bucket here"))
    return dataset
