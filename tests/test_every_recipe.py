"""Every shipped recipe's training step runs under ``ldfa bench --steps 1``, ``ldfa bench
--memory`` and ``ldfa flops``: the recipe's model shrunk by overrides that keep its layer
names (small widths, one block), batch 2, on a synthetic batch of its dataset's shape (an
image-folder recipe on a tiny tree written here, a language model on text written here).
The three commands run the training
step itself, so a rule, model or setting that one of them cannot take fails here."""

import json

import pytest

from ldfa_cli.config import load_recipe, shipped_recipes
from tests.helpers import run_cli
from tests.test_imagefolder import make_tree

RECIPES = shipped_recipes()
TINY_VIT = {"embed_dim": 16, "depth": 1, "num_heads": 2}


def tiny_overrides(recipe) -> list[str]:
    """Overrides that shrink the recipe's model and keep its layers' names."""
    model = recipe.model
    if model.name == "mlp":
        return [f"model.widths={[8] * len(model.widths)}"]
    if model.name == "vgg":
        return ["model.width_multiplier=0.0625"]
    if model.name == "vit":
        return [f"model.{key}={value}" for key, value in TINY_VIT.items()]
    if model.name == "retina":
        return ["model.retina_channels=4", "model.vvs_channels=4", "model.fc_width=8",
                f"model.bottleneck={min(model.bottleneck, 4)}"]  # fmt: skip
    if model.name == "resnet_cifar":
        return ["model.depth=8"]
    if model.name == "gpt":
        return ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "data.block_size=16"]
    if model.name == "hf":  # the shipped ones are Llama configurations
        tiny = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                "num_attention_heads": 2, "num_key_value_heads": 2,
                "max_position_embeddings": 16}  # fmt: skip
        return [*(f"model.config.{k}={v}" for k, v in tiny.items()), "data.block_size=16"]
    if model.name == "timm" and model.architecture.startswith("vit_"):
        return [f"model.kwargs.{key}={value}" for key, value in TINY_VIT.items()]
    return []  # lenet, and timm's convnets at Fashion-MNIST's 28x28


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    return make_tree(root / "tree", classes=("n01440764", "n01443537"), per_class=2,
                     val_per_class=1)  # fmt: skip


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("".join(f"In the beginning {i} was the word.\n" for i in range(200)))
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_steps_under_bench_memory_and_flops(capsys, tree, text, path):
    recipe, _ = load_recipe(str(path))
    overrides = [*tiny_overrides(recipe), "train.compile=false"]  # compile has its own tests
    if recipe.data.dataset == "imagefolder":
        overrides += [f"data.root={tree}", "data.image_size=32", "data.workers=0"]
        overrides += ["~data.class_list"] if recipe.data.class_list else []
    if recipe.data.dataset == "text":
        overrides.append(f"data.root={text}")
    common = ["--batch-size", "2", "--device", "cpu", "--json"]
    bench = ["bench", str(path), *overrides, "--ranks", "2", *common]
    for command in ([*bench, "--steps", "1", "--warmup", "0"], [*bench, "--memory"],
                    ["flops", str(path), *overrides, *common]):  # fmt: skip
        code, out, err = run_cli(capsys, *command)
        assert code == 0, f"{' '.join(command[:2])}: {err}"
        result = json.loads(out)
        if command[0] == "flops":
            assert result["total"]["rule"] > 0 and not result["warnings"], result["warnings"]
            rules = {row["rule"] for row in result["layers"] if "rule" in row}
            # the rule reached at least one layer; any other row is backprop's
            assert recipe.feedback.rule in rules and rules <= {recipe.feedback.rule, "bp"}
        else:
            assert len(result["rows"]) == 2
