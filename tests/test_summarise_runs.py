"""scripts/summarise-runs: the results tables' rows from run folders."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "summarise-runs"


def _run(folder: Path, seed: int, accs: list[float], epochs: int = 2, rank: int = 8,
         **last_eval) -> None:  # fmt: skip
    folder.mkdir(parents=True)
    config = {"feedback": {"rule": "ldfa", "rank": rank}, "train": {"epochs": epochs, "seed": seed}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    events = []
    for epoch, acc in enumerate(accs, start=1):
        events.append({"event": "train", "epoch": epoch, "step": 10 * epoch,
                       "train_flops": 1e12 * epoch, "time_s": 5.0 * epoch})  # fmt: skip
        events.append({"event": "eval", "epoch": float(epoch), "step": 10 * epoch, "acc": acc,
                       "train_flops": 1e12 * epoch, "time_s": 5.0 * epoch + 1})  # fmt: skip
    events[-1].update(last_eval)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_rows_group_seeds_and_skip_unfinished_runs(tmp_path):
    _run(tmp_path / "s" / "seed=0", 0, [0.5, 0.80])
    _run(tmp_path / "s" / "seed=1", 1, [0.5, 0.84])
    _run(tmp_path / "s" / "seed=2", 2, [0.5])  # stopped after one of two epochs
    _run(tmp_path / "s" / "rank=4_seed=0", 0, [0.5, 0.70], rank=4)
    done = subprocess.run([sys.executable, SCRIPT, *sorted((tmp_path / "s").iterdir()),
                           "--archive", tmp_path / "archive"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    rows = [line for line in done.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == 2 and "seed=2: not finished" in done.stderr
    two_seeds = next(r for r in rows if "| 2 |" in r)
    assert "82.00 ± 2.83" in two_seeds and "80.00, 84.00" in two_seeds
    assert "| 11 | 2.00 |" in two_seeds  # wall time of the last event, TFLOPs after the last step
    archived = tmp_path / "archive" / "s" / "seed=1"
    assert sorted(p.name for p in archived.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_a_lower_is_better_metric_with_its_validation_column(tmp_path):
    _run(tmp_path / "t" / "seed=0", 0, [0.3, 0.5], bpc=1.80, val_bpc=1.70)
    _run(tmp_path / "t" / "seed=1", 1, [0.3, 0.5], bpc=1.90, val_bpc=1.72)
    runs = sorted((tmp_path / "t").iterdir())
    done = subprocess.run([sys.executable, SCRIPT, *runs, "--metric", "bpc"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert "| test bpc | per seed | val bpc |" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("| `"))
    assert "| 1.850 ± 0.071 | 1.800, 1.900 | 1.710 ± 0.014 |" in row


def test_a_metric_the_runs_lack_is_one_line(tmp_path):
    _run(tmp_path / "s" / "seed=0", 0, [0.5, 0.8])
    done = subprocess.run([sys.executable, SCRIPT, tmp_path / "s" / "seed=0", "--metric", "bpc"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0 and "have no 'bpc'" in done.stderr
    assert "Traceback" not in done.stderr


def test_last_n_averages_each_run_s_last_evaluations(tmp_path):
    _run(tmp_path / "s" / "seed=0", 0, [0.5, 0.7, 0.9], epochs=3)
    done = subprocess.run([sys.executable, SCRIPT, tmp_path / "s" / "seed=0", "--last", "2"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert "(mean of the last 2 evaluations)" in done.stdout and "| 80.00 |" in done.stdout


def test_at_epochs_tables_each_row_s_validation_metric_over_its_seeds(tmp_path):
    _run(tmp_path / "s" / "seed=0", 0, [0.5, 0.7, 0.9], epochs=3)
    _run(tmp_path / "s" / "seed=1", 1, [0.6, 0.7, 0.8], epochs=3, val_acc=0.85)
    runs = sorted((tmp_path / "s").iterdir())
    done = subprocess.run([sys.executable, SCRIPT, *runs, "--at", "1,3,4"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert "| runs | seeds | 1 | 3 | 4 |" in done.stdout
    row = done.stdout.split("| runs | seeds | 1 | 3 | 4 |")[1].splitlines()[2]
    # epoch 3: seed 0's test 90 (no validation logged), seed 1's validation 85; no epoch 4
    assert row.endswith("| 2 | 55.00 ± 7.07 | 87.50 ± 3.54 | - |"), row
    bad = subprocess.run([sys.executable, SCRIPT, *runs, "--at", "one"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "takes numbers like" in bad.stderr


def test_at_tflops_takes_each_run_s_evaluation_nearest_the_mark(tmp_path):
    _run(tmp_path / "s" / "seed=0", 0, [0.5, 0.7, 0.9], epochs=3)  # evaluated at 1-3 TFLOPs
    done = subprocess.run([sys.executable, SCRIPT, tmp_path / "s" / "seed=0", "--at-tflops",
                           "1.2,2.9,5", "--within", "0.5"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    row = done.stdout.split("| runs | seeds | 1.2 | 2.9 | 5 |")[1].splitlines()[2]
    assert row.endswith("| 1 | 50.00 | 90.00 | - |"), row  # 5 TFLOPs: none within 0.5
