"""The training loop: the same code for one process and for torchrun (DDP).

Read it top to bottom: build, resume, then for every epoch and step: forward, loss,
backward (forward weights and data-driven feedback updates), the normative feedback loss
where due, two optimizer steps, schedules; then evaluation and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from ldfa_cli.analysis.flops import count_training_step, optimizer_plan
from ldfa_cli.config.schema import compile_mode
from ldfa_cli.console import stderr_console
from ldfa_cli.errors import CheckpointError, TrainingError
from ldfa_cli.feedback import (
    alignment_diagnostics,
    backward_with_rules,
    conversion_report,
    feedback_layers,
    reset_feedback_to_svd,
    set_feedback_targets,
)

from . import distributed
from .build import build_network, parameter_counts, pick_device, set_deterministic
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import evaluate
from .interrupt import GracefulStop, StopRequested
from .metrics import MetricsLog
from .optim import build_optimizers
from .regularise import correct, make_ema, make_mixup, mix_batch, task_loss
from .run_dir import describe_device, write_run_files

ALIGNMENT_KEYS = ("angle_deg", "norm_ratio", "rel_error", "grad_cosine")


@dataclass
class RunState:
    """Where the run is; saved in every checkpoint."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # batches of that epoch already taken
    images_seen: int = 0
    elapsed_s: float = 0.0
    best_acc: float = -1.0
    train_flops: float = 0.0  # cumulative, all ranks together


@dataclass
class RunResult:
    run_dir: str | None
    epochs_done: int
    step: int
    final: dict | None  # the last evaluation
    best_acc: float
    stopped_early: bool


def _ignore_normative_in_ddp(model: nn.Module) -> None:
    """The normative factors learn from W alone (identical on every rank), never from a
    backward through DDP's forward, so DDP must not wait for their gradients."""
    names = [
        f"{name}.{p}"
        for name, layer in feedback_layers(model)
        if layer.rule.name == "ldfa"
        for p in ("feedback_P", "feedback_Q")
    ]
    if names:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, names
        )


def _timed(batches, waited: list):
    """The batches, adding the seconds spent waiting for each to ``waited[0]`` (the data
    stall: loader workers, or the on-device draw and augmentation)."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - start
        yield item


def _mix_seed(seed: int, step: int) -> int:
    """The step's Mixup seed: fixed by (run seed, step), so a resume mixes the same."""
    return (seed * 1_000_003 + step) % (1 << 31)


def _optimizer_name(config) -> str:
    """'forward' (shares the forward optimizer) or the feedback optimizer's name."""
    if isinstance(config, str):
        return config
    return config["name"] if isinstance(config, dict) else config.name


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _progress_bar(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def train(
    recipe,
    run_dir: Path | None,
    device_name: str = "auto",
    resume: bool = False,
    stop_after: int | None = None,
    dry_run: bool = False,
    console: Console | None = None,
    recipe_name: str = "",
) -> RunResult:
    """Train ``recipe``; write into ``run_dir`` (rank 0 only; nothing when ``dry_run``).
    ``resume`` continues from ``run_dir/checkpoints/last.pt``; ``stop_after`` ends this
    invocation after that many epochs with a checkpoint, to be resumed later."""
    console = console or stderr_console()
    cfg = recipe.train
    world = distributed.start("cuda" if device_name in ("auto", "cuda") and
                              torch.cuda.is_available() else "cpu")  # fmt: skip
    device = pick_device(device_name, world.local_rank)
    set_deterministic(cfg.deterministic)
    writes = world.main and not dry_run

    # ---- build: the data (checked before anything is written), the model with its
    # feedback layers, two optimizers, the regularisers
    from ldfa_cli.data import load_data

    data = load_data(recipe.data, device)
    model = build_network(recipe, data, device)
    steps_per_epoch = data.steps_per_epoch(cfg.batch_size, world.size)
    optimizers = build_optimizers(recipe, model, steps_per_epoch)
    mixer = make_mixup(recipe.data.augment, data.classes, cfg.label_smoothing)
    # A new run describes itself at once; a resume rewrites config.yaml (with its
    # overrides) only once it has saved a checkpoint, so a failed resume changes nothing.
    run_files_due = writes
    if writes and not resume:
        write_run_files(run_dir, recipe, describe_device(device), world.size, resumed=False,
                        recipe_name=recipe_name)  # fmt: skip
        run_files_due = False
    uses_targets = any(getattr(m.rule, "use_targets", False) for _, m in feedback_layers(model))
    state = RunState()

    if resume:
        path = run_dir / "checkpoints" / "last.pt"
        ckpt = load_checkpoint(path, map_location=device)
        saved = ckpt["config"]
        for key, now, before in (
            ("optim.name", recipe.optim.name, saved["optim"]["name"]),
            ("feedback.optimizer", _optimizer_name(recipe.feedback.optimizer),
             _optimizer_name(saved["feedback"]["optimizer"])),
        ):  # fmt: skip
            if now != before:
                raise CheckpointError(
                    f"{key} is {now!r} but the run was trained with {before!r}: its optimizer "
                    "state cannot continue under another optimizer; start a new run instead"
                )
        try:
            model.load_state_dict(ckpt["model"])
            optimizers.load_state_dict(ckpt)
            _set_rng_state(ckpt["rng"], device)
            state = RunState(**ckpt["progress"])
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise CheckpointError(
                f"{path} does not fit the resumed recipe ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:120]}); resume with the run's own model, rule "
                "and optimizer, changing only values such as lr or epochs"
            ) from None

    ema = make_ema(model, cfg.ema_decay)  # after the resume, so it starts from the model
    if ema is not None and resume and ckpt.get("ema") is not None:
        ema.module.load_state_dict(ckpt["ema"])

    net: nn.Module = model
    if world.distributed:
        _ignore_normative_in_ddp(model)
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if (mode := compile_mode(cfg)) is not None:
        net = torch.compile(net, mode=mode)
    autocast = _autocast(device, cfg.precision)

    def checkpoint(name: str) -> None:
        nonlocal run_files_due
        if not writes:
            return
        if run_files_due:
            write_run_files(run_dir, recipe, describe_device(device), world.size, resumed=True)
            run_files_due = False
        save_checkpoint(run_dir / "checkpoints" / name, {
            "model": model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            **optimizers.state_dict(),
            "rng": _rng_state(device),
            "progress": asdict(state),
            "config": recipe.model_dump(mode="json"),
        })  # fmt: skip

    step_flops: dict[tuple, float] = {}  # per distinct batch shape, measured once

    def count_flops(x: torch.Tensor, y: torch.Tensor) -> None:
        """Add this step's FLOPs (forward, backward, feedback updates, elementwise work, the
        SVD reset amortised, both optimizer steps; PyTorch's counter on a copy of the model,
        so training is untouched) to the running total."""
        if not writes:
            return
        key = tuple(x.shape)
        if key not in step_flops:
            plan = optimizer_plan(recipe, model)[0]
            counted = count_training_step(model, x, y, cfg.label_smoothing, plan, steps_per_epoch)
            step_flops[key] = counted.total * world.size
        state.train_flops += step_flops[key]

    aux_loss: list[torch.Tensor | None] = [None]  # the last step's auxiliary loss, for logs

    def train_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, targets = mix_batch(mixer, x, y, _mix_seed(cfg.seed, state.step))  # soft if mixed
        if uses_targets:
            set_feedback_targets(model, targets)
        with autocast:
            logits = net(x)
            loss = task_loss(logits.float(), targets, cfg.label_smoothing)
        optimizers.zero_grad()
        # W grads; input grads through the feedback; Oja/Hebbian/KP grads; a rule's own
        # loss term (svd_dfa's orthogonality); the normative loss (eq. 8) when due
        aux_loss[0] = backward_with_rules(model, loss, state.step)
        optimizers.step()  # clip, step and schedule, forward then feedback
        state.step += 1
        reset_feedback_to_svd(model, state.step, steps_per_epoch)
        if ema is not None:
            ema.update(model, step=state.step)
        return loss.detach(), correct(logits, targets)

    if dry_run:
        console.print(conversion_report(model).table(title=f"{recipe.model.name}: layers"))
        counts = parameter_counts(model)
        console.print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        console.print(data.describe())
        x, y = next(data.train_batches(0, cfg.batch_size, cfg.seed, world.rank, world.size))
        loss, _ = train_step(x, y)
        console.print(f"one training step: loss {loss.item():.4f} on a batch of {len(y)}; "
                      "nothing written (dry run)")  # fmt: skip
        distributed.stop(world)
        return RunResult(None, 0, 1, None, -1.0, True)

    metrics = MetricsLog(run_dir, recipe.output.tensorboard) if writes else None
    if metrics is not None and resume:
        metrics.truncate_after(state.step)

    def log(event: dict) -> None:
        if metrics is not None:
            metrics.log(event)

    probe = data.probe(cfg.alignment_probe) if cfg.log_alignment_every else None

    def log_alignment() -> None:
        """Per converted layer: angle and norm ratio of B against W^T, and the cosine of
        the rule's input gradient with backprop's on the fixed probe batch (rank 0 only;
        the model in eval mode for it, its .grad and RNG untouched)."""
        if not writes:
            return
        rows = alignment_diagnostics(model, *probe)
        log({"event": "alignment", "epoch": round(state.step / steps_per_epoch, 4),
             "step": state.step, "layers": {r["name"]: {k: r[k] for k in ALIGNMENT_KEYS}
                                            for r in rows}})  # fmt: skip

    def evaluate_and_log() -> dict:
        """Test-set evaluation, logged with the (fractional) epoch; best.pt when it improves."""
        result = evaluate(model, data, cfg.eval_batch_size, world, autocast)
        if ema is not None:  # the averaged weights, evaluated beside the raw ones
            averaged = evaluate(ema.module, data, cfg.eval_batch_size, world, autocast)
            result.update({f"ema_{k}": averaged[k] for k in ("loss", "acc", "top5")})
        epochs_done = round(state.step / steps_per_epoch, 4)
        log({"event": "eval", "epoch": epochs_done, "step": state.step, "split": "test",
             "loss": result["loss"], "acc": result["acc"], "top5": result["top5"],
             **{k: v for k, v in result.items() if k.startswith("ema_")},
             "per_class_acc": result["per_class_acc"], "lr": optimizers.lr,
             "images_seen": state.images_seen, "train_flops": state.train_flops,
             "time_s": time.perf_counter() - start_time})  # fmt: skip
        if world.main:
            console.print(f"epoch {epochs_done:g}: test loss {result['loss']:.4f} "
                          f"acc {result['acc']:.4f}")  # fmt: skip
        state.elapsed_s = time.perf_counter() - start_time
        if result["acc"] > state.best_acc:
            state.best_acc = result["acc"]
            if recipe.output.save_best:
                checkpoint("best.pt")
        return result

    every_steps = cfg.eval_every_steps
    last_eval: dict | None = None
    start_time = time.perf_counter() - state.elapsed_s
    last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, state.epoch + stop_after)
    bar = _progress_bar(console, world.main)
    stopped_early = last_epoch < cfg.epochs
    ctrl_c = GracefulStop()

    def stop_here(requested_on_every_rank: bool = False) -> None:
        """Stop at this step boundary if Ctrl-C was pressed. Under torchrun the ranks agree
        only where they sum their logs (every log_every steps), so that all stop together."""
        if requested_on_every_rank or (ctrl_c.requested and not world.distributed):
            raise StopRequested

    try:
        with bar, ctrl_c:
            task = bar.add_task("", total=steps_per_epoch, stats="")
            while state.epoch < last_epoch:
                epoch = state.epoch
                bar.update(task, description=f"epoch {epoch + 1}/{cfg.epochs}",
                           completed=state.batch_in_epoch)  # fmt: skip
                # loss sum, hits, images, Ctrl-C pressed: summed over ranks at each log
                window = torch.zeros(4, dtype=torch.float64, device=device)
                window_start, window_images = time.perf_counter(), 0
                waited = [0.0]  # seconds spent waiting for data in this window
                batches = data.train_batches(epoch, cfg.batch_size, cfg.seed, world.rank,
                                             world.size, start=state.batch_in_epoch)  # fmt: skip
                for x, y in _timed(batches, waited):
                    count_flops(x, y)
                    loss, hits = train_step(x, y)
                    window[0] += loss.double() * len(y)
                    window[1] += hits
                    window[2] += len(y)
                    state.batch_in_epoch += 1
                    state.images_seen += len(y) * world.size
                    window_images += len(y) * world.size
                    bar.advance(task)
                    end_of_epoch = state.batch_in_epoch == steps_per_epoch
                    if cfg.log_alignment_every and state.step % cfg.log_alignment_every == 0:
                        log_alignment()
                    if every_steps and state.step % every_steps == 0 and not end_of_epoch:
                        last_eval = evaluate_and_log()
                    if state.step % cfg.log_every and not end_of_epoch:
                        stop_here()
                        continue
                    window[3] = float(ctrl_c.requested)
                    totals = distributed.sum_across(world, window.clone())
                    mean_loss = float(totals[0] / totals[2].clamp_min(1))
                    if not math.isfinite(mean_loss):
                        last = run_dir / "checkpoints" / "last.pt" if run_dir else None
                        kept = (
                            f"{last} holds the last good state"
                            if last is not None and last.is_file()
                            else "no checkpoint had been written yet"
                        )
                        raise TrainingError(
                            f"the training loss became {mean_loss} at step {state.step} (epoch "
                            f"{epoch + 1}); stopped without saving ({kept}): lower optim.lr or "
                            "feedback.optimizer.lr"
                        )
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    rate, stall = window_images / elapsed, waited[0] / elapsed
                    acc = float(totals[1] / totals[2].clamp_min(1))
                    event = {"event": "train", "epoch": epoch + 1, "step": state.step,
                             "split": "train", "loss": mean_loss, "acc": acc,
                             "lr": optimizers.lr,
                             "images_seen": state.images_seen, "images_per_s": rate,
                             "data_stall": stall,
                             "train_flops": state.train_flops,
                             "time_s": time.perf_counter() - start_time}  # fmt: skip
                    if aux_loss[0] is not None:  # not in "loss", which stays comparable
                        event["aux_loss"] = float(aux_loss[0])
                    log(event)
                    bar.update(task, stats=f"loss {mean_loss:.4f} acc {acc:.3f} {rate:,.0f} "
                                           f"img/s, data stall {stall:.0%}")  # fmt: skip
                    window.zero_()
                    window_start, window_images, waited[0] = time.perf_counter(), 0, 0.0
                    stop_here(requested_on_every_rank=bool(totals[3] > 0))
                # Evaluate before the epoch counts as done, so that a stop before this point
                # resumes into this evaluation and a stop after it does not repeat it.
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    last_eval = evaluate_and_log()
                state.epoch, state.batch_in_epoch = epoch + 1, 0
                state.elapsed_s = time.perf_counter() - start_time
                checkpoint("last.pt")
                if state.epoch < last_epoch:  # a Ctrl-C after the last epoch changes nothing
                    stop_here()  # (under torchrun the epoch's last log already agreed)
        if world.distributed:  # whether every rank holds the same model (where promised)
            differing = distributed.differing_replicas(world, model)
            log({"event": "replicas", "step": state.step, "ranks": world.size,
                 "identical": not differing, "differing": differing})  # fmt: skip
    except StopRequested:
        state.elapsed_s = time.perf_counter() - start_time
        checkpoint("last.pt")
        if world.main:
            console.print(f"interrupted: checkpoint written at step {state.step}; continue with "
                          f"--resume {run_dir}")  # fmt: skip
        raise
    except KeyboardInterrupt:
        if world.main:
            console.print("stopped at once (second Ctrl-C): nothing written since the last "
                          f"checkpoint; --resume {run_dir} continues from it")  # fmt: skip
        raise
    finally:
        if metrics is not None:
            metrics.close()
        with contextlib.suppress(Exception):
            distributed.stop(world)
    return RunResult(str(run_dir), state.epoch, state.step, last_eval, state.best_acc,
                     stopped_early)  # fmt: skip
