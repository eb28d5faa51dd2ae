"""The one credential rule: no secret value in any file sd35dist reads and then writes.

Profiles and recipes are copied into run directories and job scripts, so a credential in
either would be written to shared storage. Secrets travel by *name* instead (the profile's
env.passthrough). This module walks a whole YAML tree, every key and every string, so a
field added later is covered without being listed here. Pure: no files, no torch.

Three ways a value can hold a credential:
- a secret-looking key (`aws_secret_access_key`, `WANDB_API_KEY`, `token`) with a value;
- user-info in a URL (`s3://AKIA…:secret@bucket/x`, `http://user:pass@host:9000`);
- a shell assignment in a string (`export HF_TOKEN=hf_…` in a setup line).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

SECRET_WORDS = frozenset(
    {"secret", "secrets", "token", "password", "passwd", "passphrase", "credential", "credentials", "apikey",
     "accesskey", "authorization", "signature", "sig"}
)
"""A key holding any of these words is a credential (words, not substrings: `keep_tokens` is not)."""
KEY_QUALIFIERS = frozenset({"access", "api", "private", "account", "auth", "signing", "secret", "master", "sas"})
"""`key` is a credential next to one of these (`AWS_ACCESS_KEY_ID`, `api_key`), or alone (s3fs's `key`)."""

# camelCase humps, then any run of non-alphanumerics, split a key into words.
_WORD_BREAK = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|[^A-Za-z0-9]+")
# scheme://user-info@host… — the user-info part ends before the first / ? or #.
_URL_USERINFO = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s@]*@")
# NAME=value, --name=value or ?name=value (a URL query); a value starting with $ is read at run time.
_ASSIGNMENT = re.compile(r"(?:^|[\s;&|(?])(?:export\s+)?-{0,2}([A-Za-z_][A-Za-z0-9_-]*)=([^\s&;|]*)")

_VARIABLE = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*\})")


@dataclasses.dataclass(frozen=True)
class Credential:
    """Where a credential was found (a YAML path) and why it counts as one. Never the value."""

    path: str
    reason: str


def key_words(key: str) -> list[str]:
    return [word.lower() for word in _WORD_BREAK.split(key) if word]


def looks_secret(key: str) -> bool:
    """A mapping key or variable name that names a credential."""
    words = key_words(str(key))
    if SECRET_WORDS.intersection(words):
        return True
    if "key" in words:
        return words == ["key"] or bool(KEY_QUALIFIERS.intersection(words))
    return False


def has_url_userinfo(text: str) -> bool:
    return bool(_URL_USERINFO.search(text))


def secret_assignment(text: str) -> str | None:
    """The variable or flag name of the first `NAME=value` in `text` that sets a credential."""
    for match in _ASSIGNMENT.finditer(text):
        name, value = match.group(1), match.group(2).strip("'\"")
        if looks_secret(name) and value and not value.startswith("$"):
            return name
    return None


def _holds_value(value: Any) -> bool:
    """Booleans (`anon: true`), None, empty strings and a bare `$VARIABLE` (read where the
    script runs) hold no credential."""
    if value is None or isinstance(value, bool):
        return False
    return not (isinstance(value, str) and (not value.strip() or _VARIABLE.fullmatch(value.strip())))


SECRET_KEY_REASON = (
    "looks like a credential: export it in your shell and list its variable in the profile's env.passthrough; "
    "values in profiles and recipes are written to the run directory"
)
USERINFO_REASON = (
    "a URL with user-info (user:password@host): credentials come from the environment, never from a URL; "
    "name the variables in the profile's env.passthrough"
)


def _string_problem(text: str) -> str | None:
    if has_url_userinfo(text):
        return USERINFO_REASON
    name = secret_assignment(text)
    if name:
        return (f"sets {name}, which looks like a credential: export it in your shell and list it "
                "in the profile's env.passthrough instead of writing its value here")
    return None


def _walk(node: Any, path: list[str], secret_key: bool) -> Iterator[Credential]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            # Everything under a credentials mapping is part of the credential.
            yield from _walk(value, [*path, str(key)], secret_key or looks_secret(str(key)))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _walk(value, [*path, str(index)], secret_key)
    elif secret_key and _holds_value(node):
        yield Credential(".".join(path), SECRET_KEY_REASON)
    elif isinstance(node, str):
        problem = _string_problem(node)
        if problem:
            yield Credential(".".join(path), problem)


def find_credentials(tree: Any) -> list[Credential]:
    """Every credential in a YAML tree (mappings, lists, scalars), in document order."""
    return list(_walk(tree, [], False))


def first_credential(tree: Any) -> Credential | None:
    return next(_walk(tree, [], False), None)
