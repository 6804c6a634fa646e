"""How a rank is read (1 is rank 1, 1.0 is full rank), said once and everywhere; a rank
above a layer's full rank is clipped and the layers named; bench labels the ranks used."""

import json

import torch
from torch import nn

from ldfa_cli.feedback import conversion_report, convert
from ldfa_cli.feedback.rule import RANK_NOTE
from tests.helpers import run_cli


def test_an_int_is_the_rank_and_a_float_a_fraction():
    def ranks(spec):
        model = convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), "ldfa",
                        rank=spec)  # fmt: skip
        return [row.rank for row in conversion_report(model).converted]

    assert ranks(1) == [1, 1] and ranks(1.0) == [6, 4] and ranks(0.5) == [4, 2]
    assert "1 is rank 1" in RANK_NOTE and "1.0 is full rank" in RANK_NOTE


def test_clipping_is_named_in_the_report_on_the_dry_run_and_in_the_bench(capsys):
    model = convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), "ldfa", rank=5)
    report = conversion_report(model)
    assert [row.asked for row in report.rows] == [None, 5]  # full ranks 6 and 4
    assert report.clipped_note().endswith("of 1 layer(s), clipped to it: 2 (5 -> 4)")
    code, out, err = run_cli(capsys, "train", "quickstart", "feedback.rank=100000", "--dry-run",
                             "--device", "cpu")  # fmt: skip
    assert code == 0  # the note is a warning (stderr); the table is the result (stdout)
    assert "clipped to it: fc2 (100000 -> 256), head (100000 -> 10)" in " ".join(err.split())
    assert "100000 asked" in " ".join(out.split())
    code, out, err = run_cli(capsys, "bench", "quickstart", "model.widths=[8,8]", "--ranks",
                             "3,100", "--steps", "1", "--warmup", "0", "--device", "cpu",
                             "--json")  # fmt: skip
    assert code == 0, err
    labels = [row["variant"] for row in json.loads(out)["rows"]]
    assert labels == ["bp", "ldfa_local r=3", "ldfa_local r=100 (used 8)"]


def test_the_rules_listing_and_the_schema_say_how_a_rank_is_read(capsys):
    code, out, _ = run_cli(capsys, "rules")
    assert code == 0 and RANK_NOTE in out
    code, _, err = run_cli(capsys, "train", "quickstart", "feedback.rank=0", "--print-config")
    assert code == 2 and "1 is rank 1" in err and "1.0 is full rank" in err
    assert torch.tensor(1.0).item() == 1  # (a float 1.0 equals 1, but reads as full rank)
