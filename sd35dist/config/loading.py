"""YAML → typed config, with `--set a.b=c` overrides and one-line errors naming file and key.

Pure apart from reading the YAML file; knows nothing of torch so the launcher can use it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from sd35dist.config.credentials import first_credential
from sd35dist.config.yaml_reader import YamlRefused, load_yaml

ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)


class ConfigError(Exception):
    """A user mistake in a config file or override: printed as one line, exit status 2."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


class StrictModel(pydantic.BaseModel):
    """Base of every config section: unknown keys are errors, and a value keeps the type YAML gave it.

    "3" is not an int, 2.0 not an int, "true" not a bool. An int is a float (learning_rate: 1),
    and a YAML list is a tuple where a field declares one (`YamlTuple`). A float is finite: YAML's
    .inf and .nan are refused everywhere (`learning_rate: .inf` would train to NaN).
    """

    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


YamlTuple = pydantic.Strict(False)
"""Marks a tuple field (Annotated[tuple[int, int], YamlTuple]) that a YAML list may fill: YAML has no
tuples. Only the container is lax; its items stay strict."""


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a UTF-8 YAML file whose top level must be a mapping; any other content is a ConfigError."""
    source = path.name
    if not path.is_file():
        raise ConfigError(str(path), "", "file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            source, f"line {line}", f"not UTF-8 text (byte 0x{raw[exc.start]:02x}): save the file as UTF-8"
        ) from None
    try:
        data = load_yaml(text)
    except YamlRefused as exc:
        raise ConfigError(source, exc.key or f"line {exc.line}", f"{exc.message} (line {exc.line})") from None
    except yaml.YAMLError as exc:
        where, what = _yaml_problem(exc, text)
        raise ConfigError(source, where, f"invalid YAML: {what}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise ConfigError(source, "", f"top level must be a mapping of keys to values, not {kind}")
    return data


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[str, str]:
    """(where, what) of a YAML error, on one line."""
    if isinstance(exc, yaml.reader.ReaderError):
        # Control characters and other bytes no text file holds: binary junk, usually.
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"line {line}", f"control character #x{code:04x} is not allowed (is this a text file?)"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}" if mark is not None else "parse"
    what = getattr(exc, "problem", None) or getattr(exc, "context", None) or type(exc).__name__
    return where, " ".join(str(what).split())


def refuse_credentials(data: dict[str, Any], source: str) -> None:
    """The one credential rule (sd35dist/config/credentials.py), as a ConfigError naming the YAML path."""
    found = first_credential(data)
    if found is not None:
        raise ConfigError(source, found.path, found.reason)


def load_mapping(path: Path, overrides: list[tuple[list[str], Any]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """Read `path`, refuse credentials in it, apply `--set` overrides and refuse credentials in them."""
    data = read_yaml_mapping(path)
    refuse_credentials(data, path.name)
    merged = apply_overrides(data, list(overrides))
    # The file passed; whatever is found now came from an override.
    refuse_credentials(merged, "--set")
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` → (["a", "b"], c) with c parsed as a YAML scalar/list (so `3` is an int)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError("--set", text, "expected KEY.PATH=VALUE, e.g. slurm.nodes=2")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except YamlRefused as exc:
        raise ConfigError("--set", ".".join([*parts, exc.key] if exc.key else parts), exc.message) from None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """Return a copy of `data` with each (path, value) set; intermediate mappings are created."""
    out = copy.deepcopy(data)
    for parts, value in overrides:
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                path = ".".join(parts[: depth + 1])
                raise ConfigError("--set", ".".join(parts), f"{path} is not a mapping")
            node = child
        node[parts[-1]] = value
    return out


NATIVE_YAML_TYPES = ("int", "float", "bool")


def _describe_error(model_cls: type[pydantic.BaseModel], err: dict[str, Any]) -> tuple[str, str]:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    kind = err["type"]
    ctx = err.get("ctx") or {}
    given = err.get("input")
    if kind == "extra_forbidden":
        known = _known_keys(model_cls, loc[:-1])
        hint = f" (known keys: {', '.join(known)})" if known else ""
        return key, f"unknown key{hint}"
    if kind == "missing":
        return key, "required key is missing"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        sign = {"greater_than_equal": "≥", "greater_than": ">", "less_than_equal": "≤", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return key, f"must be {sign} {bound}, got {given!r}"
    if kind.endswith("_parsing") or kind.endswith("_type"):
        wanted = kind.removesuffix("_parsing").removesuffix("_type").replace("_", " ")
        if wanted == "float" and isinstance(given, str) and _not_finite(given):
            return key, f"must be a finite number, got {given!r}"
        quoted = " (a quoted string: drop the quotes)" if isinstance(given, str) and wanted in NATIVE_YAML_TYPES else ""
        return key, f"expected {wanted}, got {given!r}{quoted}"
    if kind == "finite_number":
        return key, f"must be a finite number, got {given!r}"
    if kind == "literal_error":
        return key, f"must be one of {ctx.get('expected')}, got {given!r}"
    if kind == "value_error":
        return key, str(ctx.get("error", err["msg"]))
    return key, err["msg"][:1].lower() + err["msg"][1:]


def _not_finite(text: str) -> bool:
    """`inf`, `nan`, `-Infinity`: YAML reads them as strings (its own are .inf and .nan)."""
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def _known_keys(model_cls: type[pydantic.BaseModel], loc: list[str]) -> list[str]:
    cls: Any = model_cls
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
        # Optional[Section] and Section | None: take the model class inside.
        args = getattr(cls, "__args__", ())
        models = [a for a in args if isinstance(a, type) and issubclass(a, pydantic.BaseModel)]
        if models:
            cls = models[0]
    return sorted(getattr(cls, "model_fields", {}))


def validate_mapping(model_cls: type[ModelT], data: dict[str, Any], source: str) -> ModelT:
    """Validate a mapping, turning the first pydantic error into a ConfigError."""
    try:
        return model_cls.model_validate(data)
    except pydantic.ValidationError as exc:
        key, message = _describe_error(model_cls, exc.errors()[0])
        raise ConfigError(source, key, message) from None


def load_model(
    model_cls: type[ModelT],
    path: Path,
    overrides: list[tuple[list[str], Any]] = (),  # type: ignore[assignment]
) -> ModelT:
    """Load `path`, apply overrides, validate; every error names the file's name and the key."""
    return validate_mapping(model_cls, load_mapping(path, overrides), path.name)


def dump_yaml(model: pydantic.BaseModel) -> str:
    """The model as YAML that `load_model` reads back to an equal model."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
