"""A rule defined in this file alone, and one in a plugin file (the README's example),
train, resume bit for bit, count their FLOPs (analytic equal to measured) and bench: no file
of the package knows them. Plugin files that cannot be used are one-line errors."""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from ldfa_cli.feedback import LDFALinear, register
from ldfa_cli.feedback.lowrank import LowRankRule
from ldfa_cli.feedback.rule import check
from tests.helpers import analytic, run_cli
from tests.test_train import write_recipe

README = Path(__file__).resolve().parents[1] / "README.md"


@register
@dataclass(frozen=True)
class RedrawnLowRank(LowRankRule):
    """Fixed random rank-r feedback B = QP, drawn afresh every ``every`` steps: the
    periodic-reset hook, its seed making a resume draw the same."""

    name: ClassVar[str] = "test_redrawn"
    summary: ClassVar[str] = "fixed random rank-r feedback, redrawn every few steps"
    equations: ClassVar[str] = "Sec. 3 (a test rule)"

    every: int = 2

    def __post_init__(self):
        super().__post_init__()
        check(self.every >= 1, f"rule 'test_redrawn': every must be >= 1, got {self.every}")

    def reset_every(self, steps_per_epoch):
        return self.every

    def reset(self, layer, seed: int) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.draw_factors(layer)


MODEL = {"name": "mlp", "widths": [24, 16]}


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def _trains_resumes_counts_and_benches(capsys, tmp_path, feedback: dict) -> dict:
    """Run the rule through every command; return the whole run's final model state."""
    recipe = write_recipe(tmp_path / "r.yaml", MODEL, feedback,
                          train={"epochs": 2, "deterministic": True})  # fmt: skip
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run_cli(capsys, "train", recipe, "--out", whole, "--device", "cpu")[0] == 0
    code, _, err = run_cli(capsys, "train", recipe, "--out", broken, "--device", "cpu",
                           "--stop-after", "1")  # fmt: skip
    assert code == 0, err
    assert run_cli(capsys, "train", "--resume", broken, "--device", "cpu")[0] == 0
    end, resumed = _checkpoint(whole)["model"], _checkpoint(broken)["model"]
    assert end.keys() == resumed.keys()
    assert all(torch.equal(end[k], resumed[k]) for k in end)

    code, out, err = run_cli(capsys, "flops", recipe, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert not report["warnings"]  # every layer's measured FLOPs equal the rule's analytic
    converted = [row for row in report["layers"] if row.get("rule") == feedback["rule"]]
    assert converted and all(sum(row["analytic"].values()) > 0 for row in converted)

    for extra in ([], ["--memory"]):
        code, out, err = run_cli(capsys, "bench", recipe, "--ranks", "2", "--steps", "1",
                                 "--warmup", "0", "--device", "cpu", "--json", *extra)  # fmt: skip
        assert code == 0, err
        assert [row["variant"] for row in json.loads(out)["rows"]][1] == f"{feedback['rule']} r=2"
    return report


def test_a_rule_of_this_file_alone_trains_resumes_counts_and_benches(capsys, tmp_path):
    report = _trains_resumes_counts_and_benches(
        capsys, tmp_path, {"rule": "test_redrawn", "rank": 3, "options": {"every": 3}}
    )
    resets = {row["row"]: row["rule"] for row in report["extra"]}["(feedback reset)"]
    assert resets > 0  # the redraw's ops (the matched init's singular values), amortised


def test_the_reset_hook_runs_when_due_and_a_resume_draws_the_same():
    from ldfa_cli.feedback import reset_due

    layer = LDFALinear(6, 5, rule="test_redrawn", rank=2, every=3)
    first = layer.feedback_Q.clone()
    assert reset_due(layer, step=2) == 0 and torch.equal(layer.feedback_Q, first)
    assert reset_due(layer, step=3) == 1 and not torch.equal(layer.feedback_Q, first)
    drawn = layer.feedback_Q.clone()
    reset_due(layer, step=3)  # the same step draws the same factors
    assert torch.equal(layer.feedback_Q, drawn)


def readme_rule() -> str:
    """The README's example plugin file, verbatim."""
    text = README.read_text()
    return re.search(r"```python\n(# my_rule\.py.*?)```", text, re.S).group(1)


@pytest.fixture(scope="session")
def plugin_file(tmp_path_factory) -> Path:
    """One file for the session: a second file registering the same name is refused."""
    path = tmp_path_factory.mktemp("plugin") / "my_rule.py"
    path.write_text(readme_rule())
    return path


@pytest.fixture()
def plugin(plugin_file, monkeypatch) -> Path:
    monkeypatch.chdir(plugin_file.parent)  # the README's relative path, from here
    return plugin_file


def test_the_readme_plugin_trains_resumes_counts_and_benches(capsys, tmp_path, plugin):
    _trains_resumes_counts_and_benches(
        capsys, tmp_path, {"plugins": ["my_rule.py"], "rule": "fixed_q", "rank": 3}
    )
    saved = (tmp_path / "whole" / "config.yaml").read_text()
    assert str(plugin) in saved  # the absolute path, so that a resume finds it anywhere
    code, out, _ = run_cli(capsys, "rules", "--plugin", plugin, "--json")
    assert code == 0 and "fixed_q" in {row["rule"] for row in json.loads(out)}


def test_the_readme_plugin_learns_its_equation(plugin):
    # P.grad after the backward is dL/dP of 1/2 ||QP - W^T||^2 = Q^T (QP - W^T); Q fixed
    from ldfa_cli.feedback import backward_with_rules, load_plugins

    load_plugins([plugin])
    layer = LDFALinear(7, 5, rule="fixed_q", rank=3)
    x = torch.randn(4, 7, requires_grad=True)
    backward_with_rules(layer, layer(x).square().sum(), step=0)
    Q, P, W = layer.feedback_Q, layer.feedback_P.detach(), layer.weight.detach()
    torch.testing.assert_close(layer.feedback_P.grad, Q.t() @ (Q @ P - W.t()))
    assert not layer.feedback_Q.requires_grad
    expected = analytic(layer, samples=4)["feedback_update"]
    assert expected == 2 * 3 * 5 * 7 + 2 * 9 * 7 + 2 * 9 * 5


@pytest.mark.parametrize(("text", "words"), [
    (None, ["is not a file"]),
    ("txt", ["is not a Python file", ".py"]),  # (a file with another suffix)
    ("import no_such_module_here\n", ["failed to import", "ModuleNotFoundError"]),
    ("def broken(:\n", ["failed to import", "SyntaxError"]),
    ("from dataclasses import dataclass\nfrom typing import ClassVar\n"
     "from ldfa_cli.feedback import Rule, register\n\n@register\n@dataclass(frozen=True)\n"
     "class Again(Rule):\n    name: ClassVar[str] = 'ldfa'\n",
     ["failed to import", "'ldfa' is already registered"]),
])  # fmt: skip
def test_a_plugin_that_cannot_be_used_is_a_one_line_error(capsys, tmp_path, text, words):
    path = tmp_path / ("bad_rule.txt" if text == "txt" else "bad_rule.py")
    if text is not None:
        path.write_text(text)
    recipe = write_recipe(tmp_path / "r.yaml", MODEL,
                          {"plugins": [str(path)], "rule": "ldfa", "rank": 2})  # fmt: skip
    for command in (["train", recipe, "--out", tmp_path / "run"], ["flops", recipe],
                    ["rules", "--plugin", path]):  # fmt: skip
        code, _, err = run_cli(capsys, *command)
        line = err.strip()
        assert code == 2 and "\n" not in line and "Traceback" not in line, err
        assert str(path.name) in line and all(w in line for w in words), line
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    from ldfa_cli.feedback import RULES

    assert RULES["ldfa"].__module__ == "ldfa_cli.feedback.normative"  # nothing replaced
