"""``ldfa theory``: the linear model of Sections 3 and 5.1, simulation against theory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from ldfa_cli.console import results_console, stderr_console
from ldfa_cli.errors import ConfigError


def _int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name} takes comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{name} takes positive integers, got '{text}'")
    return values


def _check_out(out: Path) -> None:
    """--out is a folder of theory's own: not a file, nothing on the way a file, not a run."""
    from ldfa_cli.engine.run_dir import file_on_the_way

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    if blocked := file_on_the_way(out):
        raise ConfigError(f"--out {out}: {blocked} is a file, not a folder; choose another --out")
    if (out / "config.yaml").is_file() or (out / "checkpoints").is_dir():
        raise ConfigError(f"--out {out} is a training run's folder; give theory a folder of "
                          "its own")  # fmt: skip


def theory(
    n: int = typer.Option(128, min=1, help="Input dimension."),
    k: int = typer.Option(64, min=1, help="Hidden width."),
    m: int = typer.Option(64, min=1, help="Output dimension."),
    d: int = typer.Option(16, min=1, help="Task rank (the effect needs d > r)."),
    ranks: str = typer.Option("64,8", help="Feedback ranks r, comma-separated."),
    p: int = typer.Option(4096, min=1, help="Samples."),
    steps: int = typer.Option(3000, min=1, help="Gradient steps."),
    lr: float = typer.Option(0.01, min=0.0, help="Forward learning rate."),
    lr_q: float = typer.Option(0.01, min=0.0, help="Feedback lr of learn_q."),
    lr_normative: float = typer.Option(0.01, min=0.0, help="Feedback lr of normative."),
    lr_oja: float = typer.Option(0.01, min=0.0, help="Feedback lr of oja."),
    oja_decay: float = typer.Option(0.0, min=0.0, help="Decay lambda of eq. 15."),
    oja_signal: str = typer.Option("targets", help="Oja on 'targets' (A44) or 'error' (16)."),
    oja_gamma: bool = typer.Option(True, help="Normalise C by gamma = max diag C (Alg. 2)."),
    modes: str = typer.Option("bp,fixed,learn_q,normative,oja", help="Modes to run."),
    batch_size: int = typer.Option(None, min=1, help="Minibatch SGD (default: full batch)."),
    whiten: bool = typer.Option(True, help="Whiten the sample inputs (eq. A4)."),
    record_every: int = typer.Option(20, min=1, help="Steps between recorded points."),
    seed: int = typer.Option(0, help="Seed of task, data and initial condition."),
    out: Path = typer.Option(None, "--out", help="Folder (default runs/theory/<time>)."),
    fmt: str = typer.Option("png", "--format", help="The figure's format: png, pdf or svg."),
    json_out: bool = typer.Option(False, "--json", help="Final Lambda and discrepancy as JSON."),
) -> None:
    """Reproduce Fig. 2 (b-e) and Fig. 4a: Lambda_i(t) per mode, simulation vs theory."""
    from ldfa_cli.analysis.figures import figure_path
    from ldfa_cli.analysis.theory import MODES, TheoryConfig, run
    from ldfa_cli.analysis.theory_report import final_table, write_all

    chosen = tuple(x.strip() for x in modes.split(",") if x.strip())
    unknown = [x for x in chosen if x not in MODES]
    if unknown or not chosen:
        raise ConfigError(f"unknown mode '{unknown[0] if unknown else modes}'; modes: "
                          f"{', '.join(MODES)}")  # fmt: skip
    if oja_signal not in ("targets", "error"):
        raise ConfigError(f"--oja-signal takes 'targets' or 'error', got '{oja_signal}'")
    figure, fmt = figure_path(Path("theory"), fmt)  # a bad --format fails before simulating
    if out is not None:
        _check_out(out)
    rank_list = _int_list(ranks, "--ranks")
    if max(rank_list) > min(k, m):
        raise ConfigError(f"--ranks: a rank cannot exceed min(k, m) = {min(k, m)}")
    if d > min(m, n):
        raise ConfigError(f"--d {d} exceeds min(m, n) = {min(m, n)}")
    if whiten and p < n:
        raise ConfigError(f"--p {p} < --n {n}: whitened inputs need p >= n (or --no-whiten)")
    if batch_size and batch_size > p:
        raise ConfigError(f"--batch-size {batch_size} exceeds --p {p}")
    cfg = TheoryConfig(n=n, k=k, m=m, d=d, ranks=rank_list, p=p, steps=steps,
                       record_every=record_every, lr=lr, lr_q=lr_q, lr_normative=lr_normative,
                       lr_oja=lr_oja, oja_decay=oja_decay, oja_signal=oja_signal,
                       oja_gamma=oja_gamma, batch_size=batch_size,
                       whiten=whiten, seed=seed, modes=chosen)  # fmt: skip
    console = stderr_console()
    start = time.perf_counter()
    with console.status("simulating and integrating the theory"):
        result = run(cfg)
    out = out or Path("runs") / "theory" / time.strftime("%Y%m%d-%H%M%S")
    data = write_all(result, out, fmt)
    results_console(json_out).print(final_table(result))
    console.print(f"{time.perf_counter() - start:.1f} s; wrote {out / figure}, "
                  f"{out / 'curves.csv'}, {out / 'summary.json'}")  # fmt: skip
    if json_out:
        brief = [{k: r[k] for k in ("mode", "rank", "final_lambda_simulation",
                                    "final_lambda_theory", "max_abs_discrepancy")}
                 for r in data["runs"]]  # fmt: skip
        print(json.dumps({"singular_values": data["singular_values"], "runs": brief}, indent=2))
