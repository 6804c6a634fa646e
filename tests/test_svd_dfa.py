"""svd_dfa (feedback/svd.py): the SVD form computes the layer, its gradients equal a hand
computation of every term (broadcast, projection, alignment), no factor of the forward
pathway is read to send the error down, the orthogonality term keeps U and V orthonormal
(and without it they drift), FLOPs measured equal analytic."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldfa_cli.analysis.flops import flops_report
from ldfa_cli.engine.metrics import read_metrics
from ldfa_cli.feedback import (
    auxiliary_loss,
    backward_with_rules,
    conversion_report,
    convert,
    feedback_layers,
    forward_parameters,
)
from ldfa_cli.feedback.svd import SVDConv2d, SVDLinear, factor_measures, svd_parameter_count
from tests.helpers import analytic, run_cli, train_one_epoch_then_resume
from tests.test_broadcast import _WeightWatch
from tests.test_train import write_recipe


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _cnn():
    """Two convs whose stride, padding and dilation differ between H and W (so that the
    spatial split's two stages cannot swap them unseen), then a Linear layer."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, (3, 2), padding=(1, 2), stride=(2, 1)), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=(2, 1), dilation=(2, 1), stride=(1, 3)),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))  # fmt: skip


def _expected_factor_grads(layer, x, delta):
    """Autograd's gradients of U, s, V, b for y = layer(x) with W = U diag(s) V^T, given the
    output gradient ``delta``: what the layer must return for the error ``delta``."""
    U, s, V = (p.detach().clone().requires_grad_() for p in (layer.svd_U, layer.svd_s, layer.svd_V))
    b = layer.bias.detach().clone().requires_grad_()
    rows = (U * s) @ V.t()
    if isinstance(layer, SVDConv2d):
        m, n, (kh, kw) = layer.out_channels, layer.in_channels, layer.kernel_size
        if layer.split == "spatial":  # rows (n', w) x (c, h): K'[(n', w), (c, h)] = K[n', c, h, w]
            W = rows.reshape(m, kw, n, kh).permute(0, 2, 3, 1)
        else:
            W = rows.reshape(m, n, kh, kw)
        y = F.conv2d(x, W, b, layer.stride, layer.padding, layer.dilation)
    else:
        y = F.linear(x, rows, b)
    y.backward(delta)
    return U.grad, s.grad, V.grad, b.grad


def _alignment_grad(U, g):
    """d/dU of ||g (I - U U^T)||^2 / ||g||^2 with g fixed (item 4), by autograd."""
    U = U.detach().clone().requires_grad_()
    rows = g.movedim(1, -1).reshape(-1, g.shape[1]) if g.dim() == 4 else g
    residual = rows - rows @ U @ U.t()
    (residual.square().sum() / rows.square().sum()).backward()
    return U.grad


def _project(delta, U):
    """delta U U^T over channels (dim 1 of a map, the last of a matrix)."""
    if delta.dim() == 4:
        return torch.einsum("nchw,ck,dk->ndhw", delta, U, U)
    return delta @ U @ U.t()


def _cosine_pull(layer, x, delta):
    """d/dy of mean_i [1 - cos(y_i, -delta_i)], y the layer's output without its bias, a
    sample a row (Linear) or a whole map (conv), by autograd (item 4, align_loss cosine)."""
    y = (layer(x) - (layer.bias.view(-1, 1, 1) if x.dim() == 4 else layer.bias)).detach()
    y.requires_grad_()
    n = len(y)
    (1 - F.cosine_similarity(y.reshape(n, -1), -delta.reshape(n, -1), dim=1)).mean().backward()
    return y.grad


def _check_layer(layer, x, delta, align):
    U = layer.svd_U.detach()
    received = _project(delta, U) if layer.rule.project else delta
    gb = _expected_factor_grads(layer, x, received)[3]
    if align and layer.rule.align_loss == "cosine":
        received = received + align * _cosine_pull(layer, x, delta)
    gu, gs, gv, _ = _expected_factor_grads(layer, x, received)
    if align and layer.rule.align_loss == "subspace":
        gu = gu + align * _alignment_grad(U, delta)
    torch.testing.assert_close(layer.svd_U.grad, gu)
    torch.testing.assert_close(layer.svd_s.grad, gs)
    torch.testing.assert_close(layer.svd_V.grad, gv)
    torch.testing.assert_close(layer.bias.grad, gb)


def test_full_rank_svd_form_computes_the_dense_layer():
    model, x = _mlp(), torch.randn(7, 4)
    cnn, xi = _cnn(), torch.randn(2, 3, 8, 8)
    before, before_cnn = model(x), cnn(xi)
    convert(model, "svd_dfa", example_input=x)
    convert(cnn, "svd_dfa", example_input=xi)
    assert isinstance(model[0], SVDLinear) and isinstance(model[0], nn.Linear)
    assert isinstance(cnn[2], SVDConv2d) and isinstance(cnn[2], nn.Conv2d)
    torch.testing.assert_close(model(x), before)
    torch.testing.assert_close(cnn(xi), before_cnn)
    rows = {r.name: r for r in conversion_report(model).rows}
    assert all(r.rule == "svd_dfa" for r in rows.values())  # the first layer too: SVD form
    assert not hasattr(model[0], "feedback_B")  # its input needs no gradient: no B
    assert "weight" not in model[0].state_dict() and "svd_U" in model[0].state_dict()


def test_low_rank_has_fewer_parameters_and_truncates_the_svd():
    model, x = _mlp(), torch.randn(7, 4)
    W = model[2].weight.detach().clone()
    convert(model, "svd_dfa", rank=2, example_input=x)
    layer = model[2]
    assert layer.rank == 2 and tuple(layer.svd_U.shape) == (5, 2)
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(layer.weight.detach(), (U[:, :2] * S[:2]) @ Vh[:2])
    svd, dense = svd_parameter_count(layer)
    assert svd == 2 * (5 + 6 + 1) + 5 and dense == 5 * 6 + 5


def test_a_fractional_rank_is_read_against_the_output_width_and_its_clip_reported():
    """k = 1.0 x m: the layer 4 -> 6 (full rank 4) asked 6 and clipped; the report says so
    (not against the 3 classes of the error that dfa's own ranks refer to)."""
    model, x = _mlp(), torch.randn(7, 4)
    convert(model, "svd_dfa", rank=1.0, example_input=x)
    report = conversion_report(model)
    assert [model[i].rank for i in (0, 2, 4)] == [4, 5, 3]
    assert model[0].rank_clipped_from == 6 and model[2].rank_clipped_from is None
    assert (
        report.clipped_note() == "rank above the full rank of 1 layer(s), clipped to it: 0 (6 -> 4)"
    )


@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("align", [0.0, 0.5])
@pytest.mark.parametrize("align_loss", ["cosine", "subspace"])
def test_mlp_gradients_equal_hand_computation(project, align, align_loss):
    model, x, target = _mlp(), torch.randn(7, 4), torch.randn(7, 3)
    convert(model, "svd_dfa", rank=2, example_input=x, project=project, align=align,
            align_loss=align_loss, orth=0.0)  # fmt: skip
    out = model(x)
    ((out - target) ** 2).sum().div(2).backward()
    e = out.detach() - target  # the source error
    h1 = torch.tanh(model[0](x)).detach()
    h2 = torch.tanh(model[2](h1)).detach()
    delta2 = (e @ model[4].feedback_B.t()) * (1 - h2**2)  # fc2's output gets B_fc3 e * f'
    delta1 = (e @ model[2].feedback_B.t()) * (1 - h1**2)
    _check_layer(model[4], h2, e, align)
    _check_layer(model[2], h1, delta2, align)
    _check_layer(model[0], x, delta1, align)


@pytest.mark.parametrize("options", [
    {}, {"conv_split": "channel"},
    {"align_loss": "subspace", "project": True, "conv_split": "channel"},
])  # fmt: skip
def test_conv_gradients_equal_hand_computation(options):
    cnn, x = _cnn(), torch.randn(2, 3, 8, 8)
    convert(cnn, "svd_dfa", rank=3, example_input=x, align=0.3, orth=0.0, **options)
    out = cnn(x)
    out.square().sum().div(2).backward()
    e = out.detach()
    a1 = cnn[0](x).detach()
    h1 = torch.relu(a1)
    a2 = cnn[2](h1).detach()
    h2 = torch.relu(a2).flatten(1)
    delta2 = (e @ cnn[5].feedback_B.t()).view(a2.shape) * (a2 > 0)  # a dense map into conv2
    delta1 = (e @ cnn[2].feedback_B.t()).view(a1.shape) * (a1 > 0)
    _check_layer(cnn[5], h2, e, 0.3)
    _check_layer(cnn[2], h1, delta2, 0.3)
    _check_layer(cnn[0], x, delta1, 0.3)


def test_no_forward_factor_is_read_to_send_the_error_down():
    model, x = _mlp(), torch.randn(7, 4)
    convert(model, "svd_dfa", rank=2, example_input=x)
    loss = model(x).pow(2).sum()
    V = [layer.svd_V for _, layer in feedback_layers(model)]
    with _WeightWatch(V) as watch:
        loss.backward()
    assert watch.hits == []  # backprop's input gradient would be (z s) V^T
    with _WeightWatch(V) as watch:  # the check can fail: backprop through the factors
        F.linear(torch.randn(3, 5, requires_grad=True), model[4].weight).sum().backward()
    assert watch.hits


def test_orthogonality_term_is_the_formula_and_reaches_the_loss():
    model, x = _mlp(), torch.randn(7, 4)
    convert(model, "svd_dfa", rank=2, example_input=x, orth=0.25)
    with torch.no_grad():
        model[2].svd_U.mul_(1.5)
    expected = 0.0
    for _, layer in feedback_layers(model):
        for factor in (layer.svd_U, layer.svd_V):
            gram = factor.t() @ factor
            expected = expected + 0.25 * (gram - torch.eye(gram.shape[0])).square().sum()
    torch.testing.assert_close(auxiliary_loss(model), expected)
    off, _ = _mlp(), None
    convert(off, "svd_dfa", rank=2, example_input=x, orth=0.0)
    assert auxiliary_loss(off) is None


def _train_factors(orth: float, steps: int = 120) -> tuple[float, float]:
    torch.manual_seed(0)
    x = torch.randn(256, 20)
    y = (x @ torch.randn(20, 10)).argmax(1)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))  # fmt: skip
    convert(model, "svd_dfa", rank=16, example_input=x, orth=orth)
    optimizer = torch.optim.Adam(forward_parameters(model), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        backward_with_rules(model, F.cross_entropy(model(x), y))
        optimizer.step()
    errors = [factor_measures(layer) for _, layer in feedback_layers(model)]
    return max(e["u_orth_error"] for e in errors), max(e["v_orth_error"] for e in errors)


def test_orthogonality_term_keeps_factors_orthonormal_and_they_drift_without_it():
    on = _train_factors(orth=1.0)
    off = _train_factors(orth=0.0)
    assert max(on) < 0.1, on  # ||F^T F - I||_F at the end of training, F = U or V
    assert min(off) > 1.0, off


def test_feedback_in_svd_form_is_dfa_s_draw_truncated_to_the_layer_rank():
    model, x = _mlp(), torch.randn(7, 4)
    torch.manual_seed(3)
    convert(model, "svd_dfa", rank=2, example_input=x, feedback_form="dense")
    svd = _mlp()
    torch.manual_seed(3)
    convert(svd, "svd_dfa", rank=2, example_input=x)
    for dense, truncated in ((model[2].feedback_B, svd[2].feedback_B),
                             (model[4].feedback_B, svd[4].feedback_B)):  # fmt: skip
        U, S, Vh = torch.linalg.svd(dense.double())
        torch.testing.assert_close(truncated.double(), (U[:, :2] * S[:2]) @ Vh[:2])
        assert torch.linalg.matrix_rank(truncated) == 2


def test_cosine_alignment_turns_the_layer_output_toward_the_descent_direction():
    """align_loss cosine: the factors learn from the pull alone (no task gradient) and the
    output of every sample turns toward -g, the error it receives (cos -> -1)."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(5, 8))
    x = torch.randn(32, 5)
    convert(layer, "svd_dfa", rank=4, example_input=x, align=1.0, orth=0.0)
    optimizer = torch.optim.Adam(forward_parameters(layer), lr=0.02)
    error = torch.randn(32, 8)

    def mean_cos() -> float:
        y = layer[0](x).detach() - layer[0].bias.detach()
        return float(F.cosine_similarity(y, error, dim=1).mean())

    start = mean_cos()
    for _ in range(300):
        optimizer.zero_grad()
        backward_with_rules(layer, (layer(x) * error).sum() * 1e-6)  # dL/dy ~ 0: the pull
        optimizer.step()
    assert start > -0.5 and mean_cos() < start - 0.3


def test_alignment_turns_u_toward_the_received_error():
    """The first reading (align_loss subspace, project on): U's span turns only through the
    alignment term: fed a fixed error from a 2-dimensional subspace, L_align falls toward 0
    with it and stays put without."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 2))[0]

    def residual_after(align: float) -> tuple[float, float]:
        torch.manual_seed(1)
        layer = nn.Sequential(nn.Linear(5, 8))
        x = torch.randn(64, 5)
        convert(layer, "svd_dfa", rank=2, example_input=x, align=align, orth=1.0,
                align_loss="subspace", project=True)  # fmt: skip
        optimizer = torch.optim.SGD([layer[0].svd_U], lr=0.05)  # U alone: its span
        error = torch.randn(64, 2) @ basis.t()
        fraction = []
        for _ in range(200):
            optimizer.zero_grad()
            # dL/dy = 1e-3 error: L_align is scale-free, the task's own U gradient tiny
            backward_with_rules(layer, (layer(x) * error).sum() * 1e-3)
            U = layer[0].svd_U.detach()
            outside = (error - error @ U @ U.t()).square().sum() / error.square().sum()
            fraction.append(float(outside))
            optimizer.step()
        return fraction[0], fraction[-1]

    start, end = residual_after(1.0)
    assert start > 0.3 and end < 0.01
    start, end = residual_after(0.0)
    assert end > 0.3


def test_svd_flops_measured_equal_analytic():
    for make, x in ((_mlp, torch.randn(5, 4)), (_cnn, torch.randn(2, 3, 8, 8))):
        for options in (
            {},
            {"align": 0.0},
            {"conv_split": "channel"},
            {"project": True, "align_loss": "subspace", "conv_split": "channel"},
        ):
            model = make()
            convert(model, "svd_dfa", rank=2, example_input=x, **options)
            report = flops_report(model, x, torch.randint(0, 3, (len(x),)))
            assert not report.warnings
            layers = dict(feedback_layers(model))
            for row in report.layers:
                if row["layer"] not in layers:
                    continue
                expected = analytic(layers[row["layer"]], row["samples"],
                                          report.rule.batches[row["layer"]])  # fmt: skip
                for phase in ("forward", "input_grad", "broadcast", "weight_grad",
                              "feedback_update"):  # fmt: skip
                    assert row[phase] == expected[phase], (row["layer"], phase)
                assert row["input_grad"] == 0
                assert row["bp_input_grad"] == (0 if row["layer"] == "0" else row["bp_forward"])
                assert row["bp_weight_grad"] == row["bp_forward"]  # the first layer's too


def test_svd_dfa_recipe_trains_resumes_bit_for_bit_and_evaluates(capsys, tmp_path):
    model = {"name": "vgg", "width_multiplier": 0.0625}  # convs in SVD form, BN, dropout
    feedback = {"rule": "svd_dfa", "rank": 0.5, "options": {"align": 0.1, "orth": 0.1}}
    recipe = write_recipe(tmp_path / "r.yaml", model, feedback,
                          train={"epochs": 2, "deterministic": True, "log_every": 1})  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(capsys, "train", recipe, "--out", whole, "--device", "cpu")[0] == 0
    train_one_epoch_then_resume(capsys, recipe, parts)

    def losses(run):
        return [(e["event"], e["step"], e["loss"], e.get("aux_loss"))
                for e in read_metrics(run / "metrics.jsonl")]  # fmt: skip

    assert losses(whole) == losses(parts)
    assert all(aux > 0 for event, _, _, aux in losses(whole) if event == "train")
    code, out, err = run_cli(capsys, "eval", whole, "--json", "--device", "cpu")
    assert code == 0, err
    rows = json.loads(out)["diagnostics"]
    assert rows and all(r["rule"] == "svd_dfa" and r["u_orth_error"] >= 0 for r in rows)


def test_svd_dfa_under_bf16_autocast_and_compile(capsys, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "mlp", "widths": [32, 32]},
                          {"rule": "svd_dfa", "rank": 8},
                          train={"precision": "bf16", "compile": True})  # fmt: skip
    code, out, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run", "--device",
                             "cpu", "--json")  # fmt: skip
    assert code == 0, err
    final = json.loads(out)["final"]
    assert 0.0 <= final["acc"] <= 1.0 and final["loss"] == final["loss"]


def test_energy_rank_keeps_the_fewest_values_holding_the_energy():
    from ldfa_cli.feedback.svd import energy_rank

    s = torch.tensor([3.0, 0.1, -4.0, 0.0])  # squares 9, 0.01, 16, 0 of 25.01
    assert energy_rank(s, 0.99, 1) == 2  # 16 + 9 = 99.96%
    assert energy_rank(s, 0.5, 1) == 1 and energy_rank(s, 0.5, 3) == 3
    assert energy_rank(s, 1.0, 1) == 3  # the zero adds nothing


def test_a_rank_cut_keeps_the_largest_triplets_and_cuts_the_optimizer_state():
    from ldfa_cli.feedback.svd import cut_rank

    model, x = _mlp(), torch.randn(7, 4)
    convert(model, "svd_dfa", example_input=x, orth=0.0)
    layer = model[2]  # 6 -> 5, rank 5
    optimizer = torch.optim.Adam(forward_parameters(model), lr=1e-3)
    backward_with_rules(model, model(x).square().sum())
    optimizer.step()
    U, s, V = (t.detach().clone() for t in (layer.svd_U, layer.svd_s, layer.svd_V))
    moments = optimizer.state[layer.svd_U]["exp_avg"].clone()
    keep = s.abs().topk(2).indices.sort().values
    cut_rank(layer, keep, [optimizer])
    assert layer.rank == 2 and tuple(layer.svd_V.shape) == (6, 2)
    torch.testing.assert_close(layer.weight.detach(), (U[:, keep] * s[keep]) @ V[:, keep].t())
    torch.testing.assert_close(optimizer.state[layer.svd_U]["exp_avg"], moments[:, keep])
    assert optimizer.state[layer.svd_s]["exp_avg_sq"].shape == (2,)
    backward_with_rules(model, model(x).square().sum())  # it trains on at its new rank
    optimizer.step()
    assert layer.svd_U.grad.shape == (5, 2)


def test_rank_reduction_in_training_logs_ranks_counts_less_and_resumes_bit_for_bit(
    capsys, tmp_path
):
    feedback = {"rule": "svd_dfa", "rank": 12,
                "options": {"reduce_at_epochs": [1], "energy": 0.5}}  # fmt: skip
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "mlp", "widths": [32, 32]}, feedback,
                          train={"epochs": 2, "deterministic": True, "log_every": 1})  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(capsys, "train", recipe, "--out", whole, "--device", "cpu")[0] == 0
    events = read_metrics(whole / "metrics.jsonl")
    (cut,) = [e for e in events if e["event"] == "ranks"]
    assert cut["epoch"] == 1 and sorted(cut["ranks"]) == ["fc1", "fc2", "head"]
    assert cut["ranks"]["fc1"] < 12 and cut["ranks"]["fc2"] < 12  # the head's is 10 at most
    train = [(e["step"], e["train_flops"]) for e in events if e["event"] == "train"]
    per_step = [(b - a) / (t - s) for (s, a), (t, b) in itertools.pairwise(train)]
    assert per_step[-1] < per_step[0]  # the second epoch's steps count the cut ranks
    train_one_epoch_then_resume(capsys, recipe, parts)

    def losses(run):
        return [(e["event"], e["step"], e.get("loss")) for e in read_metrics(run / "metrics.jsonl")]

    assert losses(whole) == losses(parts)
    code, out, err = run_cli(capsys, "eval", whole, "--json", "--device", "cpu")
    assert code == 0, err


@pytest.mark.parametrize("train", [{"ema_decay": 0.9}, {"compile": True}])
def test_rank_reduction_with_an_ema_or_compile_is_a_one_line_error(capsys, tmp_path, train):
    feedback = {"rule": "svd_dfa", "rank": 8, "options": {"reduce_at_epochs": [1]}}
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "mlp", "widths": [16]}, feedback,
                          train=train)  # fmt: skip
    code, _, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 2 and "reduce_at_epochs" in err and len(err.strip().splitlines()) == 1


def test_the_spatial_split_is_an_h_by_1_then_a_1_by_w_conv_of_the_nw_by_ch_kernel():
    cnn, x = _cnn(), torch.randn(2, 3, 8, 8)
    W = cnn[0].weight.detach().clone()  # 4 x 3 x 3 x 2, stride (2, 1), padding (1, 2)
    convert(cnn, "svd_dfa", rank=2, example_input=x)
    layer = cnn[0]
    assert layer.full_rank == min(4 * 2, 3 * 3)
    assert tuple(layer.svd_U.shape) == (4 * 2, 2) and tuple(layer.svd_V.shape) == (3 * 3, 2)
    U, S, Vh = torch.linalg.svd(W.permute(0, 3, 1, 2).reshape(8, 9))
    K = ((U[:, :2] * S[:2]) @ Vh[:2]).reshape(4, 2, 3, 3).permute(0, 2, 3, 1)
    torch.testing.assert_close(layer.weight.detach(), K)
    a = F.conv2d(x, layer.geometry.v_kernel(layer.svd_V), None, (2, 1), (1, 0))  # H x 1
    assert a.shape == (2, 2, 4, 8)
    y = F.conv2d(a * layer.svd_s.view(-1, 1, 1), layer.geometry.u_kernel(layer.svd_U),
                 layer.bias, (1, 1), (0, 2))  # 1 x W  # fmt: skip
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer(x), F.conv2d(x, K, layer.bias, (2, 1), (1, 2)))
    assert svd_parameter_count(layer) == (2 * (8 + 9 + 1) + 4, 4 * 18 + 4)


def test_the_first_reading_s_options_on_a_spatial_split_are_a_one_line_error(capsys, tmp_path):
    feedback = {"rule": "svd_dfa", "rank": 0.5, "options": {"project": True}}
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "vgg", "width_multiplier": 0.0625},
                          feedback)  # fmt: skip
    code, _, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 2 and "conv_split: channel" in err and len(err.strip().splitlines()) == 1


def test_the_hoyer_term_is_the_formula_and_concentrates_s():
    model, x = _mlp(), torch.randn(7, 4)
    convert(model, "svd_dfa", rank=3, example_input=x, orth=0.0, sparsity=0.5)
    expected = sum(0.5 * layer.svd_s.abs().sum() / layer.svd_s.norm()
                   for _, layer in feedback_layers(model))  # fmt: skip
    torch.testing.assert_close(auxiliary_loss(model), expected)
    layer = model[2]
    optimizer = torch.optim.SGD([layer.svd_s], lr=0.05)
    s = layer.svd_s.detach
    ratio = [float(s().abs().sum() / s().norm())]
    for _ in range(50):  # the term alone: s toward one large value (ratio toward 1)
        optimizer.zero_grad()
        auxiliary_loss(model).backward()
        optimizer.step()
    ratio.append(float(s().abs().sum() / s().norm()))
    assert ratio[1] < ratio[0] - 0.1


def test_no_rank_cut_after_the_last_epoch_and_blocks_are_refused(capsys, tmp_path):
    feedback = {"rule": "svd_dfa", "rank": 12, "options": {"reduce_at_epochs": [2]}}
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "mlp", "widths": [32]}, feedback,
                          train={"epochs": 2})  # fmt: skip
    code, _, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 0, err
    events = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert not [e for e in events if e["event"] == "ranks"]  # last.pt is the evaluated model
    with pytest.raises(Exception, match="points must be layers"):
        convert(_mlp(), "svd_dfa", points="blocks", example_input=torch.randn(2, 4))
