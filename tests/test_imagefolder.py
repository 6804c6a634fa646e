"""Image folders streamed through DataLoader workers, and the DeiT-style regularisers:
end to end on tiny trees written here, per-image augmentation, Mixup targets, EMA, weight
decay groups, top-5, exact mid-epoch resume, bad trees."""

import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ldfa_cli.config import validate
from ldfa_cli.engine.metrics import read_metrics
from tests.helpers import press_ctrl_c_during, run_cli


def make_tree(root, classes=("cat", "dog", "owl"), per_class=6, val_per_class=3):
    """PNG and JPEG, RGB and grayscale, of varied sizes, in ImageFolder's layout."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = 20 + 3 * i, 24 + 2 * c
                pixels = (rng.random((h, w, 3)) * 60 + 60 * c).astype(np.uint8)
                if i % 3 == 2:
                    Image.fromarray(pixels[..., 0], mode="L").save(folder / f"{i}.png")
                elif i % 3 == 1:
                    Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
                else:
                    Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def write_recipe(path, root, **train):
    path.write_text(yaml.safe_dump({
        "description": "tiny image folder",
        "model": {"name": "mlp", "widths": [32]},
        "feedback": {"rule": "ldfa", "rank": 4},
        "data": {"dataset": "imagefolder", "root": str(root), "image_size": 16, "workers": 2,
                 "val_fraction": 0,  # (every image of the tiny tree trains)
                 "augment": {"hflip": True, "rand_augment": "rand-m9-mstd0.5-inc1",
                             "random_erasing": 0.25, "mixup": 0.8, "cutmix": 1.0}},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "no_decay_bias_norm": True},
        "train": {"epochs": 2, "batch_size": 6, "eval_batch_size": 4, "log_every": 1,
                  "label_smoothing": 0.1, "ema_decay": 0.9, **train},
    }))  # fmt: skip
    return path


def test_trains_evaluates_with_top5_and_ema_through_workers(capsys, tmp_path):
    root = make_tree(tmp_path / "tree")
    recipe = write_recipe(tmp_path / "r.yaml", root)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", recipe, "--out", run, "--device", "cpu")
    assert code == 0, err
    events = read_metrics(run / "metrics.jsonl")
    evals = [e for e in events if e["event"] == "eval"]
    assert len(evals) == 2 and all({"top5", "ema_acc", "ema_top5"} <= set(e) for e in evals)
    assert all(e["top5"] == 1.0 for e in evals)  # 3 classes: the top 5 hold every one
    trains = [e for e in events if e["event"] == "train"]
    assert len(trains) == 6 and all(0 <= e["data_stall"] <= 1 for e in trains)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["ema"] is not None
    code, out, err = run_cli(capsys, "eval", run, "--json", "--device", "cpu")
    assert code == 0, err
    assert '"top5"' in out


def test_each_image_draws_its_own_augmentation_and_a_resume_draws_the_same(tmp_path):
    from ldfa_cli.data import load_data

    root = tmp_path / "same"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        for i in range(8):  # eight copies of one image
            Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(
                root / split / "a" / f"{i}.png"
            )
    augment = {"hflip": True, "random_erasing": 1.0}
    config = validate({"data": {"dataset": "imagefolder", "root": str(root), "image_size": 16,
                                "workers": 0, "augment": augment, "val_fraction": 0}})  # fmt: skip
    data = load_data(config.data)
    (x, _), *_ = list(data.train_batches(0, 8, seed=3))
    distinct = {tuple(image.flatten().tolist()) for image in x}
    assert len(distinct) > 4  # not one op for the whole batch
    again = list(data.train_batches(0, 8, seed=3))[0][0]
    torch.testing.assert_close(again, x)
    data_w = load_data(config.data.model_copy(update={"workers": 2}))
    torch.testing.assert_close(list(data_w.train_batches(0, 8, seed=3))[0][0], x)


def test_mixup_targets_sum_to_one_and_the_loss_takes_them():
    from ldfa_cli.engine.regularise import make_mixup, mix_batch, task_loss

    augment = validate({"data": {"augment": {"mixup": 0.8, "cutmix": 1.0}}}).data.augment
    mixer = make_mixup(augment, 5, label_smoothing=0.1)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    changed = 0
    for seed in range(6):
        mixed, targets = mix_batch(mixer, x, y, seed=seed)
        assert targets.shape == (6, 5)
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        changed += not torch.equal(mixed, x)
    assert changed >= 4  # (a CutMix box can come out empty)
    same = mix_batch(mixer, x, y, seed=5)
    torch.testing.assert_close(same[1], targets)  # seeded: a resume mixes the same
    logits = torch.randn(6, 5)
    expected = -(targets * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(task_loss(logits, targets, 0.1), expected)


def test_ema_update_is_its_formula():
    from ldfa_cli.engine.regularise import make_ema

    model = torch.nn.Linear(3, 2)
    ema = make_ema(model, 0.9)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=10)
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * model.weight.detach())
    ema.update(model, step=1)  # timm's first update copies the weights
    torch.testing.assert_close(ema.module.weight, model.weight.detach())


def test_no_decay_groups_hold_biases_norms_pos_embed_and_cls_token():
    import timm

    from ldfa_cli.engine.regularise import parameter_groups
    from ldfa_cli.feedback import convert, feedback_parameters, forward_parameters

    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3
    )
    convert(model, "ldfa", rank=2, example_input=torch.randn(2, 3, 16, 16))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, forward_parameters(model), 0.05, exclude=True)
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    expected = {n for n, p in model.named_parameters() if "feedback_" not in n
                and (p.ndim <= 1 or n in ("pos_embed", "cls_token"))}  # fmt: skip
    assert no_decay == expected and "pos_embed" in no_decay and "blocks.0.norm1.weight" in no_decay
    assert decay and all(model.get_parameter(n).ndim > 1 for n in decay)
    fb = parameter_groups(model, feedback_parameters(model), 0.05, exclude=True)
    assert {names[id(p)] for g in fb for p in g["params"]} == {
        n for n, _ in model.named_parameters() if "feedback_" in n}  # fmt: skip


def test_top5_on_a_hand_made_case():
    from ldfa_cli.engine.evaluate import evaluate

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    class Data:
        classes, device = 7, torch.device("cpu")

        def eval_batches(self, batch_size, rank=0, world=1, split="test"):
            logits = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1]] * 3)  # class 0 first, 6 last
            yield logits, torch.tensor([0, 4, 5])  # top-1, top-5, outside the top 5

    result = evaluate(Fixed(), Data(), 3)
    assert result["acc"] == pytest.approx(1 / 3) and result["top5"] == pytest.approx(2 / 3)


def test_mid_epoch_resume_draws_the_same_batches(capsys, tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tree")
    recipe = write_recipe(tmp_path / "r.yaml", root, deterministic=True, epochs=1)
    whole = tmp_path / "whole"
    assert run_cli(capsys, "train", recipe, "--out", whole, "--device", "cpu")[0] == 0
    part = tmp_path / "part"
    undo = press_ctrl_c_during(monkeypatch, "backward_with_rules", 2)
    code, _, err = run_cli(capsys, "train", recipe, "--out", part, "--device", "cpu")
    assert code == 130, err
    undo()
    assert run_cli(capsys, "train", "--resume", part, "--device", "cpu")[0] == 0

    def losses(run):
        return [e["loss"] for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"]

    assert losses(part) == losses(whole) and len(losses(whole)) == 3


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda r: __import__("shutil").rmtree(r / "val"), ["no val/ folder"]),
        (lambda r: __import__("shutil").rmtree(r / "val" / "owl"), ["classes differ", "'owl'"]),
        (lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()], ["is empty"]),
        (lambda r: (r / "list.txt").write_text("cat\nemu\n"), ["class_list", "'emu'"]),
    ],
)
def test_a_bad_tree_is_one_line_and_writes_nothing(capsys, tmp_path, damage, words):
    root = make_tree(tmp_path / "tree")
    damage(root)
    recipe = write_recipe(tmp_path / "r.yaml", root)
    extra = [f"data.class_list={root / 'list.txt'}"] if (root / "list.txt").exists() else []
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", recipe, *extra, "--out", run, "--device", "cpu")
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    for word in words:
        assert word in line
    assert not any(run.iterdir()) if run.exists() else True


def test_a_corrupt_image_stops_the_run_naming_the_file(capsys, tmp_path):
    root = make_tree(tmp_path / "tree")
    bad = root / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    recipe = write_recipe(tmp_path / "r.yaml", root)
    code, _, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 2 and f"{bad} is not a readable image" in err
    assert len(err.strip().splitlines()[-1]) < 300 and "Traceback" not in err
    assert not math.isnan(0.0)


@pytest.mark.parametrize("name", ["imagenet1k_vit_b16_r64_svd", "imagenet100_vit_b16_r64"])
def test_imagenet_recipes_take_a_step_on_a_fake_imagenet_tree(capsys, tmp_path, name):
    root = make_tree(tmp_path / "imagenet", classes=("n01440764", "n01443537", "n01484850"),
                     per_class=2, val_per_class=1)  # fmt: skip
    (tmp_path / "list.txt").write_text("n01443537\nn01484850\n")
    extra = [f"data.class_list={tmp_path / 'list.txt'}"] if "100" in name else []
    code, out, err = run_cli(capsys, "train", name, f"data.root={root}", *extra,
                             "train.batch_size=2", "train.compile=false", "train.precision=fp32",
                             "data.workers=0", "--dry-run", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert "blocks.11.attn.qkv" in out and "one training step" in out
    flat = " ".join(out.split())
    assert "streamed from disk" in flat and ("3 classes" if "1k" in name else "2 classes") in flat
