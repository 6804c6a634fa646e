"""Recipes: the schema (every key and default) and loading with overrides."""

from .load import (
    RECIPES_DIR,
    ConfigError,
    apply_overrides,
    find_recipe,
    load_recipe,
    read_yaml,
    shipped_recipes,
    to_yaml,
    validate,
)
from .schema import Recipe

__all__ = [
    "RECIPES_DIR",
    "ConfigError",
    "Recipe",
    "apply_overrides",
    "find_recipe",
    "load_recipe",
    "read_yaml",
    "shipped_recipes",
    "to_yaml",
    "validate",
]
