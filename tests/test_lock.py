"""The lock (requirements/lock.txt): it pins every dependency, agrees with pyproject.toml's
ranges, runs record their stack against it, and scripts/update-lock rewrites it only after
the suite passed."""

import importlib.machinery
import importlib.util
import json
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from ldfa_cli.lock import (
    LOCK_FILE,
    RECORDED,
    compare_with_lock,
    environment_report,
    installed_versions,
    normalise,
    read_lock,
)

ROOT = Path(__file__).resolve().parents[1]


def _requirement_closure(root: str, extras: set[str]) -> set[str]:
    """Every distribution ``root[extras]`` needs on this platform, transitively, from the
    installed packages' own metadata (environment markers evaluated)."""
    seen, todo = set(), [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            marker = requirement.marker
            environments = [{**default_environment(), "extra": e} for e in (wanted or {""})]
            if marker is not None and not any(marker.evaluate(env) for env in environments):
                continue
            key = normalise(requirement.name)
            if key not in seen:
                seen.add(key)
                todo.append((requirement.name, frozenset(requirement.extras)))
    return seen


def test_the_lock_pins_every_dependency_of_the_project_and_its_tests():
    pins, header = read_lock()
    needed = _requirement_closure("ldfa-cli", {"test"})
    assert needed, "ldfa-cli's metadata lists its requirements"
    missing = sorted(needed - set(pins))
    assert not missing, f"not in {LOCK_FILE.name} (run scripts/update-lock): {missing}"
    assert header["python"].count(".") == 1 and set(RECORDED) <= set(pins)


def test_every_locked_version_is_within_pyproject_ranges():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins, _ = read_lock()
    direct = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    for text in direct:
        requirement = Requirement(text)
        locked = pins[normalise(requirement.name)]
        assert requirement.specifier.contains(locked, prereleases=True), (text, locked)


def test_compare_with_lock_reports_other_versions_but_not_absent_platform_wheels():
    pins = {"torch": "2.14.1", "numpy": "2.4.6", "nvidia-cublas": "13.1.1.3"}
    installed = {"torch": "2.14.1", "numpy": "2.3.0", "rich": "15.0.0"}
    assert compare_with_lock(installed, pins) == {
        "numpy": {"installed": "2.3.0", "locked": "2.4.6"}
    }


def _lock_of(versions: dict, path: Path, python: str) -> Path:
    path.write_text(f"# python: {python}\n" + "".join(f"{n}=={v}\n" for n, v in versions.items()))
    return path


def test_environment_report_matches_a_lock_of_this_environment_and_names_a_difference(tmp_path):
    import platform

    python = ".".join(platform.python_version().split(".")[:2])
    here = installed_versions()
    report = environment_report(_lock_of(here, tmp_path / "same.txt", python))
    assert report["lock"]["matches"] is True and report["lock"]["differs"] == {}
    assert set(report["versions"]) == set(RECORDED) and report["python"].startswith(python)
    assert report["versions"]["torch"] == here["torch"]

    other = {**here, "torch": "0.0.1"}
    report = environment_report(_lock_of(other, tmp_path / "other.txt", "2.7"))
    assert report["lock"]["matches"] is False
    assert report["lock"]["differs"]["torch"] == {"installed": here["torch"], "locked": "0.0.1"}
    assert report["lock"]["differs"]["python"]["locked"] == "2.7"

    report = environment_report(tmp_path / "absent.txt")
    assert report["lock"]["matches"] is None and "wheel" in report["lock"]["note"]


def test_a_malformed_lock_line_is_named(tmp_path):
    bad = tmp_path / "lock.txt"
    bad.write_text("torch==2.14.1\ntimm>=1\n")
    with pytest.raises(ValueError, match=r"lock.txt:2: expected 'name==version'"):
        read_lock(bad)


def test_a_run_records_its_stack_and_the_lock_in_env_json(capsys, tmp_path):
    from tests.helpers import run_cli
    from tests.test_train import FAMILIES, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", *FAMILIES["mlp"])
    code, _, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 0, err
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert set(RECORDED) <= set(env["versions"]) and env["python"]
    assert env["versions"]["torch"] == metadata.version("torch")
    assert env["lock"]["file"] == str(LOCK_FILE) and isinstance(env["lock"]["matches"], bool)


# --------------------------------------------------------------------- scripts/update-lock
def _update_lock_module():
    loader = importlib.machinery.SourceFileLoader("update_lock", str(ROOT / "scripts/update-lock"))
    spec = importlib.util.spec_from_loader("update_lock", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


FREEZE = "pip==26.3\ntorch==9.0.0\nPyYAML==7.0\ntimm==2.0.0\n"


class _FakeRun:
    """Stands in for subprocess.run: records the commands; ``fails`` names the one that
    fails (matched against the command line)."""

    def __init__(self, fails: str | None = None):
        self.fails, self.commands, self.envs = fails, [], []

    def __call__(self, command, env=None, **kwargs):
        line = " ".join(command)
        self.commands.append(line)
        self.envs.append(env or {})
        out = ""
        if "freeze" in line:
            out = FREEZE
        elif "platform" in line:
            out = "3.11.7\n"
        elif "pip.__version__" in line:
            out = "26.3\n"
        code = 1 if self.fails and self.fails in line else 0
        return subprocess.CompletedProcess(command, code, stdout=out, stderr="")


@pytest.mark.parametrize("failing", ["pip install", "-m pytest", "ruff check", "format --check"])
def test_update_lock_leaves_the_lock_alone_when_a_step_fails(tmp_path, failing):
    module = _update_lock_module()
    lock = tmp_path / "lock.txt"
    lock.write_text("torch==2.14.1\n")
    run = _FakeRun(fails=failing)
    assert module.update_lock(tmp_path / "venv", "python3", run=run, lock=lock) == 1
    assert lock.read_text() == "torch==2.14.1\n"
    assert failing in run.commands[-1]  # it stopped at the failing step


def test_update_lock_installs_without_the_lock_then_tests_then_writes_it(tmp_path, capsys):
    module = _update_lock_module()
    lock = tmp_path / "lock.txt"
    lock.write_text("torch==2.14.1\ntimm==2.0.0\n")
    run = _FakeRun()
    assert module.update_lock(tmp_path / "venv", "python3", run=run, lock=lock) == 0
    install = next(c for c in run.commands if "pip install" in c)
    assert "-c" not in install.split() and ".[test]" in install  # the newest allowed versions
    order = [next(i for i, c in enumerate(run.commands) if key in c)
             for key in ("pip install", "freeze", "-m pytest", "ruff check")]  # fmt: skip
    assert order == sorted(order)  # the candidate frozen, then tested, then written
    suite = next(i for i, c in enumerate(run.commands) if "-m pytest" in c)
    candidate = Path(run.envs[suite]["LDFA_LOCK_FILE"])  # the suite checks the candidate
    assert read_lock(candidate)[0] == {"pyyaml": "7.0", "timm": "2.0.0", "torch": "9.0.0"}
    pins, header = read_lock(lock)
    assert pins == {"pyyaml": "7.0", "timm": "2.0.0", "torch": "9.0.0"}  # no pip, no ldfa-cli
    assert header["python"] == "3.11"
    assert "torch: 2.14.1 -> 9.0.0" in capsys.readouterr().out
