"""The one YAML reader: every recipe, profile, `--set` value and saved recipe goes through it.

PyYAML's safe loader builds no objects, but it still accepts documents that hurt whoever reads
them next: aliases that expand exponentially ("billion laughs": nine aliases of nine aliases
… are a few hundred bytes and 10⁹ values once a validator or a deep copy walks them), aliases
that contain themselves (a recursive list: RecursionError in the first walk), nesting deep
enough to exhaust the interpreter's stack, and duplicate keys (YAML says they are an error;
PyYAML keeps the last one silently). This reader refuses each while composing, before any
value is built, and says where: the YAML path of the offending key.

Numbers are read as YAML 1.2 does: 1e-4 is a float, not the string "1e-4".
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionStartEvent
from yaml.nodes import MappingNode, ScalarNode

MAX_VALUES = 100_000
"""Values (scalars, lists, mappings) a document may hold with every alias expanded; a large
recipe holds a few hundred."""
MAX_DEPTH = 64
"""Nesting levels of lists and mappings; recipes and profiles use fewer than ten."""
MERGE_TAG = "tag:yaml.org,2002:merge"
SHOWN_PATH_PARTS = 8
"""A refusal names at most this many levels of the YAML path (a deep one would fill the screen)."""


class YamlRefused(yaml.YAMLError):
    """A document the reader refuses: `key` is the YAML path (dotted) where, `line` the 1-based line."""

    def __init__(self, key: str, line: int, message: str) -> None:
        self.key, self.line, self.message = key, line, message
        super().__init__(f"line {line}: {key}: {message}" if key else f"line {line}: {message}")


class ConfigYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats and the limits above."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._path: list[str] = []
        self._open_anchors: set[str] = set()
        self._expanded_sizes: dict[int, int] = {}
        self._values = 0

    def compose_document(self) -> Any:
        self._values, self._expanded_sizes = 0, {}
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        self._path.append(_path_part(index))
        try:
            if isinstance(event, AliasEvent):
                return self._compose_alias(event, parent, index)
            if len(self._path) > MAX_DEPTH:
                self._refuse(event, f"nested more than {MAX_DEPTH} levels deep: flatten the document")
            anchor = event.anchor if isinstance(event, CollectionStartEvent) else None
            if anchor is not None:
                self._open_anchors.add(anchor)
            before = self._values
            node = super().compose_node(parent, index)
            self._open_anchors.discard(anchor)
            self._add_values(1, event)
            self._expanded_sizes[id(node)] = self._values - before
            return node
        finally:
            self._path.pop()

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        # Checked while scanning: the scanner looks up to 1024 characters ahead for every open
        # bracket, so a line of thousands of them costs a second before the composer sees one.
        if self.flow_level >= MAX_DEPTH:
            raise YamlRefused("", self.get_mark().line + 1,
                              f"brackets nested more than {MAX_DEPTH} levels deep: flatten the document")
        super().fetch_flow_collection_start(token_class)

    def _compose_alias(self, event: AliasEvent, parent: Any, index: Any) -> Any:
        if event.anchor in self._open_anchors:
            self._refuse(event, f"alias *{event.anchor} is inside the value it names (a recursive alias): "
                                "write the value out")
        node = super().compose_node(parent, index)
        self._add_values(self._expanded_sizes.get(id(node), 1), event)
        return node

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], ScalarNode] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == MERGE_TAG:
                continue
            seen = first.setdefault((key.tag, key.value), key)
            if seen is not key:
                key_path = ".".join([*(p for p in self._path[1:] if p), key.value])
                raise YamlRefused(key_path, key.start_mark.line + 1,
                                  f"duplicate key (first on line {seen.start_mark.line + 1}): YAML keeps only one "
                                  "of them; delete the other")
        return node

    def _add_values(self, count: int, event: Any) -> None:
        self._values += count
        if self._values > MAX_VALUES:
            self._refuse(event, f"the document expands to more than {MAX_VALUES} values once its aliases are "
                                "expanded (a 'billion laughs' document?): use fewer aliases")

    def _refuse(self, event: Any, message: str) -> None:
        parts = [p for p in self._path[1:] if p]
        shown = parts if len(parts) <= SHOWN_PATH_PARTS else [*parts[:SHOWN_PATH_PARTS], "…"]
        raise YamlRefused(".".join(shown), event.start_mark.line + 1, message)


def _path_part(index: Any) -> str:
    """The YAML path component a node sits at: a mapping key's text, a list index, "" for a key itself."""
    if isinstance(index, ScalarNode):
        return str(index.value)
    if isinstance(index, int):
        return str(index)
    return ""


ConfigYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+
        |[-+]?\.[0-9_]+[eE][-+]?[0-9]+)$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML text → Python values, the way every config file and `--set` value is read."""
    return yaml.load(text, Loader=ConfigYamlLoader)
