"""The training loop: the same code for one process and for torchrun (DDP).

``Trainer`` sets a run up in small steps (processes and device, data, model with its
feedback layers, optimizers, run folder, resume, EMA, the training step), and
``Trainer.train`` reads top to bottom: for every epoch, each batch through the training
step (``engine/step.py``), a train event every ``log_every`` steps, evaluation, a
checkpoint. A Ctrl-C stops at a step boundary with ``last.pt`` written.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from ldfa_cli.config.schema import compile_mode
from ldfa_cli.console import stderr_console
from ldfa_cli.data import load_data
from ldfa_cli.errors import CheckpointError, ConfigError
from ldfa_cli.feedback import (
    alignment_diagnostics,
    changes_shape,
    conversion_report,
    epoch_end,
    feedback_layers,
    fit_to_state,
)
from ldfa_cli.feedback.model import ddp_ignored

from . import distributed
from .build import build_network, parameter_counts, pick_device, set_deterministic
from .checkpoint import (
    atomic_write_text,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .evaluate import evaluate
from .interrupt import GracefulStop, StopRequested
from .metering import FlopMeter
from .metrics import MetricsLog, tensorboard_writer
from .optim import build_optimizers
from .progress import EpochBar, LogWindow, WindowSummary, check_finite
from .regularise import make_ema, plain_task_loss
from .run_dir import RunFolder, describe_device, read_env, write_run_files
from .step import StepOutput, TrainStep

ALIGNMENT_KEYS = ("angle_deg", "norm_ratio", "rel_error", "grad_cosine")


@dataclass
class RunState:
    """Where the run is; saved in every checkpoint."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # batches of that epoch already taken
    images_seen: int = 0
    elapsed_s: float = 0.0
    best_acc: float = -1.0  # best.pt's accuracy (validation set's where there is one)
    best_score: float = -math.inf  # what best.pt is chosen on: accuracy, or minus the loss
    train_flops: float = 0.0  # cumulative, all ranks together


@dataclass
class RunResult:
    run_dir: str | None
    epochs_done: int
    step: int
    final: dict | None  # the last evaluation
    best_acc: float
    stopped_early: bool


def train(
    recipe,
    run_dir: Path | None,
    device_name: str = "auto",
    resume: bool = False,
    stop_after: int | None = None,
    dry_run: bool = False,
    console: Console | None = None,
    recipe_name: str = "",
    overwrite: bool = False,
    report: Console | None = None,
) -> RunResult:
    """Train ``recipe``; write into ``run_dir`` (rank 0 only; nothing when ``dry_run``).
    ``resume`` continues from ``run_dir/checkpoints/last.pt``; ``stop_after`` ends this
    invocation after that many epochs with a checkpoint, to be resumed later; ``overwrite``
    replaces a run already in ``run_dir`` (once the new one has its first checkpoint).
    A dry run prints its layer table and step to ``report`` (default: ``console``)."""
    trainer = Trainer(
        recipe, run_dir, device_name, resume, dry_run, console, recipe_name, overwrite
    )
    return trainer.dry_run(report) if dry_run else trainer.train(stop_after)


class Trainer:
    """A run: set up in ``__init__``, trained by :meth:`train`."""

    def __init__(self, recipe, run_dir: Path | None, device_name: str = "auto",
                 resume: bool = False, dry_run: bool = False, console: Console | None = None,
                 recipe_name: str = "", overwrite: bool = False):  # fmt: skip
        self.recipe, self.cfg, self.run_dir = recipe, recipe.train, run_dir
        self.console = console or stderr_console()
        self._setup_world(device_name)
        self.writes = self.world.main and not dry_run
        self._setup_data()
        self._setup_model()
        self.state = RunState()
        checkpoint = self._resume() if resume else None
        self._setup_step(checkpoint)
        self._setup_run_folder(resume, overwrite, recipe_name)  # last: all else is checked

    # ------------------------------------------------------------------------- setup
    def _setup_world(self, device_name: str) -> None:
        cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
        self.world = distributed.start("cuda" if cuda else "cpu")
        self.device = pick_device(device_name, self.world.local_rank)
        set_deterministic(self.cfg.deterministic)

    def _setup_data(self) -> None:
        self.data = load_data(self.recipe.data, self.device)
        self.steps_per_epoch = self.data.steps_per_epoch(self.cfg.batch_size, self.world.size)

    def _setup_model(self) -> None:
        """The model with its feedback layers and its two optimizers."""
        self.model = build_network(self.recipe, self.data, self.device)
        self.optimizers = build_optimizers(self.recipe, self.model, self.steps_per_epoch)
        if clipped := conversion_report(self.model).clipped_note():
            self.say(clipped)

    def _resume(self) -> dict:
        path = self.run_dir / "checkpoints" / "last.pt"
        checkpoint = load_checkpoint(path, map_location=self.device)
        _check_same_optimizers(self.recipe, checkpoint["config"])
        try:
            fit_to_state(self.model, checkpoint["model"])  # a rank cut in training
            self.model.load_state_dict(checkpoint["model"])
            self.optimizers.load_state_dict(checkpoint)
            set_rng_state(checkpoint["rng"], self.device)
            self.state = RunState(**checkpoint["progress"])
            if "best_score" not in checkpoint["progress"]:  # (saved before it existed)
                self.state.best_score = self.state.best_acc
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise CheckpointError(
                f"{path} does not fit the resumed recipe ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:120]}); resume with the run's own model, rule "
                "and optimizer, changing only values such as lr or epochs"
            ) from None
        return checkpoint

    def _setup_step(self, checkpoint: dict | None) -> None:
        """The EMA (after the resume, so that it starts from the model), the model wrapped
        for DDP and compiled as asked, the training step and its FLOP meter."""
        compiled = compile_mode(self.cfg) is not None
        if changes_shape(self.model) and (self.cfg.ema_decay or self.world.distributed
                                          or compiled):  # fmt: skip
            raise ConfigError(
                "the rule cuts its layers' ranks in training (svd_dfa reduce_at_epochs), which "
                "neither an EMA copy (train.ema_decay), torchrun's DDP nor a compiled step "
                "(train.compile) follows yet; drop one of them"
            )
        if compile_mode(self.cfg, "step") is not None and self.world.distributed:
            raise ConfigError(
                "train.compile_scope: step takes the gradients by torch.autograd.grad, which "
                "DDP does not reduce across ranks; under torchrun use compile_scope: model"
            )
        self.ema = make_ema(self.model, self.cfg.ema_decay)
        if self.ema is not None and checkpoint is not None and checkpoint.get("ema") is not None:
            self.ema.module.load_state_dict(checkpoint["ema"])
        net: nn.Module = self.model
        if self.world.distributed:
            if ignored := ddp_ignored(self.model):
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    self.model, ignored
                )
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if (mode := compile_mode(self.cfg, "model")) is not None:
            net = torch.compile(net, mode=mode)
        self.step = TrainStep.for_recipe(self.recipe, self.model, self.optimizers,
                                         self.data.classes, self.steps_per_epoch, net=net,
                                         ema=self.ema)  # fmt: skip
        self.flops = FlopMeter(self.step, self.optimizers.flop_plan(self.model), self.world.size)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=self.cfg.precision == "bf16")  # fmt: skip
        self.probe = self.data.probe(self.cfg.alignment_probe) if self.cfg.log_alignment_every \
            else None  # fmt: skip
        self.ctrl_c = GracefulStop()

    def _setup_run_folder(self, resume: bool, overwrite: bool, recipe_name: str) -> None:
        """Only now, with the data, model, device and packages checked, a new run makes its
        folder (setting aside the run it overwrites) and describes itself; a resume rewrites
        config.yaml (with its overrides) only once it has saved a checkpoint, so a failed
        resume changes nothing."""
        self.folder, self.metrics = None, None
        self.run_files_due = self.writes and resume
        if not self.writes:
            return
        if self.recipe.output.tensorboard:
            tensorboard_writer()
        if resume:
            if (self.run_dir / "env.json").is_file():
                read_env(self.run_dir)  # the first checkpoint extends it
            self.metrics = MetricsLog(self.run_dir, self.recipe.output.tensorboard)
            self.metrics.truncate_after(self.state.step)
            return
        self.folder = RunFolder(self.run_dir, overwrite)
        self.folder.make()
        try:
            write_run_files(self.run_dir, self.recipe, describe_device(self.device),
                            self.world.size, resumed=False, recipe_name=recipe_name)  # fmt: skip
            for name, text in self.data.run_files().items():  # (a text's tokenizer)
                atomic_write_text(self.run_dir / name, text)
            self.metrics = MetricsLog(self.run_dir, self.recipe.output.tensorboard)
        except BaseException:  # (a full disk, say): nothing of the new run stays
            self.folder.undo(started=False)
            raise
        self.say(f"run folder: {self.run_dir}")

    # ------------------------------------------------------------------------- train
    def train(self, stop_after: int | None = None) -> RunResult:
        cfg, state, world = self.cfg, self.state, self.world
        last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, state.epoch + stop_after)
        self.start_time = self.saved_at = time.perf_counter() - state.elapsed_s
        last_eval = None
        bar = EpochBar(self.console, world.main, self.steps_per_epoch, cfg.epochs)
        try:
            with bar, self.ctrl_c:
                while state.epoch < last_epoch:
                    epoch = state.epoch
                    bar.start_epoch(epoch, state.batch_in_epoch)
                    window = LogWindow(self.device, world)
                    batches = self.data.train_batches(
                        epoch, cfg.batch_size, cfg.seed, world.rank, world.size,
                        start=state.batch_in_epoch)  # fmt: skip
                    for x, y in window.timed(batches):
                        if self.writes:
                            state.train_flops += self.flops(x, y)
                        out = self.step(x, y, state.step)
                        state.step += 1
                        state.batch_in_epoch += 1
                        state.images_seen += len(y) * world.size
                        window.add(out.loss, out.correct, out.predictions, len(y))
                        bar.advance()
                        end_of_epoch = state.batch_in_epoch == self.steps_per_epoch
                        if cfg.log_alignment_every and state.step % cfg.log_alignment_every == 0:
                            self.log_alignment()
                        if _every(state.step, cfg.eval_every_steps) and not end_of_epoch:
                            last_eval = self.evaluate_and_log()
                        if _every(state.step, cfg.log_every) or end_of_epoch:
                            summary = window.close(self.ctrl_c.requested)
                            self.log_train(summary, epoch, out)
                            bar.show(summary)
                            self.stop_here(everywhere=summary.stop_requested)
                        else:
                            self.stop_here()
                        if not end_of_epoch and self.checkpoint_due():
                            self.save("last.pt")  # mid-epoch: a kill loses little
                    # Evaluate before the epoch counts as done, so that a stop before this
                    # point resumes into this evaluation and a stop after it does not repeat it.
                    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                        last_eval = self.evaluate_and_log()
                    state.epoch, state.batch_in_epoch = epoch + 1, 0
                    self.between_epochs()
                    self.save("last.pt")
                    if state.epoch < last_epoch:  # a Ctrl-C after the last epoch changes nothing
                        self.stop_here()  # (under torchrun the epoch's last log already agreed)
            self.log_replicas()
        except StopRequested as stop:
            self.save("last.pt")
            self.say(f"stopped by {stop}: checkpoint written at step {state.step}; continue "
                     f"with: ldfa train --resume {self.run_dir}")  # fmt: skip
            raise
        except KeyboardInterrupt as stop:
            self.say(f"stopped at once (a second {stop or 'SIGINT'}): nothing written since "
                     f"the last checkpoint; ldfa train --resume {self.run_dir} continues from "
                     "it")  # fmt: skip
            self.undo()
            raise
        except BaseException:
            self.undo()
            raise
        finally:
            self.close()
        self.say_where_it_ended(last_eval, stopped_early=last_epoch < cfg.epochs)
        return RunResult(str(self.run_dir), state.epoch, state.step, last_eval, state.best_acc,
                         stopped_early=last_epoch < cfg.epochs)  # fmt: skip

    def between_epochs(self) -> None:
        """The rules' work once an epoch is done (svd_dfa's rank cut); where a layer changed
        shape, its new ranks are logged and the step's FLOPs counted again."""
        if self.state.epoch >= self.cfg.epochs:  # nothing trains after the last epoch
            return
        optimizers = [optimizer for optimizer, _, _ in self.optimizers.pairs()]
        if not epoch_end(self.model, self.state.epoch, optimizers):
            return
        self.flops = FlopMeter(self.step, self.optimizers.flop_plan(self.model), self.world.size)
        ranks = {name: layer.rank for name, layer in feedback_layers(self.model)}
        self.log({"event": "ranks", "epoch": self.state.epoch, "step": self.state.step,
                  "ranks": ranks})  # fmt: skip
        self.say(f"ranks after epoch {self.state.epoch}: "
                 + ", ".join(f"{n} {r}" for n, r in ranks.items()))  # fmt: skip

    def dry_run(self, report: Console | None = None) -> RunResult:
        """The layer table, the parameters, the data and one step, printed to ``report``
        (the run's console if none); nothing written."""
        show = report or self.console
        show.print(conversion_report(self.model).table(
            title=f"{self.recipe.model.name}: layers"))  # fmt: skip
        counts = parameter_counts(self.model)
        show.print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        show.print(self.data.describe())
        world = self.world
        x, y = next(self.data.train_batches(0, self.cfg.batch_size, self.cfg.seed, world.rank,
                                            world.size))  # fmt: skip
        out = self.step(x, y, 0)
        show.print(f"one training step: loss {out.loss.item():.4f} on a batch of "
                   f"{len(y)}; nothing written (dry run)")  # fmt: skip
        distributed.stop(world)
        return RunResult(None, 0, 1, None, -1.0, True)

    # ----------------------------------------------------------- evaluation and logs
    def evaluate_and_log(self) -> dict:
        """The test set's evaluation, logged with the (fractional) epoch, and, where images
        were held out of training, the validation set's beside it (``val_acc``): best.pt is
        chosen on validation accuracy where there is one, else on the test set's."""
        state, size = self.state, self.cfg.eval_batch_size
        result = evaluate(self.model, self.data, size, self.world, self.autocast)
        if self.ema is not None:  # the averaged weights, evaluated beside the raw ones
            averaged = evaluate(self.ema.module, self.data, size, self.world, self.autocast)
            result.update({f"ema_{k}": averaged[k] for k in ("loss", "acc", "top5")})
        held_out, chosen = {}, result
        if self.data.has_val:
            chosen = evaluate(self.model, self.data, size, self.world, self.autocast,
                              split="val")  # fmt: skip
            held_out = {f"val_{k}": chosen[k] for k in ("loss", "acc", "bpc", "ppl") if k in chosen}
        epochs_done = round(state.step / self.steps_per_epoch, 4)
        self.log({"event": "eval", "epoch": epochs_done, "step": state.step, "split": "test",
                  "loss": result["loss"], "acc": result["acc"], "top5": result["top5"],
                  **{k: result[k] for k in ("bpc", "ppl") if k in result},
                  **{k: v for k, v in result.items() if k.startswith("ema_")}, **held_out,
                  "per_class_acc": result["per_class_acc"], "lr": self.optimizers.lr,
                  "images_seen": state.images_seen, "train_flops": state.train_flops,
                  "time_s": self.elapsed()})  # fmt: skip
        self.say(f"epoch {epochs_done:g}: {_describe(result, held_out)}")
        state.elapsed_s = self.elapsed()
        if chosen["score"] > state.best_score:
            state.best_score, state.best_acc = chosen["score"], chosen["acc"]
            if self.recipe.output.save_best:
                self.save("best.pt")
        return result

    def log_train(self, summary: WindowSummary, epoch: int, out: StepOutput) -> None:
        state = self.state
        last = self.run_dir / "checkpoints" / "last.pt" if self.run_dir else None
        check_finite(summary.loss, state.step, epoch, last)
        event = {"event": "train", "epoch": epoch + 1, "step": state.step, "split": "train",
                 "loss": summary.loss, "acc": summary.acc, "lr": self.optimizers.lr,
                 "images_seen": state.images_seen, "images_per_s": summary.images_per_s,
                 "data_stall": summary.data_stall, "train_flops": state.train_flops,
                 "time_s": self.elapsed()}  # fmt: skip
        if out.aux_loss is not None:  # not in "loss", which stays comparable
            event["aux_loss"] = float(out.aux_loss)
        self.log(event)

    def log_alignment(self) -> None:
        """Per converted layer: angle and norm ratio of B against W^T, and the cosine of
        the rule's input gradient with backprop's on the fixed probe batch (rank 0 only;
        the model in eval mode for it, its .grad and RNG untouched)."""
        if not self.writes:
            return
        rows = alignment_diagnostics(self.model, *self.probe, plain_task_loss)
        self.log({"event": "alignment", "epoch": round(self.state.step / self.steps_per_epoch, 4),
                  "step": self.state.step, "layers": {r["name"]: {k: r[k] for k in ALIGNMENT_KEYS}
                                                      for r in rows}})  # fmt: skip

    def log_replicas(self) -> None:
        """Under torchrun: whether every rank holds the same model (where promised)."""
        if self.world.distributed:
            differing = distributed.differing_replicas(self.world, self.model)
            self.log({"event": "replicas", "step": self.state.step, "ranks": self.world.size,
                      "identical": not differing, "differing": differing})  # fmt: skip

    def say_where_it_ended(self, last_eval: dict | None, stopped_early: bool) -> None:
        """The run's last line: how far it got, its accuracy and time, and where it is."""
        state, seconds = self.state, self.elapsed()
        took = f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
        accuracy = f"test accuracy {last_eval['acc']:.4f}" if last_eval else "no evaluation"
        best = (f"best {'validation' if self.data.has_val else 'test'} "
                + (f"bpc {-state.best_score / math.log(2):.4f}" if "bpc" in (last_eval or {})
                   else f"accuracy {state.best_acc:.4f}"))  # fmt: skip
        if last_eval and "bpc" in last_eval:
            accuracy = f"test bpc {last_eval['bpc']:.4f}"
        if stopped_early:
            self.say(f"stopped after epoch {state.epoch} of {self.cfg.epochs} (--stop-after), "
                     f"{accuracy}; continue with: ldfa train --resume {self.run_dir}")  # fmt: skip
        else:
            self.say(f"done: {state.epoch} epochs, {state.step} steps in {took}; "
                     f"{accuracy} ({best}, best.pt); run folder "
                     f"{self.run_dir}")  # fmt: skip

    def log(self, event: dict) -> None:
        if self.metrics is not None:
            self.metrics.log(event)

    def say(self, line: str) -> None:
        if self.world.main:
            self.console.print(line)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    # ------------------------------------------------------------ stopping and saving
    def stop_here(self, everywhere: bool = False) -> None:
        """Stop at this step boundary if a SIGINT or SIGTERM came. Under torchrun the ranks
        agree only where they sum their logs (every log_every steps), so that all stop
        together."""
        if everywhere or (self.ctrl_c.requested and not self.world.distributed):
            raise StopRequested(self.ctrl_c.signum)

    def checkpoint_due(self) -> bool:
        """Whether a mid-epoch ``last.pt`` is due (``train.checkpoint_every_steps`` or
        ``_minutes``): rank 0 alone writes, and decides alone."""
        minutes = self.cfg.checkpoint_every_minutes
        return self.writes and (
            _every(self.state.step, self.cfg.checkpoint_every_steps)
            or (minutes is not None and time.perf_counter() - self.saved_at >= 60 * minutes)
        )

    def save(self, name: str) -> None:
        if not self.writes:
            return
        if name == "last.pt":
            self.state.elapsed_s = self.elapsed()
            self.saved_at = time.perf_counter()
        if self.run_files_due:
            write_run_files(self.run_dir, self.recipe, describe_device(self.device),
                            self.world.size, resumed=True)  # fmt: skip
            self.run_files_due = False
        save_checkpoint(self.run_dir / "checkpoints" / name, {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            **self.optimizers.state_dict(),
            "rng": rng_state(self.device),
            "progress": asdict(self.state),
            "config": self.recipe.model_dump(mode="json"),
        })  # fmt: skip
        if self.folder is not None:
            self.folder.keep()  # a run it replaces can go now

    def undo(self) -> None:
        """A run that overwrote another and ends before its first checkpoint puts it back."""
        if self.folder is not None and (restored := self.folder.undo()):
            self.say(restored)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        with contextlib.suppress(Exception):
            distributed.stop(self.world)


def _describe(test: dict, held_out: dict) -> str:
    """An evaluation's line: bits per token for a language model, else accuracy."""
    if "bpc" in test:
        val = f"val bpc {held_out['val_bpc']:.4f}, " if "val_bpc" in held_out else ""
        return f"{val}test bpc {test['bpc']:.4f} (loss {test['loss']:.4f})"
    val = f"val acc {held_out['val_acc']:.4f}, " if held_out else ""
    return f"{val}test loss {test['loss']:.4f} acc {test['acc']:.4f}"


def _every(step: int, period: int | None) -> bool:
    return bool(period) and step % period == 0


def _check_same_optimizers(recipe, saved: dict) -> None:
    """A resume may change values such as lr, not which optimizer holds the state."""
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


def _optimizer_name(config) -> str:
    """'forward' (shares the forward optimizer) or the feedback optimizer's name."""
    if isinstance(config, str):
        return config
    return config["name"] if isinstance(config, dict) else config.name
