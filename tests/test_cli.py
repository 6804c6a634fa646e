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
