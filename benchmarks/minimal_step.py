"""ldfa's training step beside the same step written in the fewest eager PyTorch ops, for
the paper's MLP under normative LDFA (Algorithm 1): how much of ``ldfa bench``'s time/FLOP
gap is the tool's implementation, and how much is the algorithm's own ops on this machine.

A benchmark, not a test. The minimal step has no layer classes, rules, accounting, hooks or
schedules: one small autograd Function per feedback layer whose backward is Q (P g) and
g^T x, eq. 9 as two products per layer after the backward, and one fused AdamW for the
weights and one for the factors, with the recipe's hyperparameters. Before anything is
timed, one step of each from the same weights and batch must give the same weights and
factors: the minimal step is the same algorithm, not a cheaper one.

The four steps (backprop and LDFA, the tool's and the minimal; six with ``--ablate``) take
turns, one step each per round, so that the machine's drifts hit them alike; each time/BP
is against the backprop step written the same way. ``--ablate`` adds the minimal step without its
feedback optimizer, and without both eq. 9 and that optimizer: what each costs in
backprop's time, beside its share of the FLOPs.

    python benchmarks/minimal_step.py [RECIPE [OVERRIDES...]] [--rank 8]
        [--batch-size 256] [--rounds 60] [--threads N] [--ablate] [--device cuda] [--json]

On a GPU (``--device cuda``) the steps are timed with CUDA events, as ``ldfa bench``
times them, in full fp32 as the tool leaves it; there the comparison says how much of a
launch-bound step is the tool's Python.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ldfa_cli.analysis.bench import _timer as timer  # CUDA events on a GPU
from ldfa_cli.analysis.bench import build_variants, flop_rows
from ldfa_cli.config import load_recipe
from ldfa_cli.engine.build import pick_device, synthetic_network
from ldfa_cli.errors import LDFAError


def fail(message: str) -> None:
    """A usage or setting error: one line on stderr and exit code 2, as ``ldfa``'s."""
    print(f"minimal_step: {message}", file=sys.stderr)
    sys.exit(2)


class LowRankLinear(torch.autograd.Function):
    """y = x W^T + b; backward: Q (P g) for the input (eq. 12), g^T x and sum g for W, b."""

    @staticmethod
    def forward(ctx, x, weight, bias, Q, P):
        ctx.save_for_backward(x, Q, P)
        return torch.addmm(bias, x, weight.t())

    @staticmethod
    def backward(ctx, g):
        x, Q, P = ctx.saved_tensors
        grad_x = g.mm(P.t()).mm(Q.t()) if ctx.needs_input_grad[0] else None
        return grad_x, g.t().mm(x), g.sum(0), None, None


def eq9_(weight, Q, P) -> None:
    """Q.grad, P.grad of 1/2 ||QP - W^T||^2 (eq. 9), r rows first as the tool writes them;
    Q.grad in Q's own layout (the fused AdamW does not look at strides)."""
    q = Q.t()
    grad_q = torch.addmm(P.mm(weight), P.mm(P.t()), q, beta=-1)  # (P P^T) Q^T - P W
    grad_p = torch.addmm(q.mm(weight.t()), q.mm(q.t()), P, beta=-1)  # (Q^T Q) P - Q^T W^T
    Q.grad, P.grad = grad_q.t().contiguous(), grad_p


class MinimalMLP:
    """The tool's MLP as plain tensors: (W, b, Q, P) per Linear, Q and P None where the
    layer keeps autograd (the first layer: its input needs no gradient)."""

    def __init__(self, model: nn.Module):
        children = list(model.children())
        if not isinstance(children[0], nn.Flatten) or not all(
            isinstance(m, (nn.Linear, nn.ReLU)) for m in children[1:]
        ):
            kinds = [type(m).__name__ for m in children]
            fail(f"the recipe's model must be the MLP without batch norm (Flatten, Linear, "
                 f"ReLU), got {kinds}")  # fmt: skip
        linears = [m for m in children if isinstance(m, nn.Linear)]
        self.layers = []
        for m in linears:
            Q, P = getattr(m, "feedback_Q", None), getattr(m, "feedback_P", None)
            self.layers.append([nn.Parameter(t.detach().clone()) if t is not None else None
                                for t in (m.weight, m.bias, Q, P)])  # fmt: skip

    def forward(self, x: torch.Tensor, low_rank: bool) -> torch.Tensor:
        h = x.flatten(1)
        for i, (W, b, Q, P) in enumerate(self.layers):
            h = LowRankLinear.apply(h, W, b, Q, P) if low_rank and Q is not None else (
                F.linear(h, W, b))  # fmt: skip
            h = F.relu(h) if i < len(self.layers) - 1 else h
        return h

    def weights(self) -> list:
        return [t for W, b, _, _ in self.layers for t in (W, b)]

    def factors(self) -> list:
        return [t for _, _, Q, P in self.layers if Q is not None for t in (Q, P)]


def adamw(config, params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                             betas=config.betas, eps=config.eps, fused=True)  # fmt: skip


def minimal_step(recipe, net: MinimalMLP, x, y, low_rank: bool, eq9=True, feedback_opt=True):
    forward_opt = adamw(recipe.optim, net.weights())
    factor_opt = adamw(recipe.feedback.optimizer, net.factors()) if low_rank else None

    def step() -> None:
        forward_opt.zero_grad(set_to_none=True)
        F.cross_entropy(net.forward(x, low_rank), y).backward()
        if low_rank and eq9:
            with torch.no_grad():
                for W, _, Q, P in net.layers:
                    if Q is not None:
                        eq9_(W, Q, P)
            if feedback_opt:
                factor_opt.step()
        forward_opt.step()

    return step


def check_recipe(recipe) -> None:
    f = recipe.feedback
    problems = [
        recipe.model.name != "mlp" and "model.name must be mlp",
        f.rule != "ldfa" and "feedback.rule must be ldfa",
        f.options.get("interval", 1) != 1 and "eq. 9 must run every step (interval 1)",
        recipe.optim.name != "adamw" and "optim.name must be adamw",
        getattr(f.optimizer, "name", None) != "adamw" and "feedback.optimizer must be an adamw",
        (recipe.optim.amsgrad or getattr(f.optimizer, "amsgrad", False)) and "no amsgrad",
        (recipe.optim.grad_clip or recipe.optim.grad_clip_value) and "no gradient clipping",
        recipe.optim.no_decay_bias_norm and "optim.no_decay_bias_norm must be false",
        recipe.train.precision != "fp32" and "train.precision must be fp32",
        recipe.train.compile and "train.compile must be off",
    ]
    problems = [p for p in problems if p]
    if problems:
        fail("the minimal step writes one setting only: " + "; ".join(problems))


def agree(tool_variant, recipe, x, y) -> float:
    """One step of the tool's LDFA and of the minimal LDFA from the same state and batch;
    the largest difference of the weights and factors after it, relative to their size."""
    net = MinimalMLP(tool_variant.model)
    minimal_step(recipe, net, x, y, low_rank=True)()
    tool_variant.step()
    after = [t for m in tool_variant.model.modules() if isinstance(m, nn.Linear)
             for t in (m.weight, m.bias, getattr(m, "feedback_Q", None),
                       getattr(m, "feedback_P", None)) if t is not None]  # fmt: skip
    mine = [t for layer in net.layers for t in layer if t is not None]
    return max(((a - b).abs().max() / b.abs().max()).item()
               for a, b in zip(after, mine, strict=True))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", default="fmnist_mlp_ldfa_r10")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu (the default), cuda or auto")
    parser.add_argument("--ablate", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        recipe, path = load_recipe(args.recipe, args.overrides)
    except LDFAError as error:
        fail(str(error))
    check_recipe(recipe)
    device = pick_device(args.device)
    tool_bp, tool_ldfa = build_variants(recipe, [args.rank], args.batch_size, device)
    x, y = _batch(recipe, args.batch_size, device)
    difference = agree(tool_ldfa, recipe, x, y)
    if difference > 1e-4:
        sys.exit(f"minimal_step: the minimal step differs from the tool's by {difference:.1e} "
                 f"after one step: it is not the same algorithm")  # fmt: skip
    net = MinimalMLP(tool_ldfa.model)
    steps = {"tool bp": tool_bp.step, f"tool ldfa r={args.rank}": tool_ldfa.step,
             "minimal bp": minimal_step(recipe, MinimalMLP(tool_ldfa.model), x, y, False),
             f"minimal ldfa r={args.rank}": minimal_step(recipe, net, x, y, True)}  # fmt: skip
    if args.ablate:
        steps["minimal, no feedback optimizer"] = minimal_step(
            recipe, MinimalMLP(tool_ldfa.model), x, y, True, feedback_opt=False
        )
        steps["minimal, no eq. 9 nor feedback optimizer"] = minimal_step(
            recipe, MinimalMLP(tool_ldfa.model), x, y, True, eq9=False
        )
    times, timed = {label: [] for label in steps}, timer(device)
    for _ in range(5):
        for step in steps.values():
            step()
    for _ in range(args.rounds):
        for label, step in steps.items():
            times[label].append(timed(step))
    ms = {label: statistics.median(t) * 1e3 for label, t in times.items()}
    bp_flops = tool_bp.total_flops
    rows = flop_rows(tool_ldfa.flops)
    eq9_share = rows["feedback_update"] / bp_flops
    flop_ratio = tool_ldfa.total_flops / bp_flops
    result = {"recipe": path.stem, "rank": args.rank, "batch_size": args.batch_size,
              "device": str(device), "threads": torch.get_num_threads(), "rounds": args.rounds,
              "max_relative_difference": difference, "ms": ms, "flop_ratio": flop_ratio,
              "eq9_flop_share": eq9_share, "time_ratio": {}}  # fmt: skip
    for label in ms:
        base = ms["tool bp"] if label.startswith("tool") else ms["minimal bp"]
        result["time_ratio"][label] = ms[label] / base
    if args.json:
        print(json.dumps(result))
        return
    print(f"{path.stem}, batch {args.batch_size}, {device}, {torch.get_num_threads()} threads, "
          f"median of "
          f"{args.rounds} (one step of each agrees to {difference:.0e})")  # fmt: skip
    print(f"  FLOPs/BP {flop_ratio:.3f} (the tool's count; eq. 9's share {eq9_share:.3f})")
    for label, ratio in result["time_ratio"].items():
        gap = f"  gap {ratio - flop_ratio:+.3f}" if "ldfa" in label else ""
        print(f"  {label:42s} {ms[label]:7.2f} ms  time/BP {ratio:.3f}{gap}")


def _batch(recipe, batch_size, device):
    _, x, y = synthetic_network(recipe, batch_size, device)
    return x, y


if __name__ == "__main__":
    main()
