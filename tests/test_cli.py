"""The ldfa command: wiring, JSON output, exit codes."""

import json
import subprocess
import sys


def ldfa(*args):
    return subprocess.run([sys.executable, "-m", "ldfa_cli", *args], capture_output=True,
                          text=True)  # fmt: skip


def test_help_lists_commands():
    out = ldfa("--help")
    assert out.returncode == 0 and "rules" in out.stdout


def test_rules_json_lists_every_rule_with_options():
    out = ldfa("rules", "--json")
    assert out.returncode == 0
    rows = {r["rule"]: r for r in json.loads(out.stdout)}
    assert rows["ldfa"]["options"]["interval"] == 1
    assert rows["ldfa_local"]["uses_rank"] and not rows["fa"]["uses_rank"]


def test_unknown_command_exits_2():
    out = ldfa("nope")
    assert out.returncode == 2 and "No such command" in out.stderr


def test_command_line_mistakes_are_one_line_naming_the_help(tmp_path):
    (tmp_path / "afile").write_text("")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {name: mlp}\n")
    for args, words in (
        (["train", "quickstart", "--bogus"], ["No such option: --bogus", "ldfa train --help"]),
        (["sample", "x", "--tokens", "0"], ["'--tokens'", "greater than or equal to 1"]),
        (["flops"], ["Missing argument", "ldfa flops --help"]),
        (["train", "quickstart", "--out", tmp_path / "afile" / "sub"],
         ["afile is a file, not a folder", "choose another --out"]),
        (["plot", tmp_path, "--out", tmp_path / "afile" / "c.png"], ["is a file, not a folder"]),
        (["theory", "--out", tmp_path / "run"], ["a training run's folder"]),
        (["theory", "--out", tmp_path / "afile" / "t"], ["is a file, not a folder"]),
    ):  # fmt: skip
        out = ldfa(*map(str, args))
        assert out.returncode == 2 and not out.stdout, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # no box, no traceback
        assert out.stderr.startswith("ldfa: error: ") and all(w in out.stderr for w in words)


def test_version_and_short_help():
    out = ldfa("--version")
    assert out.returncode == 0 and out.stdout.startswith("ldfa ")
    assert ldfa("-h").returncode == 0 and ldfa("train", "-h").returncode == 0


HEAVY = ("torch", "torchvision", "timm", "transformers", "matplotlib", "numpy")
HELP_ONLY = f"""
import sys, typer
from ldfa_cli.cli.app import app
commands = sorted(typer.main.get_command(app).commands)
for args in [["--help"], ["--version"], *([c, "--help"] for c in commands)]:
    try:
        app(args, standalone_mode=False)
    except SystemExit:
        pass
print(commands)
print(sorted(set({HEAVY!r}) & set(sys.modules)))
"""


def test_help_and_version_import_no_heavy_library():
    """A command's module imports torch and the rest inside the command, so --help and
    --version answer at once."""
    out = subprocess.run([sys.executable, "-c", HELP_ONLY], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    *_, commands, heavy = out.stdout.strip().splitlines()
    assert all(f"'{c}'" in commands for c in ("train", "flops", "bench", "sweep", "sample"))
    assert heavy == "[]"


def test_listings_go_to_stdout_as_plain_lines_when_piped():
    for command, first in ((["recipes"], "name\tmodel"), (["rules"], "rule\t"),
                           (["validate", "quickstart"], "ok")):  # fmt: skip
        out = ldfa(*command)
        assert out.returncode == 0 and out.stdout.startswith(first) and not out.stderr.strip()
    recipes = ldfa("recipes").stdout.splitlines()
    vit = next(line for line in recipes if line.startswith("vit_cifar10_r24\t"))
    assert vit.split("\t")[3:6] == ["ldfa", "24", "250"]  # rule, rank and epochs all there


def test_conflicting_flags_are_refused():
    for flags in (["--print-config", "--dry-run"], ["--resume", "runs/x", "--overwrite"],
                  ["--resume", "runs/x", "--out", "runs/y"]):  # fmt: skip
        out = ldfa("train", *(["quickstart"] if "--dry-run" in flags else []), *flags)
        assert out.returncode == 2 and "do not go together" in out.stderr
