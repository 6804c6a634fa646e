"""Every shipped recipe validates; malformed recipes exit 2 with a line naming the key."""

import pytest

from ldfa_cli.config import find_recipe, load_recipe, shipped_recipes
from tests.helpers import run_cli

RECIPES = shipped_recipes()


def test_required_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "vit_cifar10_r24", "mlp_cifar10_bp", "vgg_cifar10_bp",
            "fmnist_mlp_bp", "fmnist_mlp_local_r10", "fmnist_mlp_ldfa_r10",
            "fmnist_mlp_lowrank_fa_r10", "fmnist_mlp_fa", "fmnist_vgg_bp",
            "fmnist_vit_bp"} <= names  # fmt: skip
    for r in (64, 32, 16, 10):
        assert f"mlp_cifar10_local_r{r}" in names
    for r in (8, 16, 24, 36, 48):
        assert f"vit_cifar10_r{r}" in names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_validates(path):
    recipe, _ = load_recipe(str(path))
    assert recipe.description, "every recipe says what it is"
    assert recipe.description.startswith(("GPU-scale", "CPU-scale", "Offline quickstart"))
    if recipe.data.dataset.startswith("cifar") or "imagenet" in recipe.data.root:
        assert recipe.description.startswith("GPU-scale")


def test_paper_hyperparameters_in_vit_r24():
    recipe, _ = load_recipe("vit_cifar10_r24")
    m = recipe.model
    assert (m.patch_size, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio) == (4, 384, 8, 8, 2.0)
    assert (m.drop_rate, m.attn_drop_rate, m.drop_path_rate, m.qkv_bias) == (0.1, 0.1, 0.1, True)
    assert (recipe.optim.name, recipe.optim.lr, recipe.optim.weight_decay) == ("adamw", 3e-4, 0.1)
    fb = recipe.feedback
    assert (fb.rule, fb.rank, fb.optimizer.lr, fb.optimizer.weight_decay) == ("ldfa", 24, 0.015, 0)
    assert (recipe.schedule.warmup_epochs, recipe.schedule.warmup_start_factor) == (10, 0.1)
    assert recipe.train.epochs == 250


def _families():
    """(paper recipe, authors' recipe) for every experiment shipped in both families."""
    names = {p.stem for p in RECIPES}
    return sorted((n.removesuffix("_authors"), n) for n in names if n.endswith("_authors"))


def test_every_authors_recipe_has_its_paper_twin_and_both_name_their_source():
    pairs = _families()
    assert len(pairs) >= 20
    for paper, authors in pairs:
        assert paper in {p.stem for p in RECIPES}, f"{authors} has no paper-text twin"
        for name, who in ((paper, "the paper"), (authors, "the authors' code")):
            assert f"source: {who}" in load_recipe(name)[0].description, name


@pytest.mark.parametrize("name", [n for pair in _families() for n in pair if "vit" in n])
def test_vit_families_differ_where_the_authors_code_differs(name):
    recipe, _ = load_recipe(name)
    fb, authors = recipe.feedback, name.endswith("_authors")
    assert recipe.optim.grad_clip_value == (10.0 if authors else None)
    assert recipe.schedule.warmup_start_factor == (0.04 if authors else 0.1)
    if fb.rule == "bp":
        return
    assert fb.schedule.warmup_start_factor == 0.1
    if authors:
        assert fb.options == {"init": "svd", "svd": "lowrank", "svd_niter": 10,
                              "reset_svd_every_epochs": 0.5}  # fmt: skip
        assert fb.rank_scale == {"*.qkv": 3} and fb.optimizer.grad_clip_value == 10.0
    else:
        assert fb.options == {"init": "kaiming"} and fb.rank_scale == {}
    if recipe.data.dataset.startswith("cifar"):  # GPU-scale: the authors' batch and data
        assert recipe.train.batch_size == 256
        assert recipe.data.augment.autoaugment == "cifar10" and recipe.data.augment.hflip


@pytest.mark.parametrize("name", [n for pair in _families() for n in pair
                                  if "mlp" in n and "local" in n])  # fmt: skip
def test_local_mlp_families_follow_app_c3(name):
    recipe, _ = load_recipe(name)
    fb, authors = recipe.feedback, name.endswith("_authors")
    assert fb.optimizer == "forward" and recipe.train.batch_size == 32
    o = recipe.optim
    assert (o.name, o.lr, o.weight_decay, o.amsgrad) == ("adam", 6e-4, 4e-4, True)
    assert (recipe.schedule.name, recipe.schedule.gamma) == ("exponential", 0.975)
    assert recipe.model.init == "torch_default" and recipe.model.batch_norm == authors
    expected = {"init": "kaiming"}
    if authors:
        expected.update(learn_q=True, normalise="std", use_targets=True, clamp_input_grad=1.0)
    assert fb.options == expected


def test_recipe_by_name_or_path_and_overrides():
    assert find_recipe("quickstart") == find_recipe("quickstart.yaml")
    recipe, _ = load_recipe(
        "quickstart", ["optim.lr=1e-2", "feedback.rank=0.5", "~train.log_every"]
    )
    assert recipe.optim.lr == 1e-2 and recipe.feedback.rank == 0.5 and recipe.train.log_every == 50


def test_validate_and_recipes_commands(capsys):
    code, out, _ = run_cli(capsys, "validate", "quickstart", "fmnist_mlp_bp")
    assert code == 0 and out.count("ok") == 2  # the verdicts are the output: on stdout
    code, out, _ = run_cli(capsys, "recipes", "--json")
    assert code == 0 and "vit_cifar10_r24" in out


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["optim.lrr=1"], ["optim.lrr", "did you mean 'optim.lr'"]),
        (["train.epochs=abc"], ["train.epochs", "integer"]),
        (["feedback.rank=0"], ["feedback.rank", "int >= 1"]),
        (["optim.lr=-1"], ["optim.lr", "greater than 0"]),
        (["feedback.rule=ldfa", "feedback.options.nope=1"], ["feedback.options", "nope"]),
        (["feedback.rule=dfaa"], ["feedback.rule", "known rules"]),
        (["model.name=vit", "~model.widths", "model.embed_dim=10"], ["model", "divisible"]),
        (["data.augment.flip=true"], ["data.augment.flip", "hflip"]),
        (["optim.lr"], ["key=value"]),
        (["feedback.rank=true"], ["feedback.rank", "int >= 1"]),  # not read as rank 1
        (["optim.lr=inf"], ["optim.lr", "finite"]),
        (["feedback.ranks={fc1: true}"], ["feedback.ranks", "int >= 1"]),
    ],
)
def test_malformed_recipe_exits_2_naming_the_key(capsys, overrides, words):
    code, _, err = run_cli(capsys, "train", "quickstart", *overrides, "--print-config")
    assert code == 2
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    for word in words:
        assert word in line


def test_missing_recipe_file(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "validate", str(tmp_path / "none.yaml"))
    assert code == 2 and "neither a file nor a shipped recipe" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    code, _, err = run_cli(capsys, "train", str(bad), "--print-config")
    assert code == 2 and "invalid YAML at line" in err
    twice = tmp_path / "twice.yaml"  # PyYAML alone would keep the last: 500 epochs
    twice.write_text("model: {name: mlp}\ntrain: {epochs: 1}\ntrain: {epochs: 500}\n")
    code, _, err = run_cli(capsys, "train", str(twice), "--print-config")
    assert code == 2 and "line 3" in err and "'train' is given twice" in err


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "---\n"])
@pytest.mark.parametrize("command", ["train", "validate"])
def test_empty_recipe_is_refused_naming_the_file(capsys, tmp_path, command, text):
    """An empty or comment-only recipe would otherwise train the schema's defaults."""
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, command, empty,
                                *(["--out", out] if command == "train" else []))  # fmt: skip
    line = (stdout if command == "validate" else err).strip()  # validate's verdicts: stdout
    assert code == 2 and "\n" not in line and "Traceback" not in line
    assert str(empty) in line and "empty" in line
    assert not out.exists()


def test_print_config_is_the_resolved_recipe(capsys):
    code, out, _ = run_cli(capsys, "train", "quickstart", "train.epochs=3", "--print-config")
    assert code == 0 and "epochs: 3" in out and "label_smoothing: 0.0" in out


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_a_recipe_of_a_published_setup_holds_nothing_out_and_says_so(path):
    # the published setups train on the whole training set: no validation split
    recipe, _ = load_recipe(str(path))
    own = "source: ldfa's own" in recipe.description or path.stem == "quickstart"
    if recipe.data.dataset == "text":  # a language model always holds its next text out
        assert recipe.data.val_fraction > 0
    elif own:
        assert recipe.data.val_fraction == 0.1
    else:
        assert recipe.data.val_fraction == 0 and "no validation split" in path.read_text()
