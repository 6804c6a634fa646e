"""``ldfa bench``: step time of a recipe's model under backprop and feedback ranks."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ldfa_cli.console import results_console, stderr_console
from ldfa_cli.errors import ConfigError


def bench(
    recipe: str = typer.Argument(..., help="A recipe file or a shipped recipe's name."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides."),
    ranks: str = typer.Option("8,16,32", "--ranks", help="Feedback ranks, comma-separated."),
    steps: int = typer.Option(
        20,
        "--steps",
        min=1,
        help="Timed samples per variant: one step each, or one period "
        "of k steps where eq. 9 runs every k.",
    ),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed steps first."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Default: the recipe's."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    memory: bool = typer.Option(False, "--memory", help="Memory of a step by kind, not time."),
    sweep_width: str = typer.Option(
        None,
        "--sweep-width",
        help="An MLP recipe at these hidden widths (e.g. 256,512,1024): "
        "time and FLOP ratios to backprop per width and rank.",
    ),  # fmt: skip
    plot: Path = typer.Option(None, "--plot", help="--sweep-width's figure (.png, .pdf, .svg)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON to stdout."),
) -> None:
    """Time training steps under backprop and each rank, beside their FLOP ratio.

    The variants take turns in one process, with a profile of where the time goes; or, with
    --memory, the memory of one step split into parameters, feedback tensors, optimizer
    state, activations saved for backward, backward buffers and the peak, beside what the
    shapes predict; or, with --sweep-width, the time and FLOP ratios of an MLP's step as its
    width grows."""
    from ldfa_cli.analysis.bench import run_bench
    from ldfa_cli.cli.theory_cmd import _int_list
    from ldfa_cli.config import load_recipe
    from ldfa_cli.engine.build import pick_device

    config, path = load_recipe(recipe, list(overrides or []))
    rank_list = list(_int_list(ranks, "--ranks"))
    batch = batch_size or config.train.batch_size
    console = stderr_console()
    if plot is not None and not sweep_width:
        raise ConfigError("--plot draws --sweep-width's figure: give --sweep-width too")
    if memory and sweep_width:
        raise ConfigError("--memory and --sweep-width are two benchmarks: give one")
    if memory:
        _memory(config, path, rank_list, batch, pick_device(device), console, json_out)
        return
    if sweep_width:
        widths = list(_int_list(sweep_width, "--sweep-width"))
        _width_sweep(config, path, widths, rank_list, steps, warmup, batch,
                     pick_device(device), plot, json_out)  # fmt: skip
        return
    with console.status(f"timing {len(rank_list) + 1} variants x {steps} steps"):
        result = run_bench(config, rank_list, steps, warmup, batch, pick_device(device))
    table = Table(title=f"{path.stem}: training step, batch {batch}, {result['device']}, "
                  f"{result['precision']}"
                  f"{', compiled (' + result['compiled'] + ')' if result['compiled'] else ''}, "
                  f"{result['threads']} threads "
                  f"(median of {steps}, interleaved)")  # fmt: skip
    kernels = "kernel_ms" in result["rows"][0]  # on a GPU
    floors = result["phases_ms"] is not None
    counted = "dispatches" in result["rows"][0]  # eager steps only
    columns = ("variant", "ms / step", "time / BP", "FLOPs / BP", "gap",
               *(("floor",) if floors else ()), "GFLOPs / step",
               *(("dispatches", "/ BP", "+ per layer") if counted else ()),
               *(("kernel ms", "kernel / BP") if kernels else ()))  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "variant" else "right")
    bp_dispatches = result["rows"][0].get("dispatches")
    for row in result["rows"]:
        kernel = (f"{row['kernel_ms']:.2f}", f"{row['kernel_ratio']:.3f}") if kernels else ()
        floor = (f"{row['gap_floor']:+.3f}" if "gap_floor" in row else "",) if floors else ()
        dispatch = ()
        if counted:
            per_layer = row.get("dispatches_per_layer")
            dispatch = (f"{row['dispatches']:.0f}", f"{row['dispatches'] / bp_dispatches:.2f}",
                        "" if per_layer is None else f"{per_layer:+.1f}")  # fmt: skip
        table.add_row(row["variant"], f"{row['median_ms']:.2f}", f"{row['time_ratio']:.3f}",
                      f"{row['flop_ratio']:.3f}", f"{row['gap']:+.3f}", *floor,
                      f"{row['gflops_per_step']:.3f}", *dispatch, *kernel)  # fmt: skip
    results = results_console(json_out)
    results.print(table)
    console.print("gap: time / BP - FLOPs / BP (every FLOP of the step counted, both "
                  "optimizers included; 0 where wall-clock follows the FLOPs)")  # fmt: skip
    for row in result["rows"]:
        if row["steps_per_sample"] > 1:
            console.print(f"{row['variant']}: eq. 9 runs every {row['steps_per_sample']} "
                          f"steps, so each timed sample is {row['steps_per_sample']} steps "
                          "and ms / step their mean, as the FLOPs count its amortised "
                          "share")  # fmt: skip
    if counted:
        console.print("dispatches: the ATen ops of one eager step (forward, backward with the "
                      "rules' work, both optimizers); + per layer: the difference from "
                      "backprop's per converted layer. On a GPU most launch a kernel and each "
                      "costs host time, whatever its FLOPs")  # fmt: skip
    if floors:
        bp = result["phases_ms"]["bp"]
        share = bp.get("input_grad", 0.0) / sum(bp.values())
        flop_share = (
            result["phases_gflops"]["bp"].get("input_grad", 0.0)
            / result["rows"][0]["gflops_per_step"]
        )
        console.print(f"floor: the gap if every op the rule adds took no time (backprop's "
                      f"step less its input-gradient products, which are {share:.0%} of its "
                      f"time and {flop_share:.0%} of its FLOPs); no implementation of the "
                      f"rule's own ops gets the gap below it")  # fmt: skip
    if kernels:
        console.print("kernel ms: the GPU's busy time in a step (the profiler's kernel and "
                      "copy time); far below ms / step, the step waits on the host's "
                      "launches and Python, not on the GPU")  # fmt: skip
    for label, ops in result["profile"].items():
        summary = ", ".join(f"{o['op']} {o['share']:.0%}" for o in ops)
        console.print(f"where the time goes ({label}, self time by op): {summary}")
    if result["phases_ms"] is None:
        console.print("by phase: not measured for compiled steps (the phase timer cannot "
                      "see inside a compiled graph); run without train.compile=true for "
                      "the table")  # fmt: skip
    else:
        results.print(_phase_table(result))
    if json_out:
        print(json.dumps({"recipe": path.stem, **result}, indent=2))


def _width_sweep(config, path, widths, ranks, steps, warmup, batch, device, plot,
                 json_out) -> None:  # fmt: skip
    """``--sweep-width``: the table (and the figure) of time and FLOP ratios by width."""
    import torch

    from ldfa_cli.analysis.bench import draw_width_sweep, width_sweep
    from ldfa_cli.analysis.figures import figure_path, save_figure

    if config.model.name != "mlp":
        raise ConfigError(f"--sweep-width sets an MLP's hidden widths; {path.stem}'s model is "
                          f"'{config.model.name}' (try fmnist_mlp_ldfa_r10)")  # fmt: skip
    if plot is not None:
        figure_path(plot)  # a bad name fails before the timing
    console = stderr_console()
    with console.status(f"timing {len(widths)} widths x {len(ranks) + 1} variants"):
        rows = width_sweep(config, widths, ranks, steps, warmup, batch, device)
    threads = torch.get_num_threads()
    title = (f"{path.stem}: {len(config.model.widths)} hidden layers, batch {batch}, "
             f"{device}, {threads} threads")  # fmt: skip
    table = Table(title=f"{title} (median of {steps}, interleaved)")
    for col in ("width", "variant", "ms / step", "time / BP", "FLOPs / BP", "gap"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for row in rows:
        table.add_row(str(row["width"]), row["variant"], f"{row['median_ms']:.2f}",
                      f"{row['time_ratio']:.3f}", f"{row['flop_ratio']:.3f}",
                      f"{row['gap']:+.3f}")  # fmt: skip
    results_console(json_out).print(table)
    if plot is not None:
        console.print(f"wrote {save_figure(draw_width_sweep(rows, title), plot)}")
    if json_out:
        print(json.dumps({"recipe": path.stem, "batch_size": batch, "threads": threads,
                          "device": str(device), "rows": rows}, indent=2))  # fmt: skip


def _phase_table(result: dict) -> Table:
    """Per row (phase): each variant's ms / step and GFLOPs / step, and each rule's share of
    the gap (see ``analysis.bench.gap_by_row``)."""
    from ldfa_cli.analysis.bench import PHASE_ORDER

    ms, gflops, gaps = result["phases_ms"], result["phases_gflops"], result["gap_by_phase"]
    ops = result["dispatches_by_phase"]
    table = Table(title="where the time goes, by phase: ms / step (GFLOPs / step) [ATen ops "
                  "/ step], and each row's share of the gap")  # fmt: skip
    table.add_column("phase")
    for label in ms:
        table.add_column(label, justify="right")
        if label in gaps:
            table.add_column("gap", justify="right")
    rows = [r for r in PHASE_ORDER if any(r in v for v in (*ms.values(), *gflops.values()))]
    for row in rows:
        cells = []
        for label in ms:
            flops = gflops[label].get(row)
            time = ms[label].get(row)
            count = ops[label].get(row)
            cells.append(("-" if time is None else f"{time:.2f}")
                         + ("" if flops is None else f" ({flops:.3f})")
                         + ("" if count is None else f" [{count:.0f}]"))  # fmt: skip
            if label in gaps:
                cells.append(f"{gaps[label].get(row, 0.0):+.3f}")
        table.add_row(row, *cells)
    return table


MIB = 2**20
MEMORY_COLUMNS = [("parameters", "params"), ("feedback_tensors", "feedback"),
                  ("gradients", "grads"), ("optimizer_state", "opt state"),
                  ("saved_for_backward", "saved"), ("backward_transient", "bwd buffers"),
                  ("peak", "peak")]  # fmt: skip


def _memory(config, path, ranks, batch, device, console, json_out: bool) -> None:
    from ldfa_cli.analysis.memory import run_memory

    with console.status(f"measuring the memory of {len(ranks) + 1} variants"):
        result = run_memory(config, ranks, batch, device)
    table = Table(title=f"{path.stem}: memory of one training step (MiB), batch {batch}, "
                  f"{result['device']}; in brackets what the shapes predict")  # fmt: skip
    table.add_column("variant")
    for _, title in MEMORY_COLUMNS:
        table.add_column(title, justify="right")
    cuda = result["rows"][0]["allocator_peak"] is not None
    if cuda:
        table.add_column("allocator peak", justify="right")
    for row in result["rows"]:
        expected = row["expected"]
        cells = []
        for key, _ in MEMORY_COLUMNS:
            cell = f"{row[key] / MIB:.2f}"
            guess = expected.get(key, expected.get(f"{key}_at_least"))
            if guess is not None:
                cell += f" [{'>=' if key == 'saved_for_backward' else ''}{guess / MIB:.2f}]"
            cells.append(cell)
        if cuda:
            cells.append(f"{row['allocator_peak'] / MIB:.2f}")
        table.add_row(row["variant"], *cells)
    results_console(json_out).print(table)
    console.print(
        "saved: what autograd keeps for the backward (the batch and parameters left out; the "
        "prediction counts only each Linear/Conv input); bwd buffers: the most the backward "
        "holds at once beyond the gradients it leaves; peak: the most alive at once over the "
        "step, everything before it included. Low-rank feedback adds its factors, their "
        "gradients and optimizer state; its backward holds a T x r product where backprop "
        "holds none, and neither holds more than the input gradient W^T g or Q (P g)."
    )
    if json_out:
        print(json.dumps({"recipe": path.stem, **result}, indent=2))
