"""A researcher's own rules, in files of their own: ``feedback.plugins: [my_rule.py]`` in a
recipe (or :func:`load_plugins` in Python) imports each file before the recipe is
validated, so the rules it registers (``@register``) are known by name like the shipped
ones. A file is imported once per process, however many recipes name it."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from .rule import RULES, FeedbackConfigError

_LOADED: dict[Path, str] = {}  # resolved path -> the module name it was imported as


def load_plugins(paths) -> list[str]:
    """Import each rule file (relative paths from the current directory) and return their
    absolute paths. A missing file, one that fails to import, and one that registers a
    rule name already taken are each a one-line :class:`FeedbackConfigError`."""
    return [str(load_plugin(path)) for path in paths]


def load_plugin(path) -> Path:
    resolved = Path(path).expanduser().resolve()
    if resolved in _LOADED:
        return resolved
    if not resolved.is_file():
        raise FeedbackConfigError(
            f"plugin {path} is not a file: give the path of a Python file that registers a "
            "rule (relative paths start from the current directory)"
        )
    if resolved.suffix != ".py":
        raise FeedbackConfigError(f"plugin {path} is not a Python file: a plugin is a .py file "
                                  "that registers a rule")  # fmt: skip
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    name = f"ldfa_plugin_{resolved.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve a rule's annotations through it
    before = dict(RULES)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        RULES.clear()
        RULES.update(before)  # nothing half-registered stays
        first = str(error).splitlines()[0] if str(error) else ""
        why = first if isinstance(error, FeedbackConfigError) else (
            f"{type(error).__name__}: {first}")  # fmt: skip
        raise FeedbackConfigError(f"plugin {resolved} failed to import ({why})") from None
    _LOADED[resolved] = name
    return resolved
