"""The one credential rule: no secret value in any file sd35dist reads and then writes.

Profiles and recipes are copied into run directories and job scripts, so a credential in
either would be written to shared storage. Secrets travel by *name* instead (the profile's
env.passthrough). This module walks a whole YAML tree, every key and every string, so a
field added later is covered without being listed here. Pure: no files, no torch.

Ways a value can hold a credential:
- a secret-looking key (`aws_secret_access_key`, `WANDB_API_KEY`, `GITHUB_PAT`, `token`, `pw`)
  with a value;
- user-info in a URL (`s3://AKIA…:secret@bucket/x`, `http://user:pass@host:9000`);
- in a string (a setup line, say): a shell assignment (`export HF_TOKEN=hf_…`), a flag
  (`--token hf_…`, `-u user:pass`), a setting (`aws configure set aws_secret_access_key …`),
  an HTTP header (`Authorization: Bearer …`), a login (`wandb login …`), or a value shaped like
  a well-known token (`hf_…`, `ghp_…`, `AKIA…`) wherever it stands.

A value read where the script runs (`$HF_TOKEN`, `"$(cat ~/.hf_token)"`) holds none.
`first_credential` / `find_credentials` say where; `redact` / `redact_text` give a copy with the
values taken out (for anything that must show or convert a config it did not write: the importer).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

SECRET_WORDS = frozenset(
    {"secret", "secrets", "token", "password", "passwd", "passphrase", "credential", "credentials", "apikey",
     "accesskey", "authorization", "signature", "sig", "pw", "pwd", "bearer", "jwt"}
)
"""A key holding any of these words is a credential (words, not substrings: `keep_tokens` is not)."""
WHOLE_KEY_SECRETS = frozenset({"key", "tokens", "auth", "pass", "pat"})
"""Keys that are a credential when they are the whole key (s3fs's `key`; `tokens`, `auth`)."""
LAST_WORD_SECRETS = frozenset({"key", "pat", "pass", "auth"})
"""Credential as a key's last word: `WANDB_KEY`, `GITHUB_PAT`, `DB_PASS`, `basic_auth`."""
KEY_QUALIFIERS = frozenset({"access", "api", "private", "account", "auth", "signing", "secret", "master", "sas"})
"""`key` is a credential next to one of these wherever it stands (`AWS_ACCESS_KEY_ID`, `api_key_v2`)."""
PLAIN_KEY_QUALIFIERS = frozenset({"public", "sort", "partition", "cache", "primary", "foreign", "hash", "range",
                                  "ssh", "kms", "lookup", "dict", "map", "layout", "group", "row", "index"})
"""`…_key` names of things that are not secrets (`sort_key`, `partition_key`, `public_key`)."""
REFERENCE_WORDS = frozenset({"file", "path", "dir", "stdin", "helper", "env", "var", "name", "names", "type",
                             "method", "mode", "length", "size", "count", "enabled", "url", "prefix"})
"""A last word saying the key names where a secret is, or what kind, not the secret itself
(`token_file`, `password_stdin`, `auth_type`)."""

# camelCase humps, then any run of non-alphanumerics, split a key into words.
_WORD_BREAK = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|[^A-Za-z0-9]+")
# scheme://user-info@host… — the user-info part ends before the first / ? or #.
_URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^/?#\s@]*@)")
# NAME=value, --name=value or ?name=value (a URL query); a value starting with $ is read at run time.
_ASSIGNMENT = re.compile(r"(?:^|[\s;&|(?])(?:export\s+)?-{0,2}([A-Za-z_][A-Za-z0-9_-]*)=(['\"]?)([^\s&;|'\"]*)")
# --name value, -u value: a flag and the word after it.
_FLAG = re.compile(r"(?:^|\s)(--?[A-Za-z][A-Za-z0-9_-]*)\s+(['\"]?)([^\s'\"]+)")
# `aws configure set NAME VALUE`, `git config [--global] NAME VALUE`, `npm config set NAME VALUE`
# (tool words, not a bare "set": "a set secret garden" is a prompt, not a setting).
_SETTING = re.compile(r"\b(?:configure\s+set|config(?:\s+--[\w-]+)*(?:\s+set)?)\s+([A-Za-z_][\w.-]*)\s+(['\"]?)"
                      r"([^\s'\"]+)")
# An HTTP header: Authorization, Proxy-Authorization or a hyphenated name (X-Api-Key, Private-Token).
_HEADER = re.compile(r"\b((?:Proxy-)?Authorization|[A-Za-z0-9]+(?:-[A-Za-z0-9]+)+)\s*:\s*"
                     r"(?:(?:Bearer|Basic|Token|token|Digest)\s+)?([^\s'\"]+)", re.IGNORECASE)
# `wandb login KEY`, `huggingface-cli login TOKEN`, `hf auth login TOKEN`.
_LOGIN = re.compile(r"\b(?:wandb|huggingface-cli|hf(?:\s+auth)?)\s+login\s+(['\"]?)([^\s'\"-][^\s'\"]*)")
_TOKEN_SHAPES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{40,}|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|sk-(?:proj-)?[A-Za-z0-9]{32,}|xox[abposr]-[A-Za-z0-9-]{10,}|glpat-[A-Za-z0-9_-]{20,})\b"
)
_USER_FLAGS = ("-u", "--user")
_VARIABLE = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*\})")

REDACTED = "<redacted>"


@dataclasses.dataclass(frozen=True)
class Credential:
    """Where a credential was found (a YAML path) and why it counts as one. Never the value."""

    path: str
    reason: str


def key_words(key: str) -> list[str]:
    return [word.lower() for word in _WORD_BREAK.split(key) if word]


def looks_secret(key: str) -> bool:
    """A mapping key, variable name or flag that names a credential."""
    words = key_words(str(key))
    if not words or (len(words) > 1 and words[-1] in REFERENCE_WORDS):
        return False
    if SECRET_WORDS.intersection(words) or (len(words) == 1 and words[0] in WHOLE_KEY_SECRETS):
        return True
    if "key" in words and KEY_QUALIFIERS.intersection(words):
        return True
    return len(words) > 1 and words[-1] in LAST_WORD_SECRETS and words[-2] not in PLAIN_KEY_QUALIFIERS


def has_url_userinfo(text: str) -> bool:
    return bool(_URL_USERINFO.search(text))


def _read_at_run_time(value: str) -> bool:
    """`$NAME`, `${NAME}`, `$(command)`: the script reads it where it runs; nothing is written.
    (<redacted>, what `redact` leaves, holds nothing either.)"""
    return value.startswith("$") or value == REDACTED


def secret_assignment(text: str) -> str | None:
    """The variable or flag name of the first `NAME=value` in `text` that sets a credential."""
    for match in _ASSIGNMENT.finditer(text):
        name, value = match.group(1), match.group(3)
        if looks_secret(name) and value and not _read_at_run_time(value):
            return name
    return None


PASS_BY_NAME = "export it in your shell and list its variable in the profile's env.passthrough"
SECRET_KEY_REASON = (
    f"looks like a credential: {PASS_BY_NAME}; values in profiles and recipes are written to the run directory"
)
USERINFO_REASON = (
    "a URL with user-info (user:password@host): credentials come from the environment, never from a URL; "
    "name the variables in the profile's env.passthrough"
)


@dataclasses.dataclass(frozen=True)
class _Span:
    """Where in a string a credential's value sits, why it counts, and what replaces it when redacted."""

    start: int
    end: int
    reason: str
    replacement: str = REDACTED


def _value_span(match: re.Match[str], group: int, reason: str) -> Iterator[_Span]:
    """The span of `group` unless it is empty or read at run time (`$NAME`)."""
    value = match.group(group)
    if value and not _read_at_run_time(value):
        yield _Span(match.start(group), match.end(group), reason)


def _by_name(what: str, variable: str, *, assignment: bool = False) -> str:
    where = "drop the value here" if assignment else f'write "${variable}" where the value stood'
    return (f"{what}: pass it by name — export {variable} in your shell, list {variable} in the profile's "
            f"env.passthrough and {where} (the node reads it when the script runs)")


def _variable(name: str) -> str:
    """An environment variable name for a flag, setting or header name (`--api-key` → API_KEY)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").upper() or "TOKEN"


def _tool_variable(text: str, fallback: str) -> str:
    """The variable the tool in `text` reads its token from, where it is a well-known one."""
    if re.search(r"\bwandb\b", text):
        return "WANDB_API_KEY"
    if re.search(r"\b(?:huggingface-cli|hf)\b", text):
        return "HF_TOKEN"
    return fallback


_SHAPE_VARIABLES = (("hf_", "HF_TOKEN"), ("gh", "GITHUB_TOKEN"), ("github_pat_", "GITHUB_TOKEN"),
                    ("AKIA", "AWS_ACCESS_KEY_ID"), ("ASIA", "AWS_ACCESS_KEY_ID"), ("sk-", "OPENAI_API_KEY"),
                    ("xox", "SLACK_TOKEN"), ("glpat-", "GITLAB_TOKEN"))


def _string_spans(text: str) -> Iterator[_Span]:
    """Every credential value in `text`, in no particular order (spans may overlap)."""
    for match in _URL_USERINFO.finditer(text):
        yield _Span(match.start(2), match.end(2), USERINFO_REASON, replacement="")
    for match in _ASSIGNMENT.finditer(text):
        name = match.group(1)
        if looks_secret(name):
            yield from _value_span(match, 3, _by_name(f"sets {name}, which looks like a credential",
                                                      _variable(name), assignment=True))
    for match in _FLAG.finditer(text):
        flag, value = match.group(1), match.group(3)
        if flag in _USER_FLAGS and ":" in value.strip(":") and not _VARIABLE.search(value):
            yield from _value_span(match, 3, _by_name(f"passes a credential (user:password) on the command line ({flag})",
                                                      "HTTP_CREDENTIALS"))
        elif looks_secret(flag.lstrip("-")) and not value.startswith("-"):
            variable = _tool_variable(text, _variable(flag))
            yield from _value_span(match, 3, _by_name(f"passes a credential on the command line ({flag})", variable))
    for match in _SETTING.finditer(text):
        name = match.group(1)
        if looks_secret(name.rsplit(".", 1)[-1]):
            yield from _value_span(match, 3, _by_name(f"sets {name}, which looks like a credential", _variable(name)))
    for match in _HEADER.finditer(text):
        header = match.group(1)
        if looks_secret(header):
            variable = "AUTH_TOKEN" if header.lower().endswith("authorization") else _variable(header)
            yield from _value_span(match, 2, _by_name(f"an HTTP header with a credential ({header})", variable))
    for match in _LOGIN.finditer(text):
        yield from _value_span(match, 2, _by_name("logs in with a credential on the command line",
                                                  _tool_variable(match.group(0), "HF_TOKEN")))
    for match in _TOKEN_SHAPES.finditer(text):
        variable = next(v for prefix, v in _SHAPE_VARIABLES if match.group(0).startswith(prefix))
        yield _Span(match.start(), match.end(), _by_name("holds a value shaped like a credential (an access token or key id)", variable))


def string_credential(text: str) -> str | None:
    """Why `text` holds a credential (the first one in it), or None."""
    spans = sorted(_string_spans(text), key=lambda span: span.start)
    return spans[0].reason if spans else None


def redact_text(text: str) -> str:
    """`text` with every credential value replaced by <redacted> (a URL's user-info removed)."""
    out, end = [], 0
    for span in sorted(_string_spans(text), key=lambda span: (span.start, -span.end)):
        if span.start < end:  # inside a span already replaced
            continue
        out += [text[end:span.start], span.replacement]
        end = span.end
    return "".join(out) + text[end:]


def _holds_value(value: Any) -> bool:
    """Booleans (`anon: true`), None, empty strings and a bare `$VARIABLE` (read where the
    script runs) hold no credential."""
    if value is None or isinstance(value, bool):
        return False
    return not (isinstance(value, str) and (not value.strip() or _VARIABLE.fullmatch(value.strip())
                                            or value.strip() == REDACTED))


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
        problem = string_credential(node)
        if problem:
            yield Credential(".".join(path), problem)


def find_credentials(tree: Any) -> list[Credential]:
    """Every credential in a YAML tree (mappings, lists, scalars), in document order."""
    return list(_walk(tree, [], False))


def first_credential(tree: Any) -> Credential | None:
    return next(_walk(tree, [], False), None)


def redact(tree: Any, _secret_key: bool = False) -> Any:
    """A copy of a YAML tree with every credential taken out: values under secret-looking keys
    become <redacted>, strings lose the credential parts `redact_text` finds. Nothing else changes."""
    if isinstance(tree, Mapping):
        return {key: redact(value, _secret_key or looks_secret(str(key))) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(redact(value, _secret_key) for value in tree)
    if _secret_key and _holds_value(tree):
        return REDACTED
    return redact_text(tree) if isinstance(tree, str) else tree
