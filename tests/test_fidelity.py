"""The options that run an experiment as the paper's text or as the authors' code does:
each equals a hand computation of what its source says."""

import math

import pytest
import torch
import yaml
from torch import nn

from ldfa_cli.config import ConfigError, load_recipe, validate
from ldfa_cli.feedback import LDFAConv2d, LDFALinear, convert, feedback_parameters, reset_due
from tests.helpers import run_cli, train_one_epoch_then_resume


# ---------------------------------------------------------------- local rule (Alg. 2)
def _authors_oja(P, g):
    """The authors' code in this package's layout: the error centred over the batch and
    divided by its largest per-unit (unbiased) std, C = G^T G, P.grad = -P C (I - P^T P)."""
    gc = g - g.mean(0)
    gn = gc / (gc.std(0, unbiased=True).max() + 1e-8)
    C = gn.t() @ gn
    return -(P @ C @ (torch.eye(P.shape[1]) - P.t() @ P))


def test_oja_std_normalisation_equals_the_authors_formula():
    layer = LDFALinear(7, 9, rule="ldfa_local", rank=4, normalise="std")
    x = torch.randn(32, 7, requires_grad=True)
    g = torch.randn(32, 9) * torch.linspace(0.5, 3.0, 9)
    layer(x).backward(g)
    expected = _authors_oja(layer.feedback_P.detach(), g)
    torch.testing.assert_close(layer.feedback_P.grad, expected, rtol=1e-4, atol=1e-6)


def test_oja_std_is_gamma_times_samples_minus_one():
    """Same direction as Algorithm 2's C / gamma, T - 1 times the step (T samples)."""
    x, g = torch.randn(16, 5), torch.randn(16, 6)
    grads = {}
    for how in ("gamma", "std"):
        torch.manual_seed(0)
        layer = LDFALinear(5, 6, rule="ldfa_local", rank=3, normalise=how)
        layer(x.clone().requires_grad_(True)).backward(g)
        grads[how] = layer.feedback_P.grad
    torch.testing.assert_close(grads["std"], 15 * grads["gamma"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("make", "bounds"),
    [  # (P, Q) bounds. App. B as the authors draw it: P ~ U(+-1/sqrt(r)), Q ~ U(+-sqrt(3/N))
        (lambda: LDFALinear(40, 30, rule="ldfa_local", rank=5, init="kaiming"),
         (1 / math.sqrt(5), math.sqrt(3 / 40))),
        (lambda: LDFAConv2d(4, 6, 3, rule="ldfa", rank=5, init="kaiming"),
         (1 / math.sqrt(5), math.sqrt(3 / 36))),
        # read literally: PyTorch's default of each stored factor, the paper's layout
        (lambda: LDFALinear(40, 30, rule="ldfa_local", rank=5, init="kaiming_literal"),
         (1 / math.sqrt(30), 1 / math.sqrt(5))),
        (lambda: LDFAConv2d(4, 6, 3, rule="ldfa_local", rank=5, init="kaiming_literal"),
         (1 / math.sqrt(6), 1 / math.sqrt(36))),
    ],
)  # fmt: skip
def test_kaiming_factor_inits_reach_their_bounds_and_never_exceed_them(make, bounds):
    torch.manual_seed(0)
    layer = make()
    for tensor, bound in zip((layer.feedback_P, layer.feedback_Q), bounds, strict=True):
        top = tensor.detach().abs().max().item()
        assert 0.8 * bound < top <= bound


@pytest.mark.parametrize("rule", ["ldfa", "lowrank_fa", "ldfa_local"])
def test_matched_init_scales_feedback_to_the_layers_own_weight(rule):
    """||QP||_F = ||W_r||_F (W's best rank-r approximation) whatever W's own scale; the
    Oja rule starts P with orthonormal rows, so the match holds at its fixed point."""
    from ldfa_cli.feedback.factors import best_rank_norm

    for scale in (0.02, 1.0):
        torch.manual_seed(0)
        layer = LDFALinear(40, 30, rule=rule, rank=5)
        with torch.no_grad():
            layer.weight.mul_(scale)
        layer.rule.create_feedback(layer)  # draw again for this W
        product = (layer.feedback_Q @ layer.feedback_P).detach().double().norm()
        torch.testing.assert_close(product, best_rank_norm(layer, 5)[0], rtol=1e-5, atol=0)
        if rule == "ldfa_local":
            P = layer.feedback_P.detach()
            torch.testing.assert_close(P @ P.t(), torch.eye(5), atol=1e-5, rtol=0)
    fa = LDFALinear(40, 30, rule="fa")
    torch.testing.assert_close(fa.feedback_B.double().norm(), fa.weight.detach().double().norm())


def test_clamp_input_grad_clamps_what_is_sent_upstream():
    torch.manual_seed(0)
    layer = LDFALinear(6, 4, rule="ldfa_local", rank=2, clamp_input_grad=0.05)
    x = torch.randn(8, 6, requires_grad=True)
    g = 10 * torch.randn(8, 4)
    layer(x).backward(g)
    unclamped = (g @ layer.feedback_P.detach().t()) @ layer.feedback_Q.t()
    torch.testing.assert_close(x.grad, unclamped.clamp(-0.05, 0.05))
    assert (unclamped.abs() > 0.05).any()


# --------------------------------------------------------------- normative (authors)
def test_lowrank_svd_at_full_rank_reproduces_w_transpose_and_keeps_the_rng():
    torch.manual_seed(0)
    layer = LDFALinear(12, 9, rule="ldfa", rank=9, init="svd", svd="lowrank", svd_niter=4,
                       reset_svd_every=1)  # fmt: skip
    torch.testing.assert_close(layer.feedback_Q @ layer.feedback_P, layer.weight.t().detach(),
                               atol=1e-5, rtol=1e-4)  # fmt: skip
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    assert reset_due(layer, step=1) == 1
    assert torch.equal(torch.rand(3), expected)  # its random start was drawn aside


def test_reset_every_half_epoch_is_floored_steps_as_the_authors_loader():
    layer = LDFALinear(6, 5, rule="ldfa", rank=2, reset_svd_every_epochs=0.5)
    assert layer.rule.reset_every(235) == 117 and layer.rule.reset_every(None) is None
    resets = [s for s in range(1, 400) if reset_due(layer, s, steps_per_epoch=235)]
    assert resets == [117, 234, 351]


def test_rank_scale_gives_qkv_three_times_the_rank():
    import timm

    model = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, num_classes=3, embed_dim=32, depth=1, num_heads=2
    )
    x = torch.randn(2, 3, 8, 8)
    convert(model, "ldfa", rank=4, rank_scale={"*.qkv": 3}, example_input=x)
    ranks = {name: layer.rank for name, layer in model.named_modules() if hasattr(layer, "rank")}
    assert ranks["blocks.0.attn.qkv"] == 12 and ranks["blocks.0.attn.proj"] == 4
    fraction = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, num_classes=3, embed_dim=32, depth=1, num_heads=2
    )
    convert(fraction, "ldfa", rank=0.125, rank_scale={"*.qkv": 2}, example_input=x)
    assert fraction.blocks[0].attn.qkv.rank == 2 * 12  # 96/8 first, then times 2


# ----------------------------------------------------- one optimizer for W, P, Q (C.3)
def _mlp_recipe(**feedback):
    return validate({"model": {"name": "mlp", "widths": [8]}, "data": {"dataset": "digits"},
                     "feedback": {"rule": "ldfa_local", "rank": 2, **feedback}})  # fmt: skip


def test_feedback_optimizer_forward_puts_every_tensor_in_one_optimizer():
    from ldfa_cli.engine.optim import build_optimizers
    from ldfa_cli.models import InputShape, build_model

    recipe = _mlp_recipe(optimizer="forward", options={"learn_q": True})
    model = convert(build_model(recipe.model, InputShape(1, 8, 10)), "ldfa_local", rank=2,
                    learn_q=True)  # fmt: skip
    optimizers = build_optimizers(recipe, model, steps_per_epoch=10)
    held = {id(p) for g in optimizers.forward.param_groups for p in g["params"]}
    assert optimizers.feedback is None
    assert {id(p) for p in feedback_parameters(model)} <= held
    assert held == {id(p) for p in model.parameters()}


def test_feedback_schedule_with_the_forward_optimizer_is_refused():
    with pytest.raises(ConfigError, match="feedback.schedule"):
        validate({"feedback": {"rule": "ldfa_local", "optimizer": "forward",
                               "schedule": {"name": "cosine"}}})  # fmt: skip


def test_grad_clip_value_clamps_each_element():
    from ldfa_cli.engine.optim import clip_gradients

    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([-30.0, -2.0, 5.0, 12.0])
    clip_gradients([p], validate({"optim": {"grad_clip_value": 10}}).optim)
    assert p.grad.tolist() == [-10.0, -2.0, 5.0, 10.0]


def test_local_rule_recipe_with_forward_optimizer_trains_and_resumes(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "description": "t", "model": {"name": "mlp", "widths": [16], "batch_norm": True},
        "feedback": {"rule": "ldfa_local", "rank": 3, "optimizer": "forward",
                     "options": {"init": "kaiming", "learn_q": True, "normalise": "std",
                                 "clamp_input_grad": 1.0, "use_targets": True}},
        "data": {"dataset": "digits", "subset": 128, "normalise": "pixel"},
        "train": {"epochs": 2, "batch_size": 32, "log_every": 1, "deterministic": True},
    }))  # fmt: skip
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_cli(capsys, "train", recipe, "--out", whole, "--device", "cpu")[0] == 0
    train_one_epoch_then_resume(capsys, recipe, part)
    from ldfa_cli.engine.metrics import read_metrics

    def losses(run):
        return [e["loss"] for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"]

    assert losses(whole) == losses(part)


# --------------------------------------------------------------------- data and model
def test_normalisations_per_channel_per_pixel_and_symmetric():
    from ldfa_cli.data import load_data

    for how in ("channel", "pixel", "symmetric"):
        data = load_data(validate({"data": {"dataset": "digits", "normalise": how}}).data)
        x = data.normalise(data.train.images).double()
        if how == "channel":
            assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-3
        elif how == "pixel":
            varying = data.train.images.double().std(0) > 0
            torch.testing.assert_close(x.mean(0), torch.zeros_like(x[0]), atol=1e-5, rtol=0)
            assert torch.allclose(x.std(0)[varying], torch.ones(1).double(), atol=1e-3)
        else:
            assert x.min() >= -1 and x.max() <= 1 and data.mean.flatten().tolist() == [0.5]


def test_mlp_inits_and_batch_norm():
    from ldfa_cli.models import InputShape, build_model

    shape = InputShape(1, 8, 10)
    torch.manual_seed(0)
    default = build_model(validate({"model": {"name": "mlp", "widths": [256]}}).model, shape)
    bound = 1 / math.sqrt(64)
    assert 0.9 * bound < default.fc1.weight.abs().max() <= bound  # nn.Linear's own
    relu = build_model(validate({"model": {"name": "mlp", "widths": [256],
                                           "init": "kaiming_uniform"}}).model, shape)  # fmt: skip
    bound = math.sqrt(6 / 64)
    assert 0.9 * bound < relu.fc1.weight.abs().max() <= bound and relu.fc1.bias.eq(0).all()
    bn = build_model(validate({"model": {"name": "mlp", "widths": [16, 16],
                                         "batch_norm": True}}).model, shape)  # fmt: skip
    kinds = [type(m).__name__ for m in bn]
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d",
                     "ReLU", "Linear"]  # fmt: skip


def test_autoaugment_is_per_image_seeded_and_leaves_the_rng_alone():
    from ldfa_cli.data.device import auto_augment

    torch.manual_seed(0)
    one = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    batch = one.expand(64, -1, -1, -1).contiguous()  # 64 copies of one image
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    out = auto_augment(batch, "cifar10", torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(2), expected)  # training's RNG stream untouched
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 8  # each image drew its own sub-policy, not one for the batch
    again = auto_augment(batch, "cifar10", torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_reference_block_needs_one_number_and_a_source():
    with pytest.raises(ConfigError, match="exactly one of top1 and top1_error"):
        validate({"reference": {"top1": 0.9, "top1_error": 0.1, "source": "x"}})
    with pytest.raises(ConfigError, match="reference.source"):
        validate({"reference": {"top1": 0.9}})
    recipe = validate({"reference": {"top1_error": 0.0863, "source": "BioTorch"}})
    assert recipe.reference.accuracy == pytest.approx(0.9137)


def test_shipped_recipes_with_a_reference_validate():
    from ldfa_cli.config import shipped_recipes

    for path in shipped_recipes():
        recipe, _ = load_recipe(str(path))
        if recipe.reference is not None:
            assert 0 < recipe.reference.accuracy <= 1 and recipe.reference.source
