"""The README's commands are what CI runs, and its library example runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_setup_commands_verbatim():
    commands = [b.strip() for b in _blocks("bash")[:2]]
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert commands[0].endswith("ldfa train quickstart")
    assert commands[1].endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    for command in commands:
        assert command in ci


def test_readme_library_example_runs():
    example, rule = _blocks("python")  # the rule file is run by tests/test_new_rule.py
    assert rule.startswith("# my_rule.py")
    exec(compile(example, "README.md", "exec"), {})


def test_readme_recipe_names_exist():
    from ldfa_cli.config import find_recipe

    for block in _blocks("bash"):
        for name in re.findall(r"ldfa train (\w+)", block):
            find_recipe(name)
