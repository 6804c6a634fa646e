"""torchrun with 2 CPU processes (gloo) against one process at the same global batch, and
Ctrl-C writing a checkpoint that --resume continues from."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ldfa_cli.engine.metrics import read_metrics
from tests.helpers import run_cli


def _recipe(path, feedback):
    path.write_text(yaml.safe_dump({
        "description": "torchrun test",
        "model": {"name": "mlp", "widths": [32, 32]},
        "feedback": feedback,
        "data": {"dataset": "digits", "subset": 256, "val_fraction": 0},  # 4 whole batches
        "train": {"epochs": 2, "batch_size": 64, "log_every": 1, "deterministic": True},
    }))  # fmt: skip
    return path


def _torchrun(recipe, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "ldfa_cli", "train", str(recipe), "--out", str(out),
               "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(run):
    return [(e["event"], e["step"], e["loss"]) for e in read_metrics(run / "metrics.jsonl")
            if e["event"] in ("train", "eval")]  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("feedback", [{"rule": "ldfa", "rank": 4},
                                      {"rule": "ldfa_local", "rank": 4,
                                       "options": {"learn_q": True}}])  # fmt: skip
def test_two_nodes_on_localhost_keep_every_tensor_identical(capsys, tmp_path, feedback):
    """Two "nodes" of one process each, joined by c10d rendezvous on 127.0.0.1 (as
    `torchrun --nnodes 2 --node-rank K --rdzv-endpoint HOST:PORT` on two machines): every
    parameter and buffer, feedback factors included, is the same on both at the end, and
    the normative rule trains as one process does."""
    recipe = _recipe(tmp_path / "r.yaml", feedback)
    port, out = _free_port(), tmp_path / "nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={k}",
         "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         "--rdzv-id=ldfa-test", "-m", "ldfa_cli", "train", str(recipe), "--out",
         str(out), "--device", "cpu"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in (0, 1)]  # fmt: skip
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    (replicas,) = [e for e in read_metrics(out / "metrics.jsonl") if e["event"] == "replicas"]
    assert replicas["ranks"] == 2 and replicas["identical"] and replicas["differing"] == []
    if feedback["rule"] == "ldfa":
        assert run_cli(capsys, "train", recipe, "--out", tmp_path / "one", "--device",
                       "cpu")[0] == 0  # fmt: skip
        for (_, _, a), (_, _, b) in zip(_losses(tmp_path / "one"), _losses(out), strict=True):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("feedback", [
    {"rule": "bp"},
    {"rule": "ldfa", "rank": 4},
    {"rule": "dfa"},
    {"rule": "svd_dfa", "rank": 8},  # + its orthogonality loss and cosine alignment
    {"rule": "ldfa_kp", "rank": 4},  # factors' grads linear in the mean loss's dW
])  # fmt: skip
def test_torchrun_matches_single_process(capsys, tmp_path, feedback):
    """These rules depend on the batch only through the mean loss (svd_dfa's orthogonality
    term not at all, its cosine alignment through a mean over samples), so two ranks each
    taking half of every global batch reproduce the single-process run."""
    recipe = _recipe(tmp_path / "r.yaml", feedback)
    assert run_cli(capsys, "train", recipe, "--out", tmp_path / "one", "--device", "cpu")[0] == 0
    _torchrun(recipe, tmp_path / "two")
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [e[:2] for e in one] == [e[:2] for e in two] and len(one) == 2 * 4 + 2
    for (_, _, a), (_, _, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("feedback", [
    {"rule": "ldfa_local", "rank": 4, "options": {"learn_q": True}},
    {"rule": "dldfa", "rank": 4},
    {"rule": "svd_dfa", "rank": 8, "options": {"align_loss": "subspace"}},
])  # fmt: skip
def test_torchrun_per_batch_rules_first_step_equal_then_close(capsys, tmp_path, feedback):
    """Oja's update uses each rank's own centred covariance and gamma, and svd_dfa's
    subspace alignment each rank's own ||g||^2; DDP averages the resulting gradients (see README,
    'Distributed'): the first step is the single-process step; later ones stay close but
    need not be equal."""
    recipe = _recipe(tmp_path / "r.yaml", feedback)
    assert run_cli(capsys, "train", recipe, "--out", tmp_path / "one", "--device", "cpu")[0] == 0
    _torchrun(recipe, tmp_path / "two")
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert two[0][2] == pytest.approx(one[0][2], rel=1e-5)
    for (_, _, a), (_, _, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=0.1)


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "description": "interrupt test", "model": {"name": "mlp", "widths": [64]},
        "data": {"dataset": "digits", "val_fraction": 0},
        "train": {"epochs": 400, "batch_size": 16, "log_every": 1},
    }))  # fmt: skip
    run = tmp_path / "run"
    command = [sys.executable, "-m", "ldfa_cli", "train", str(recipe), "--out", str(run),
               "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "last.pt").is_file():
        time.sleep(0.2)  # wait until at least one epoch is done
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "continue with: ldfa train --resume" in " ".join(err.split())
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]
    finish = stopped["epoch"] + 1  # finish the interrupted epoch, wherever it stopped
    resume = subprocess.run([sys.executable, "-m", "ldfa_cli", "train", "--resume", str(run),
                             f"train.epochs={finish}", "--device", "cpu", "--json"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resume.returncode == 0, resume.stderr[-2000:]
    done = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert (done["epoch"], done["batch_in_epoch"]) == (finish, 0)
    assert done["step"] == finish * 90  # 1438 digits / batch 16 = 90 steps an epoch
    events = read_metrics(run / "metrics.jsonl")
    steps = [e["step"] for e in events]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + finish  # + eval events


def test_a_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    # torchrun passes SIGTERM to its workers; they finish the step in progress and stop
    # together at the next step where they sum their logs, rank 0 writing last.pt there
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "mlp", "widths": [64]}, "feedback": {"rule": "ldfa", "rank": 4},
        "data": {"dataset": "digits", "val_fraction": 0},
        "train": {"epochs": 400, "batch_size": 16, "log_every": 3},
    }))  # fmt: skip
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "ldfa_cli", "train", str(recipe), "--out", str(run),
               "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not any(e.get("step", 0) >= 30 for e in _events(run)):
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert "stopped by SIGTERM: checkpoint written at step" in " ".join(err.split()), err[-3000:]
    progress = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert progress["step"] >= 30 and progress["step"] % 3 == 0  # where the ranks agreed


def _events(run):
    metrics = run / "metrics.jsonl"
    return read_metrics(metrics, warn=False) if metrics.is_file() else []
