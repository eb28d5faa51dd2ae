"""The typed config tree shared by the launcher and the ranks (no torch here)."""

from sd35dist.config.loading import ConfigError, apply_overrides, load_model, parse_override, read_yaml_mapping
from sd35dist.config.recipe import Recipe, load_recipe, recipe_hash, recipe_yaml, resolve_paths

__all__ = [
    "ConfigError",
    "Recipe",
    "apply_overrides",
    "load_model",
    "load_recipe",
    "parse_override",
    "read_yaml_mapping",
    "recipe_hash",
    "recipe_yaml",
    "resolve_paths",
]
