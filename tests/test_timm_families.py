"""Conversion across timm's model families at a small input size: it succeeds with default
options and reports every Linear/Conv; at full rank with init: svd every forward parameter's
gradient is backprop's (float64); at rank 8 (default init) a training step runs and the
gradients stay near backprop's; ldfa flops counts the converted layers' phases."""

import copy

import pytest
import timm
import torch
from torch import nn

from ldfa_cli.analysis.flops import flops_report
from ldfa_cli.feedback import backward_with_rules, conversion_report, convert, forward_parameters
from ldfa_cli.feedback.convert import CONVERTIBLE

FAMILIES = {  # small configurations of each family's own class, built at 32x32
    "resnet": lambda: timm.models.resnet.ResNet(
        timm.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10
    ),  # fmt: skip
    "convnext": lambda: timm.models.convnext.ConvNeXt(
        depths=(1, 1, 1, 1), dims=(16, 24, 32, 48), num_classes=10
    ),  # fmt: skip
    "mobilenetv3": lambda: timm.create_model("mobilenetv3_small_050", num_classes=10),
    "regnet": lambda: timm.create_model("regnetx_002", num_classes=10),
    "vit": lambda: timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10
    ),
    "swin": lambda: timm.models.swin_transformer.SwinTransformer(
        img_size=32,
        patch_size=4,
        window_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        num_classes=10,
    ),
    "mixer": lambda: timm.models.mlp_mixer.MlpMixer(
        num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32
    ),  # fmt: skip
    "convmixer": lambda: timm.models.convmixer.ConvMixer(
        dim=16, depth=2, kernel_size=3, patch_size=4, num_classes=10
    ),  # fmt: skip
}


def _build(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().double().eval()
    head = model.get_classifier()
    if isinstance(head, nn.Linear) and not head.weight.any():  # timm's zero-init heads pass
        head.reset_parameters()  # no gradient below them at all: nothing to compare
    return model


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64), torch.tensor([1, 7])


def _grads(model, x, y) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    backward_with_rules(model, nn.functional.cross_entropy(model(x), y), step=1)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in forward_parameters(model)])  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_rank_svd_is_backprop_and_every_layer_is_reported(family):
    reference, (x, y) = _build(family), _batch()
    converted = convert(copy.deepcopy(reference), "ldfa", init="svd", example_input=x)
    report = conversion_report(converted)
    layers = [n for n, m in converted.named_modules() if isinstance(m, CONVERTIBLE)]
    assert [r.name for r in report.rows] == layers and report.converted
    assert all(r.note == "converted" or r.note.startswith("kept: ") for r in report.rows)
    expected, got = _grads(reference, x, y), _grads(converted, x, y)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rank_8_trains_a_step_near_backprop_and_flops_count_it(family):
    reference, (x, y) = _build(family), _batch()
    model = convert(copy.deepcopy(reference), "ldfa", rank=8, example_input=x)
    bp, rule = _grads(reference, x, y), _grads(model, x, y)
    assert torch.isfinite(rule).all()
    relative = float((rule - bp).norm() / bp.norm())
    assert 0 < relative < 5, relative  # the feedback changed the gradients, within reach
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    optimizer.step()
    assert torch.isfinite(_grads(model, x, y)).all()
    report = flops_report(model.float(), x.float(), y)
    assert not report.warnings  # measured equals analytic for every converted layer
    rows = {row["layer"]: row for row in report.layers}
    converted = [r.name for r in conversion_report(model).converted]
    assert set(converted) <= set(rows)
    for name in converted:  # below the break-even rank the input gradient costs less
        layer = model.get_submodule(name)
        if layer.rank * (layer.group_out + layer.patch_size) < layer.group_out * layer.patch_size:
            assert rows[name]["input_grad"] < rows[name]["bp_input_grad"], name


def test_a_recipe_names_any_timm_architecture_and_trains(capsys, tmp_path):
    import yaml

    from tests.helpers import run_cli

    recipe = tmp_path / "timm.yaml"
    recipe.write_text(yaml.safe_dump({
        "description": "t", "model": {"name": "timm", "architecture": "mobilenetv3_small_050",
                                      "kwargs": {"drop_rate": 0.0}},
        "feedback": {"rule": "ldfa", "rank": 4},
        "data": {"dataset": "digits", "subset": 64, "pad_to": 32},
        "train": {"epochs": 1, "batch_size": 32, "log_every": 1},
    }))  # fmt: skip
    code, _, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 0 and "test loss" in err, err
    code, out, err = run_cli(capsys, "train", recipe, "--dry-run", "--device", "cpu")
    assert code == 0 and "blocks.0.0.conv_dw" in out and "depthwise" in out, err
    assert "kept: its input needs no gradient" in " ".join(out.split())


def test_an_unknown_architecture_or_a_too_small_image_is_one_line(capsys):
    from tests.helpers import run_cli

    code, _, err = run_cli(capsys, "train", "fmnist_resnet18_bp", "model.architecture=resnet181",
                           "--print-config")  # fmt: skip
    assert code == 2 and "timm has no architecture 'resnet181'" in err and "resnet18" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "train", "fmnist_convnext_atto_bp", "~data.pad_to",
                           "data.dataset=digits", "--dry-run", "--device", "cpu")  # fmt: skip
    assert code == 2 and "cannot run" in err and "data.pad_to" in err
