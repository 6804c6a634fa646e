"""The training step (engine/step.py): what it runs, in which order, and what it leaves."""

import contextlib

import timm
import torch
from torch import nn

from ldfa_cli.config import validate
from ldfa_cli.engine.optim import build_optimizers
from ldfa_cli.engine.step import TrainStep
from ldfa_cli.feedback import convert, feedback_loss


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))


def test_it_takes_a_compiled_module_which_has_no_truth_value():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=4)
    compiled = torch.compile(vit)  # (nothing compiles until it runs)
    assert TrainStep(vit, net=compiled).net is compiled


def test_eq_9_runs_where_due_and_the_step_ends_with_the_gradients_without_optimizers():
    model = convert(_mlp(), "ldfa", rank=2, interval=2, example_input=torch.randn(2, 12))
    x, y = torch.randn(6, 12), torch.randint(0, 4, (6,))
    step = TrainStep(model)
    factors = [p for n, p in model.named_parameters() if "feedback" in n]
    step(x, y, index=1)  # eq. 9 not due
    assert all(p.grad is None for p in factors)
    step(x, y, index=2)  # due: the gradients of eq. 8 (the factors have no data gradient)
    reference = [p.grad.clone() for p in factors]
    for p in factors:
        p.grad = None
    feedback_loss(model).backward()
    for got, want in zip(reference, [p.grad for p in factors], strict=True):
        torch.testing.assert_close(got, want)


def test_one_step_is_forward_loss_backward_and_both_optimizers():
    recipe = validate({"feedback": {"rule": "ldfa", "rank": 2,
                                    "optimizer": {"name": "sgd", "lr": 0.5}},
                       "optim": {"name": "sgd", "lr": 0.1}})  # fmt: skip
    model = convert(_mlp(), "ldfa", rank=2, example_input=torch.randn(2, 12))
    twin = convert(_mlp(), "ldfa", rank=2, example_input=torch.randn(2, 12))
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 12), torch.randint(0, 4, (6,))
    out = TrainStep(model, build_optimizers(recipe, model, steps_per_epoch=1))(x, y, 0)

    loss = nn.functional.cross_entropy(twin(x), y)  # the same step written out by hand
    loss.backward()
    feedback_loss(twin).backward()
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p -= (0.5 if "feedback" in name else 0.1) * p.grad
    torch.testing.assert_close(out.loss, loss.detach())
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_an_observer_sees_the_phases_in_order():
    seen = []

    class Observer:
        @contextlib.contextmanager
        def phase(self, name):
            seen.append(f"{name} in")
            yield
            seen.append(f"{name} out")

    step = TrainStep(_mlp())
    step.observer = Observer()
    step(torch.randn(4, 12), torch.randint(0, 4, (4,)), 0)
    assert seen == ["forward in", "forward out", "backward in", "backward out",
                    "optimizer in", "optimizer out"]  # fmt: skip


def test_every_optimizer_is_fused_or_foreach_never_a_loop_over_tensors():
    from types import SimpleNamespace

    from ldfa_cli.engine.optim import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    base = {"lr": 0.1, "weight_decay": 0.0, "betas": (0.9, 0.99), "eps": 1e-8,
            "amsgrad": False, "momentum": 0.0, "alpha": 0.99}  # fmt: skip
    for name in ("adam", "adamw", "sgd", "rmsprop"):
        optimizer = make_optimizer(SimpleNamespace(name=name, **base), params)
        assert optimizer.defaults.get("fused") or optimizer.defaults.get("foreach"), name
    assert make_optimizer(SimpleNamespace(name="rmsprop", **base), params).defaults["foreach"]
    assert make_optimizer(SimpleNamespace(name="adamw", **base), params).defaults["fused"]
