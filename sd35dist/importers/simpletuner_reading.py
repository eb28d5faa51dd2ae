"""Reading SimpleTuner's files as SimpleTuner reads them: config.json (keys with or without
`--`), config.env (a shell file its train.sh sources; only the variables of its env map become
options, TRAINER_EXTRA_ARGS holds more), multidatabackend.json and a user prompt library.

Everything here returns plain mappings or raises ConfigError (one line naming file and key);
no value read is ever put into an error message, so a credential cannot leak through one.
"""

from __future__ import annotations

import difflib
import json
import re
import shlex
from pathlib import Path
from typing import Any

from sd35dist.config.credentials import looks_secret
from sd35dist.config.loading import ConfigError
from sd35dist.importers.simpletuner_options import (
    ENV_ARGUMENT_LISTS,
    ENV_BITFIT,
    ENV_NAMES,
    ENV_NOT_OPTIONS,
    LEGACY_ENV_NAMES,
)

_VARIABLE_USE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
ENV_TYPO_CUTOFF = 0.88
"""An unread config.env variable this close to one SimpleTuner reads is taken for a typo of it."""


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(path.name, "", f"not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(path.name, "", f"cannot read: {err.strerror or err}") from None


def _json(path: Path) -> Any:
    text = _text(path)
    try:
        return json.loads(text, parse_constant=lambda name: float(name))  # NaN/Infinity: refused when converted
    except json.JSONDecodeError as err:
        raise ConfigError(path.name, "", f"not JSON (line {err.lineno}: {err.msg})") from None


def read_json_config(path: Path) -> dict[str, Any]:
    data = _json(path)
    if not isinstance(data, dict):
        raise ConfigError(path.name, "", "expected a JSON object of options")
    return {str(key).strip().lstrip("-"): value for key, value in data.items()}


class EnvConfig:
    """config.env read: the options it sets, and the variables SimpleTuner does not read (helpers)."""

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}
        self.unread: dict[str, str] = {}
        """variable → why it is not an option (a helper variable, a shell setting …)."""
        self.legacy: list[str] = []
        """Older train.sh variables read as that SimpleTuner meant them."""


def read_env_config(path: Path) -> EnvConfig:
    """`export NAME=value` lines (comments, quotes, `${NAME}` of earlier lines, as the shell does)."""
    variables: dict[str, str] = {}
    used: set[str] = set()
    for number, line in enumerate(_text(path).splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as err:
            raise ConfigError(path.name, f"line {number}", f"not shell syntax ({err})") from None
        if any("$(" in word or "`" in word for word in words):
            raise ConfigError(path.name, f"line {number}", "shell arithmetic or commands ($(…)) are not run: write the value")
        if words[:1] == ["export"]:
            words = words[1:]
        if not words:
            continue
        if len(words) != 1 or "=" not in words[0] or not re.fullmatch(r"[A-Za-z_]\w*", words[0].split("=", 1)[0]):
            raise ConfigError(path.name, f"line {number}", "expected NAME=value (as the shell exports it)")
        name, value = words[0].split("=", 1)
        used.update(a or b for a, b in _VARIABLE_USE.findall(value))
        variables[name] = _VARIABLE_USE.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), value)
    result = EnvConfig()
    known = [*ENV_NAMES, *LEGACY_ENV_NAMES, *ENV_ARGUMENT_LISTS]
    for name, value in variables.items():
        if name in ENV_ARGUMENT_LISTS:
            result.options.update(argument_list(value, path.name, name))
        elif name == ENV_BITFIT:
            result.options["layer_freeze_strategy"] = "bitfit"
        elif name in ENV_NAMES:
            result.options[ENV_NAMES[name]] = value
        elif name in LEGACY_ENV_NAMES:
            result.options[LEGACY_ENV_NAMES[name]] = value
            result.legacy.append(name)
        elif name in ENV_NOT_OPTIONS:
            result.unread[name] = ENV_NOT_OPTIONS[name]
        elif looks_secret(name):
            result.unread[name] = ("a credential: not copied; export it in your shell and list it in the profile's "
                                   "env.passthrough")
        elif name not in used and (close := difflib.get_close_matches(name, known, n=1, cutoff=ENV_TYPO_CUTOFF)):
            raise ConfigError(path.name, name, f"not a variable SimpleTuner reads: did you mean {close[0]}?")
        else:
            result.unread[name] = ("a helper variable of the file (used by other lines)" if name in used else
                                   "not a variable SimpleTuner's env loader reads: SimpleTuner ignores it too")
    return result


def argument_list(text: str, source: str, variable: str) -> dict[str, Any]:
    """`--lora_rank=768 --report_to wandb --use_ema` → {"lora_rank": "768", "report_to": "wandb", "use_ema": True}."""
    options: dict[str, Any] = {}
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise ConfigError(source, variable, f"not shell syntax ({err})") from None
    index = 0
    while index < len(words):
        word = words[index]
        if not word.startswith("--"):
            raise ConfigError(source, variable, f"expected --option[=value], got {word.split('=')[0]!r}")
        if "=" in word:
            key, value = word[2:].split("=", 1)
        elif index + 1 < len(words) and not words[index + 1].startswith("--"):
            key, value = word[2:], words[index + 1]
            index += 1
        else:
            key, value = word[2:], True
        options[key.replace("-", "_") if key in ("lr-scheduler", "model-family") else key] = value
        index += 1
    return options


def read_config(path: Path) -> tuple[dict[str, Any], EnvConfig | None]:
    """(options, the env file's reading when CONFIG is a config.env)."""
    if not path.is_file():
        raise ConfigError(str(path), "", "no such file")
    if path.suffix == ".env" or path.name.endswith("config.env"):
        env = read_env_config(path)
        return env.options, env
    return read_json_config(path), None


def read_backend(path: Path) -> list[dict[str, Any]]:
    data = _json(path)
    if not isinstance(data, list) or not all(isinstance(entry, dict) for entry in data):
        raise ConfigError(path.name, "", "expected a JSON list of dataset objects")
    return data


def find_beside(named: str, config: Path) -> Path | None:
    """A file a config names, looked for as given, beside the config, one folder up, and by its name
    beside the config (SimpleTuner resolves `config/…` paths from its own working directory)."""
    candidates = (Path(named), config.parent / named, config.parent.parent / named, config.parent / Path(named).name)
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def read_prompt_library(path: Path) -> list[str]:
    """SimpleTuner's user_prompt_library.json: {shortname: prompt} (a prompt may be an object with `prompt`)."""
    data = _json(path)
    if not isinstance(data, dict):
        raise ConfigError(path.name, "", "expected a JSON object {shortname: prompt}")
    prompts = []
    for name, entry in data.items():
        prompt = entry.get("prompt") if isinstance(entry, dict) else entry
        if not isinstance(prompt, str):
            raise ConfigError(path.name, str(name), "expected a prompt (text)")
        prompts.append(prompt)
    return prompts
