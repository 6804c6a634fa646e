"""Find, read, override and validate recipes, with one-line errors naming the dotted key."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from ldfa_cli.errors import ConfigError

from .schema import Recipe

RECIPES_DIR = Path(os.environ.get("LDFA_RECIPES", Path(__file__).resolve().parents[2] / "recipes"))


def shipped_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))


def find_recipe(spec: str) -> Path:
    """A recipe path, or the name of a shipped recipe (with or without ``.yaml``)."""
    path = Path(spec)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / spec, RECIPES_DIR / f"{spec}.yaml"):
        if candidate.is_file():
            return candidate
    names = [p.stem for p in shipped_recipes()]
    close = difflib.get_close_matches(Path(spec).stem, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; 'ldfa recipes' lists the shipped ones"
    raise ConfigError(f"recipe '{spec}' is neither a file nor a shipped recipe{hint}")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key given twice in one mapping is an error
    (PyYAML keeps the last without a word: ``train: {epochs: 1}`` then ``train: {epochs:
    500}`` would train 500 epochs)."""


def _mapping_without_repeats(loader: UniqueKeyLoader, node, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, str) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice", key_node.start_mark
            )
        seen.add(key if isinstance(key, str) else id(key_node))
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                _mapping_without_repeats)  # fmt: skip


def read_yaml(path: Path) -> dict:
    """A recipe file's sections. An empty file (or one holding only comments) is refused:
    validating it would silently train the schema's defaults."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # a SafeLoader
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); give a YAML recipe") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "cannot be parsed"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(
            f"{path}: the recipe is empty (no sections, only comments or blank lines); write "
            "at least 'model', or copy a shipped recipe ('ldfa recipes' lists them)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def parse_value(text: str) -> Any:
    """An override's value: int, float (``1e-3`` included), else YAML (lists, bools, null)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``a.b=value`` sets a dotted key (creating sections), ``~a.b`` deletes it."""
    for item in overrides:
        if item.startswith("~"):
            *parents, leaf = item[1:].split(".")
            node = config
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict) or leaf not in node:
                raise ConfigError(f"cannot delete '{item[1:]}': the recipe has no such key")
            del node[leaf]
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override '{item}' is not key=value (e.g. optim.lr=1e-3) or ~key (deletes)"
            )
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node = child
        node[leaf] = parse_value(value)
    return config


def _section_of(annotation):
    """What a field holds: a section class, {tag: class} for a discriminated union of
    sections, or None for a plain value."""
    models = [a for a in _flatten(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    if len(models) > 1:
        return {m.model_fields["name"].default: m for m in models}
    return models[0] if models else None


def _flatten(annotation):
    args = get_args(annotation)
    return [x for a in args for x in _flatten(a)] if args else [annotation]


def _dotted_key(loc: tuple) -> tuple[list[str], type]:
    """Follow a pydantic error location through the schema: the dotted path (with union
    tags such as 'mlp' in ('model', 'mlp', 'widths') dropped) and the section holding the
    last key, for did-you-mean."""
    path: list[str] = []
    section, holder, free = Recipe, Recipe, False
    for part in map(str, loc):
        if free:  # a dict key or list index inside a field
            path.append(part)
            continue
        if isinstance(section, dict):  # the tag of a union of sections
            section = section.get(part)
            continue
        if section is None:  # a scalar union's member tag, e.g. 'constrained-int'
            continue
        field = section.model_fields.get(part)
        holder = section
        path.append(part)
        if field is None:  # an unknown key
            break
        section = _section_of(field.annotation)
        free = section is None and get_origin(field.annotation) in (dict, list)
    return path, holder


def describe(error: ValidationError) -> str:
    """The first problem of a validation error as one line naming the dotted key."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    if not loc:
        return first["msg"].removeprefix("Value error, ")
    path, holder = _dotted_key(loc)
    key = ".".join(path)
    if first["type"] == "extra_forbidden":
        known = list(holder.model_fields)
        close = difflib.get_close_matches(path[-1], known, n=1)
        parent = ".".join(path[:-1])
        hint = (
            f"did you mean '{'.'.join([*path[:-1], close[0]])}'?"
            if close
            else (f"'{parent or 'the recipe'}' takes: {', '.join(known)}")
        )
        return f"unknown key '{key}' ({hint}); remove or rename it"
    message = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    if isinstance(given, dict):  # a whole section is inconsistent
        return f"'{key}': {message}; fix the values in '{key}'"
    return f"'{key}' (got {given!r}): {message}; set it in the recipe or override {key}=VALUE"


def validate(config: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(config)
    except ValidationError as error:
        raise ConfigError(f"{source}: {describe(error)}") from None


def load_recipe(spec: str, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Read a recipe by path or name, apply ``key=value`` overrides, validate it."""
    path = find_recipe(spec)
    config = apply_overrides(read_yaml(path), list(overrides or []))
    return validate(config, source=path.name), path


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe, every default written out."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
