"""Every figure's content, read through matplotlib's objects (titles, labels, legends,
panels, colour bars), and the formats they are written in."""

import json

import pytest
import yaml
from helpers import run_cli

from ldfa_cli.analysis import figures
from ldfa_cli.errors import ConfigError


def fake_run(folder, recipe, seed, accs, rule="ldfa", rank=8, dataset="fashion_mnist",
             step_flops=1e9, epochs=None, **options):  # fmt: skip
    """A finished run's records: config, env and one evaluation per epoch."""
    folder.mkdir(parents=True)
    feedback = {"rule": rule, "rank": None if rule == "bp" else rank, **options}
    config = {"feedback": feedback, "data": {"dataset": dataset},
              "train": {"seed": seed, "epochs": epochs or len(accs)}}  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "env.json").write_text(json.dumps({"recipe": recipe}))
    events = [{"event": "eval", "epoch": float(e), "step": 10 * e, "acc": acc, "loss": 1 - acc,
               "train_flops": step_flops * 10 * e, "time_s": 2.0 * e}
              for e, acc in enumerate(accs, start=1)]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return folder


def legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_the_format_comes_from_the_suffix_or_format_and_they_must_agree(tmp_path):
    assert figures.figure_path(tmp_path / "a.pdf") == (tmp_path / "a.pdf", "pdf")
    assert figures.figure_path(tmp_path / "a", "svg") == (tmp_path / "a.svg", "svg")
    assert figures.figure_path(tmp_path / "a") == (tmp_path / "a.png", "png")
    assert figures.figure_path(tmp_path / "a.v2", "pdf") == (tmp_path / "a.v2.pdf", "pdf")
    for out, fmt, says in (("a.png", "pdf", "--format pdf but"), ("a.jpg", None, "not .jpg"),
                           ("a.png", "tiff", "--format must be one of")):  # fmt: skip
        with pytest.raises(ConfigError, match=says):
            figures.figure_path(tmp_path / out, fmt)


def test_flop_units_are_chosen_from_the_numbers():
    assert figures.flop_unit([6e11, 1.6e12]) == (1e12, "TFLOPs")
    assert figures.flop_unit([6e8]) == (1e6, "MFLOPs")
    assert figures.flop_unit([2.5e9, None]) == (1e9, "GFLOPs")
    assert figures.flop_unit([3e16]) == (1e15, "PFLOPs")


def test_plot_averages_seeds_in_a_band_and_names_runs_by_their_setting(capsys, tmp_path, drawn):
    for seed, accs in enumerate(([0.5, 0.7], [0.6, 0.8], [0.7, 0.9])):
        fake_run(tmp_path / "s" / f"20261206-2039{seed:02d}", "mnist_ldfa", seed, accs)
    fake_run(tmp_path / "s" / "20261206-204000", "mnist_ldfa", 0, [0.4, 0.6], rank=2)
    fake_run(tmp_path / "b" / "20261206-204100", "mnist_bp", 0, [0.8, 0.9], rule="bp")
    code, _, err = run_cli(capsys, "plot", tmp_path / "s", tmp_path / "b", "--out",
                           tmp_path / "c.pdf")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "c.pdf").read_bytes().startswith(b"%PDF")
    fig = drawn["c.pdf"]
    metric_ax, loss_ax = fig.axes
    assert metric_ax.get_title() == "fashion_mnist: test accuracy"
    assert metric_ax.get_ylabel() == "test acc (%)" and metric_ax.get_xlabel() == "epoch"
    assert legend_texts(fig) == ["mnist_ldfa (rank=8) (mean ± sd, 3 seeds)",
                                 "mnist_ldfa (rank=2), seed 0", "mnist_bp, seed 0"]  # fmt: skip
    assert not any("2026" in text for text in legend_texts(fig))
    mean = metric_ax.get_lines()[0]
    assert list(mean.get_ydata()) == pytest.approx([60.0, 80.0])
    assert len(metric_ax.collections) == 1  # a band for the seeds' group only
    (band,) = metric_ax.collections
    assert band.get_paths()[0].vertices[:, 1].min() == pytest.approx(50.0)  # mean - sd
    assert metric_ax.get_lines()[2].get_color() == figures.BP_COLOUR


def test_plot_puts_datasets_in_panels_of_their_own_and_flops_in_a_chosen_unit(
    capsys, tmp_path, drawn
):
    fake_run(tmp_path / "a", "mnist_ldfa", 0, [0.5, 0.7], step_flops=1e9)
    fake_run(tmp_path / "b", "digits_ldfa", 0, [0.5, 0.7], dataset="digits", step_flops=1e9)
    code, _, err = run_cli(capsys, "plot", tmp_path / "a", tmp_path / "b", "--x", "flops",
                           "--out", tmp_path / "c", "--format", "svg")  # fmt: skip
    assert code == 0, err
    assert "a row of panels each" in err and (tmp_path / "c.svg").read_text().find("<svg") >= 0
    fig = drawn["c.svg"]
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes[::2]] == ["fashion_mnist: test accuracy",
                                                       "digits: test accuracy"]  # fmt: skip
    assert fig.axes[0].get_xlabel() == "training compute (GFLOPs)"
    code, _, err = run_cli(capsys, "plot", tmp_path / "a", "--out", tmp_path / "c.jpg")
    assert code == 2 and "not .jpg" in err and "\n" not in err.strip()


def test_compute_figure_has_bars_from_zero_and_every_line_in_the_legend(capsys, tmp_path, drawn):
    fake_run(tmp_path / "r8", "vit_r8", 0, [0.5, 0.7, 0.8], step_flops=1e8)
    fake_run(tmp_path / "r4", "vit_r4", 0, [0.4, 0.6, 0.7], rank=4, step_flops=1e8)
    code, _, err = run_cli(capsys, "flops", tmp_path / "r8", tmp_path / "r4", "--plot",
                           tmp_path / "u.pdf")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "u.pdf").read_bytes().startswith(b"%PDF")
    fig = drawn["u.pdf"]
    bars, twin = fig.axes
    assert bars.get_ylim()[0] == 0 and twin.get_ylim()[0] == 0
    assert [t.get_text() for t in bars.get_xticklabels()] == ["r=4", "r=8"]  # no BP slot
    assert twin.get_ylabel().startswith("GFLOPs to 90% of its own final test acc")
    assert twin.yaxis.label.get_color() in ("black", "#000000", (0, 0, 0, 1))
    assert "mean ± 1 sd over seeds" in bars.get_title()
    assert legend_texts(fig) == ["final accuracy: vit", "GFLOPs to target: vit"]

    fake_run(tmp_path / "bp", "vit_bp", 0, [0.6, 0.8, 0.9], rule="bp", step_flops=1e8)
    code, _, err = run_cli(capsys, "flops", tmp_path / "bp", tmp_path / "r8", "--plot",
                           tmp_path / "v.png")  # fmt: skip
    assert code == 0, err
    bars, _ = drawn["v.png"].axes
    assert [t.get_text() for t in bars.get_xticklabels()] == ["BP", "r=8"]
    assert "backprop's GFLOPs to target: vit" in legend_texts(drawn["v.png"])
    assert "final accuracy: backprop" in legend_texts(drawn["v.png"])


def test_theory_figure_names_its_mode_colours(capsys, tmp_path, drawn):
    code, _, err = run_cli(capsys, "theory", "--n", "16", "--k", "8", "--m", "8", "--d", "4",
                           "--ranks", "8,2", "--p", "64", "--steps", "40", "--modes",
                           "bp,oja", "--out", tmp_path, "--format", "pdf")  # fmt: skip
    assert code == 0, err
    fig = drawn["theory.pdf"]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 4 and panels[0].get_title() == "backprop (B = W2^T), r = 8"
    assert any(ax.get_ylabel().startswith("task mode i") for ax in fig.axes)  # the colour bar
    assert legend_texts(fig) == ["simulation", "theory (ODE)", "learned (1)"]
    assert "task rank d = 4" in fig.get_suptitle()


def test_bench_sweeps_an_mlp_s_width_and_draws_the_ratios(capsys, tmp_path, drawn):
    code, out, err = run_cli(capsys, "bench", "quickstart", "--sweep-width", "8,16", "--ranks",
                             "2,4", "--steps", "1", "--warmup", "0", "--batch-size", "4",
                             "--plot", tmp_path / "w.pdf", "--json")  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["width"], r["variant"]) for r in rows] == [
        (w, v) for w in (8, 16) for v in ("bp", "ldfa_local r=2", "ldfa_local r=4")]  # fmt: skip
    assert all(r["time_ratio"] > 0 and r["flop_ratio"] > 0 for r in rows)
    assert rows[0]["time_ratio"] == rows[0]["flop_ratio"] == 1.0
    (ax,) = drawn["w.pdf"].axes
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "step / backprop's step"
    assert legend_texts(drawn["w.pdf"]) == [
        "ldfa_local r=2: time", "ldfa_local r=2: FLOPs", "ldfa_local r=4: time",
        "ldfa_local r=4: FLOPs", "backprop"]  # fmt: skip
    code, _, err = run_cli(capsys, "bench", "fmnist_lenet_bp", "--sweep-width", "8")
    assert code == 2 and "sets an MLP's hidden widths" in err
    code, _, err = run_cli(capsys, "bench", "quickstart", "--plot", tmp_path / "x.png")
    assert code == 2 and "give --sweep-width too" in err


def test_an_unfinished_seed_shortens_nothing_and_only_evaluated_seeds_count(
    capsys, tmp_path, drawn, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    fake_run(tmp_path / "a" / "s0", "mnist_ldfa", 0, [0.5, 0.7, 0.9])
    fake_run(tmp_path / "a" / "s1", "mnist_ldfa", 1, [0.7], epochs=3)  # stopped after one
    fake_run(tmp_path / "a" / "s2", "mnist_ldfa", 2, [], epochs=3)  # nothing evaluated yet
    fake_run(tmp_path / "b" / "s0", "mnist_bp", 0, [0.8, 0.9, 0.9], rule="bp")
    fake_run(tmp_path / "c" / "s0", "mnist_bp_authors", 0, [0.8, 0.9, 0.95], rule="bp")
    code, _, err = run_cli(capsys, "plot", tmp_path / "a", tmp_path / "b", tmp_path / "c",
                           "--format", "pdf")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "curves.pdf").read_bytes().startswith(b"%PDF")  # the default name
    metric_ax = drawn["curves.pdf"].axes[0]
    mean = metric_ax.get_lines()[0]
    assert list(mean.get_ydata()) == pytest.approx([60.0, 70.0, 90.0])  # all three points
    assert legend_texts(drawn["curves.pdf"])[0] == "mnist_ldfa (mean ± sd, 2 seeds)"
    # the first backprop group black, another backprop group a colour of its own
    colours = [line.get_color() for line in metric_ax.get_lines()]
    assert colours[1] == figures.BP_COLOUR and colours[2] not in (figures.BP_COLOUR, colours[0])


def test_the_same_records_draw_the_same_file(capsys, tmp_path):
    fake_run(tmp_path / "r", "mnist_ldfa", 0, [0.5, 0.7])
    for suffix in ("pdf", "svg", "png"):
        files = [tmp_path / f"{name}.{suffix}" for name in ("a", "b")]
        for out in files:
            code, _, err = run_cli(capsys, "plot", tmp_path / "r", "--out", out)
            assert code == 0, err
        assert files[0].read_bytes() == files[1].read_bytes(), suffix


def test_groups_beyond_the_palette_get_a_line_style_of_their_own(capsys, tmp_path, drawn):
    for index in range(10):
        fake_run(tmp_path / f"r{index}" / "s0", f"mnist_rule{index}", 0, [0.5, 0.6])
    code, _, err = run_cli(capsys, "plot", *(tmp_path / f"r{i}" for i in range(10)),
                           "--out", tmp_path / "many.png")  # fmt: skip
    assert code == 0, err
    lines = drawn["many.png"].axes[0].get_lines()
    looks = [(line.get_color(), line.get_linestyle()) for line in lines]
    assert len(looks) == 10 and len(set(looks)) == 10
    assert {style for _, style in looks} == {"-", "--"}


def test_a_key_an_older_record_lacks_counts_as_its_default(tmp_path):
    from ldfa_cli.analysis.runs import group_by_setting, read_run

    old = fake_run(tmp_path / "old" / "s0", "mnist_ldfa", 0, [0.5, 0.6])
    new = fake_run(tmp_path / "new" / "s1", "mnist_ldfa", 1, [0.5, 0.7])
    config = yaml.safe_load((new / "config.yaml").read_text())
    config["train"]["compile_scope"] = "model"  # written by a version that has the key
    (new / "config.yaml").write_text(yaml.safe_dump(config))
    groups = group_by_setting([read_run(old), read_run(new)])
    assert len(groups) == 1 and len(groups[0].runs) == 2
    config["train"]["compile_scope"] = "step"  # a setting of its own
    (new / "config.yaml").write_text(yaml.safe_dump(config))
    groups = group_by_setting([read_run(old), read_run(new)])
    assert [g.name for g in groups] == ["mnist_ldfa (compile_scope=model)",
                                        "mnist_ldfa (compile_scope=step)"]  # fmt: skip
