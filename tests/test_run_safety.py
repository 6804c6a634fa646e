"""Runs that never lose work: a command that fails damages no run folder and leaves none
behind, --overwrite replaces a run only once the new one has a checkpoint, a kill -9 or a
SIGTERM mid-epoch resumes to the very evaluations of an unbroken run, and a metrics line
cut short by a kill is skipped and repaired."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldfa_cli.engine.metrics import read_metrics
from tests.helpers import run_cli
from tests.test_train import write_recipe

MLP = ({"name": "mlp", "widths": [16]}, {"rule": "ldfa", "rank": 2})


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under the folder (hidden ones too) with its content's hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture()
def finished_run(capsys, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", *MLP)
    run = tmp_path / "run"
    assert run_cli(capsys, "train", recipe, "--out", run, "--device", "cpu")[0] == 0
    return recipe, run


@pytest.mark.parametrize("bad", [
    ["--device", "tpu"],
    ["data.dataset=mnist", "data.root=/nonexistent", "data.download=false", "--device", "cpu"],
    ["output.tensorboard=true", "--device", "cpu"],
])  # fmt: skip
def test_an_overwrite_that_cannot_start_leaves_the_run_as_it_was(
    capsys, monkeypatch, tmp_path, finished_run, bad
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    recipe, run = finished_run
    before = fingerprint(run)
    code, _, err = run_cli(capsys, "train", recipe, "--out", run, "--overwrite", *bad)
    assert code == 2 and "\n" not in err.strip(), err
    assert fingerprint(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "run"]


@pytest.mark.parametrize("bad", [
    ["--device", "cuda"],
    ["data.dataset=mnist", "data.root=/nonexistent", "data.download=false", "--device", "cpu"],
    ["output.tensorboard=true", "--device", "cpu"],
])  # fmt: skip
def test_a_run_that_cannot_start_leaves_no_folder(capsys, monkeypatch, tmp_path, bad):
    if "cuda" in bad and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    recipe = write_recipe(tmp_path / "r.yaml", *MLP, output={"dir": str(tmp_path / "runs")})
    for out in (["--out", tmp_path / "run"], []):  # given, and the default runs/<recipe>/<time>
        code, _, err = run_cli(capsys, "train", recipe, *out, *bad)
        assert code == 2 and "\n" not in err.strip(), err
        assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_overwrite_replaces_the_run_only_once_the_new_one_has_a_checkpoint(
    capsys, tmp_path, finished_run
):
    recipe, run = finished_run
    before = fingerprint(run)
    # the new run diverges before its first checkpoint: the old run comes back whole
    code, _, err = run_cli(capsys, "train", recipe, "--out", run, "--overwrite", "optim.lr=1e30",
                           "train.log_every=1", "--device", "cpu")  # fmt: skip
    assert code == 1 and "training loss became" in err and "nothing was overwritten" in err
    assert fingerprint(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "run"]
    # a new run that gets going replaces it, and nothing of the old one is left beside it
    code, _, err = run_cli(capsys, "train", recipe, "--out", run, "--overwrite", "train.seed=7",
                           "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert "seed: 7" in (run / "config.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "run"]


SLOW_RULE = '''\
import time
from dataclasses import dataclass
from typing import ClassVar

from ldfa_cli.feedback import register
from ldfa_cli.feedback.fa import LowRankFeedbackAlignment


@register
@dataclass(frozen=True)
class Slow(LowRankFeedbackAlignment):
    """lowrank_fa with a pause after every backward: time to signal a run mid-epoch."""

    name: ClassVar[str] = "slow_lowrank_fa"

    @classmethod
    def after_backward(cls, layers, step):
        time.sleep(0.05)
'''


def _evaluations(run: Path) -> list[tuple]:
    return [(e["step"], e["acc"], e["loss"], e["per_class_acc"])
            for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval"]  # fmt: skip


def _ldfa(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ldfa_cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for_step(run: Path, process: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and any(e.get("step", 0) >= step
                                     for e in read_metrics(metrics, warn=False)):  # fmt: skip
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step}: {process.communicate()}")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_run_killed_mid_epoch_resumes_to_the_evaluations_of_an_unbroken_run(tmp_path, how):
    (tmp_path / "slow_rule.py").write_text(SLOW_RULE)
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "mlp", "widths": [16]},
                          {"plugins": [str(tmp_path / "slow_rule.py")],
                           "rule": "slow_lowrank_fa", "rank": 2},
                          train={"epochs": 2, "batch_size": 16, "log_every": 1,
                                 "deterministic": True, "checkpoint_every_steps": 3},
                          data={"subset": 160})  # 10 steps an epoch  # fmt: skip
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    process = _ldfa("train", recipe, "--out", whole, "--device", "cpu")
    assert process.wait(timeout=300) == 0, process.communicate()

    process = _ldfa("train", recipe, "--out", broken, "--device", "cpu")
    _wait_for_step(broken, process, 5)  # epoch 1, past the checkpoint at step 3
    process.send_signal(getattr(signal, how))
    _, err = process.communicate(timeout=120)
    if how == "SIGKILL":
        assert process.returncode == -signal.SIGKILL
    else:  # the step finishes, last.pt is written there, the resume command is printed
        assert process.returncode == 143, err
        assert f"ldfa train --resume {broken}" in " ".join(err.split())
    progress = torch.load(broken / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert progress["epoch"] == 0 and progress["batch_in_epoch"] >= 3  # mid-epoch
    resumed = _ldfa("train", "--resume", broken, "--device", "cpu")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    assert _evaluations(broken) == _evaluations(whole) and len(_evaluations(whole)) == 2


def test_a_metrics_line_cut_short_is_skipped_and_a_resume_repairs_it(capsys, tmp_path,
                                                                    finished_run):  # fmt: skip
    recipe, run = finished_run
    metrics = run / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"event": "train", "step": 9, "loss": 0.1')  # a kill mid-write
    for command in (["plot", run, "--out", tmp_path / "c.png"], ["flops", run, "--json"]):
        code, _, err = run_cli(capsys, *command)
        assert code == 0, err
        assert "last line is cut short" in err and str(metrics) in " ".join(err.split())
    code, _, err = run_cli(capsys, "train", "--resume", run, "train.epochs=2", "--device", "cpu")
    assert code == 0, err
    events = [json.loads(line) for line in metrics.read_text().splitlines()]  # all whole
    assert [e["event"] for e in events].count("eval") == 2

    metrics.write_text("not json\n" + whole)  # a damaged line before the end: named, exit 2
    code, _, err = run_cli(capsys, "plot", run, "--out", tmp_path / "d.png")
    assert code == 2 and "line 1 is not JSON" in err and "\n" not in err.strip()
    assert os.path.exists(tmp_path / "c.png")


def test_runs_that_differ_but_for_the_seed_are_apart_and_a_repeated_seed_counts_once(
    capsys, tmp_path
):
    recipe = write_recipe(tmp_path / "r.yaml", *MLP, train={"epochs": 2})
    for name, overrides in (("lr_small", ["optim.lr=0.0001"]), ("lr_large", ["optim.lr=0.01"]),
                            ("again", ["optim.lr=0.01"])):  # fmt: skip
        code, _, err = run_cli(capsys, "train", recipe, *overrides, "--out", tmp_path / name,
                               "--device", "cpu")  # fmt: skip
        assert code == 0, err
    code, out, err = run_cli(capsys, "flops", tmp_path / "lr_small", tmp_path / "lr_large",
                             tmp_path / "again", "--json")  # fmt: skip
    assert code == 0, err
    groups = json.loads(out)["groups"]
    assert sorted(g["setting"] for g in groups) == ["optim.lr=0.0001", "optim.lr=0.01"]
    assert [g["seeds"] for g in groups] == [1, 1]  # seed 0 twice is one seed
    assert "repeats seed 0" in " ".join(err.split())


def test_a_sweeps_printed_next_command_runs_and_runs_again(capsys, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", *MLP)
    code, _, err = run_cli(capsys, "sweep", recipe, "optim.lr=0.001,0.01", "--out",
                           tmp_path / "s", "--jobs", "2", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    hint = " ".join(err.split()).split("sweep done: ", 1)[1].split()
    assert hint[:2] == ["ldfa", "flops"]
    for _ in range(2):  # the second time, the plot it wrote lies beside the runs
        code, _, err = run_cli(capsys, *hint[1:])
        assert code == 0, err
    glob = sorted((tmp_path / "s").iterdir())  # the runs, their logs, the plot
    code, _, err = run_cli(capsys, "plot", *glob, "--out", tmp_path / "curves.png")
    assert code == 0 and "not run folders" in err, err


def test_a_sigterm_to_a_parallel_sweep_reaches_every_point_and_the_command_resumes(tmp_path):
    # slower steps than the other tests': the two points start seconds apart (imports), and
    # the first must still be running when the second reaches step 2
    (tmp_path / "slow_rule.py").write_text(SLOW_RULE.replace("sleep(0.05)", "sleep(0.3)"))
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "mlp", "widths": [16]},
                          {"plugins": [str(tmp_path / "slow_rule.py")],
                           "rule": "slow_lowrank_fa", "rank": 2},
                          train={"epochs": 2, "batch_size": 16, "log_every": 1},
                          data={"subset": 160})  # fmt: skip
    sweep = ["sweep", recipe, "optim.lr=0.001,0.002", "--out", tmp_path / "s", "--jobs", "2",
             "--device", "cpu"]  # fmt: skip
    process = _ldfa(*sweep)
    for name in ("lr=0.001", "lr=0.002"):
        _wait_for_step(tmp_path / "s" / name, process, 2)
    process.send_signal(signal.SIGTERM)  # to the sweep alone, as a scheduler may
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "sweep stopped by SIGTERM" in err, err
    for name in ("lr=0.001", "lr=0.002"):
        assert (tmp_path / "s" / name / "checkpoints" / "last.pt").is_file()
        assert "stopped by SIGTERM" in (tmp_path / "s" / f"{name}.log").read_text()
    again = _ldfa(*sweep)
    assert again.wait(timeout=300) == 0, again.communicate()


def test_a_start_that_fails_once_the_folder_is_made_takes_it_away_again(
    capsys, monkeypatch, tmp_path, finished_run
):
    import ldfa_cli.engine.loop as loop

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "write_run_files", full_disk)
    recipe, run = finished_run
    before = fingerprint(run)
    assert run_cli(capsys, "train", recipe, "--out", tmp_path / "new", "--device", "cpu")[0] == 1
    assert not (tmp_path / "new").exists()
    assert run_cli(capsys, "train", recipe, "--out", run, "--overwrite", "--device", "cpu")[0] == 1
    assert fingerprint(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "run"]


def test_a_sweep_replaces_only_its_own_unfinished_starts(capsys, tmp_path, finished_run):
    recipe, run = finished_run
    before = fingerprint(run)
    axis = "optim.lr=0.001,0.002"
    code, _, err = run_cli(capsys, "sweep", recipe, axis, "--out", run, "--device", "cpu")
    assert code == 2 and "is a run folder" in err and fingerprint(run) == before
    sweep = tmp_path / "s"
    (sweep / "lr=0.002").mkdir(parents=True)
    (sweep / "lr=0.002" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "sweep", recipe, axis, "--out", sweep, "--device", "cpu")
    assert code == 2 and "not this point's run" in err  # refused before any point runs
    assert sorted(p.name for p in sweep.iterdir()) == ["lr=0.002"]
    assert (sweep / "lr=0.002" / "notes.txt").read_text() == "mine"
    (sweep / "lr=0.002" / "notes.txt").unlink()
    assert run_cli(capsys, "sweep", recipe, "optim.lr=0.002", "--out", sweep,
                   "--device", "cpu")[0] == 0  # fmt: skip
    for path in (sweep / "lr=0.002" / "checkpoints").iterdir():
        path.unlink()  # as a start killed before its first checkpoint leaves it
    code, _, err = run_cli(capsys, "sweep", recipe, axis, "--out", sweep, "--device", "cpu")
    assert code == 0 and "lr=0.002: training" in err, err  # its own start: started again
    assert (sweep / "lr=0.002" / "checkpoints" / "last.pt").is_file()


def test_a_resume_checks_env_json_before_it_trains(capsys, finished_run):
    _, run = finished_run
    (run / "env.json").write_text("{bad")
    before = fingerprint(run)
    code, _, err = run_cli(capsys, "train", "--resume", run, "train.epochs=2", "--device", "cpu")
    assert code == 2 and "env.json is not a JSON object" in err
    assert fingerprint(run) == before  # no epoch trained, no metrics appended
