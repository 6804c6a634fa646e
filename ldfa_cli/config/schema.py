"""The recipe schema: every key a recipe may hold, with its type, range and default.

Unknown keys are refused everywhere; every default lives here, none in the code that reads
the config. A recipe is one flat-ish YAML file of these sections; ``key=value`` overrides on
the command line address them by dotted path (``optim.lr=1e-3``).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ldfa_cli.feedback import RULES, FeedbackConfigError, load_plugins, make_rule
from ldfa_cli.models import MODELS
from ldfa_cli.sections import NonNegative, PositiveInt, Section

# ----------------------------------------------------------------------------- models
# Each model's config class lives beside its builder (ldfa_cli/models/<model>.py); the
# recipe's ``model`` section is whichever of them its ``name`` picks.
ModelConfig = Annotated[
    Union[tuple(entry.config for entry in MODELS.values())],  # noqa: UP007
    Field(discriminator="name"),
]


# ----------------------------------------------------------------------- optimisation
class OptimConfig(Section):
    """An optimizer: adam, adamw, sgd or rmsprop."""

    name: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    lr: Annotated[float, Field(gt=0.0)] = 1e-3
    weight_decay: NonNegative = 0.0
    amsgrad: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: NonNegative = 0.0
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.99  # rmsprop smoothing
    eps: Annotated[float, Field(gt=0.0)] = 1e-8
    grad_clip: Annotated[float, Field(gt=0.0)] | None = None  # max norm of all gradients
    grad_clip_value: Annotated[float, Field(gt=0.0)] | None = None  # clamp each element
    # timm's groups: no weight decay on biases, norms, 1-d tensors, pos_embed and cls_token
    no_decay_bias_norm: bool = False


class ScheduleConfig(Section):
    """Learning-rate schedule, a function of the (fractional) epoch, applied every step:
    a linear warmup from ``warmup_start_factor`` over ``warmup_epochs``, then ``constant``,
    ``cosine`` (down to ``min_lr``), ``exponential`` (times ``gamma`` per epoch) or
    ``multistep`` (times ``gamma`` at each of ``milestones``, in epochs)."""

    name: Literal["constant", "cosine", "exponential", "multistep"] = "constant"
    warmup_epochs: NonNegative = 0.0
    warmup_start_factor: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    min_lr: NonNegative = 0.0
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    milestones: list[Annotated[float, Field(gt=0.0)]] = []

    @model_validator(mode="after")
    def _milestones_for_multistep(self):
        if self.name == "multistep" and not self.milestones:
            raise ValueError("a multistep schedule needs milestones (epochs), e.g. [50, 75]")
        if self.milestones != sorted(self.milestones):
            raise ValueError(f"milestones must increase, got {self.milestones}")
        return self


# --------------------------------------------------------------------------- feedback
RANK_RULE = (
    "an int >= 1 (the rank: 1 is rank 1), a float in (0, 1] (a fraction of the "
    "layer's output width: 1.0 is full rank), or null (full rank)"
)


def check_rank(value):
    ok = value is None or (
        not isinstance(value, bool)
        and (
            (isinstance(value, int) and value >= 1)
            or (isinstance(value, float) and 0.0 < value <= 1.0)
        )
    )
    if not ok:
        raise ValueError(f"a rank must be {RANK_RULE}")
    return value


class FeedbackConfig(Section):
    """Which layers get which rule, at which rank, and how the feedback learns."""

    # Python files that register rules of one's own, imported before ``rule`` is checked
    # (so it comes first); relative to the current directory, stored as absolute paths
    plugins: list[str] = []
    rule: str = "bp"
    # an int is the rank itself (1 is rank 1), a float in (0, 1] a fraction of each
    # layer's output width (1.0 is full rank), null full rank; clipped to a layer's full rank
    rank: int | float | None = None
    include: list[str] = ["*"]
    exclude: list[str] = []
    ranks: dict[str, int | float] = {}  # per-layer rank by name pattern, first match wins
    # per-layer multiplier of the rank by name pattern, e.g. {"*.qkv": 3} (the authors' 3r)
    rank_scale: dict[str, Annotated[float, Field(gt=0.0)]] = {}
    # convert grouped convs even where rank 1 per group saves nothing (depthwise)
    force_grouped: bool = False
    options: dict = {}  # the rule's options ('ldfa rules' lists them)
    # the feedback tensors' own optimizer (App. C.2), or "forward": they join the forward
    # optimizer and its schedule (App. C.3 trains W, P and Q with one Adam)
    optimizer: OptimConfig | Literal["forward"] = OptimConfig(name="adamw", lr=1e-3)
    schedule: ScheduleConfig = ScheduleConfig()

    @field_validator("plugins")
    @classmethod
    def _import_plugins(cls, plugins: list[str]) -> list[str]:
        try:
            return load_plugins(plugins)
        except FeedbackConfigError as error:
            raise ValueError(str(error)) from None

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, rule: str) -> str:
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; known rules: {', '.join(sorted(RULES))}")
        return rule

    @field_validator("rank", mode="before")  # as given: pydantic would read true as 1
    @classmethod
    def _rank(cls, rank):
        return check_rank(rank)

    @field_validator("ranks", mode="before")
    @classmethod
    def _ranks(cls, ranks):
        for value in ranks.values() if isinstance(ranks, dict) else []:
            check_rank(value)
        return ranks

    @model_validator(mode="after")
    def _schedule_needs_own_optimizer(self):
        if self.optimizer == "forward" and self.schedule != ScheduleConfig():
            raise ValueError(
                "'feedback.schedule' has no effect with feedback.optimizer: forward (the "
                "feedback tensors follow the forward schedule); remove one of them"
            )
        return self

    @field_validator("options")
    @classmethod
    def _options_fit_rule(cls, options: dict, info: ValidationInfo):
        rule = info.data.get("rule")
        if rule is not None:
            try:
                make_rule(rule, **options)
            except (FeedbackConfigError, TypeError) as error:
                raise ValueError(str(error)) from None
        return options


# ------------------------------------------------------------------------------- data
class AugmentConfig(Section):
    """Augmentation of the training set. On the device path, in this order: random crop
    after zero padding and horizontal flip (whole batches, a draw per image), then
    torchvision's RandomRotation(+-``rotation`` degrees), AutoAugment with the named policy
    (``cifar10``, ``imagenet`` or ``svhn``), RandAugment and random erasing, each image
    drawing its own (these run image by image). An image folder uses timm's
    ``create_transform`` (RandomResizedCrop, flip, ``rand_augment`` as timm's string, e.g.
    ``rand-m9-mstd0.5-inc1``, and ``random_erasing``) in its workers. ``mixup`` and
    ``cutmix`` (alphas, 0 = off) mix whole batches with timm's Mixup, its targets smoothed
    by ``train.label_smoothing``, on both paths."""

    crop_padding: Annotated[int, Field(ge=0)] = 0  # random crop after zero padding; 0 = off
    hflip: bool = False
    rotation: Annotated[float, Field(ge=0.0, le=180.0)] = 0.0  # degrees; 0 = off
    autoaugment: Literal["cifar10", "imagenet", "svhn"] | None = None
    rand_augment: str | None = None  # timm's string: rand-m<magnitude>-n<ops>...
    random_erasing: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # probability per image
    mixup: NonNegative = 0.0
    cutmix: NonNegative = 0.0

    @field_validator("rand_augment")
    @classmethod
    def _timm_string(cls, value):
        if value is not None and not value.startswith("rand"):
            raise ValueError(f"rand_augment is timm's 'rand-m9-mstd0.5-inc1' form, got {value!r}")
        return value


class DataConfig(Section):
    """``text`` reads a UTF-8 file or folder (``root``) for a language model (keys below).
    ``normalise``: ``channel`` standardises each channel by its training-set mean and std;
    ``pixel`` each pixel by its own; ``symmetric`` maps [0, 1] to [-1, 1] (torchvision's
    Normalize(0.5, 0.5), the authors' MNIST code). ``imagefolder`` streams ``train/`` and
    ``val/`` under ``root`` (ImageNet's layout; Tiny-ImageNet's too) from disk through
    DataLoader workers at ``image_size`` (ImageNet's mean and std); every other dataset
    lives on the training device as one uint8 tensor."""

    dataset: Literal["cifar10", "cifar100", "fashion_mnist", "mnist", "digits",
                     "imagefolder", "text"] = "digits"  # fmt: skip
    root: str = "data"
    download: bool = True
    normalise: Literal["channel", "pixel", "symmetric"] = "channel"
    augment: AugmentConfig = AugmentConfig()
    classes: PositiveInt | None = None  # a fixed seeded subset of d classes, relabelled
    class_seed: int | None = 0  # the subset's seed; null: the first d labels (the authors')
    grayscale: bool = False
    pad_to: PositiveInt | None = None  # zero-pad images to this size (e.g. 28 -> 32)
    resize: PositiveInt | None = None  # resize images to this size first (bilinear)
    subset: PositiveInt | None = None  # use only the first N training images (tiny runs)
    # a seeded random share of the training images held out for validation: best.pt is
    # chosen on it, the test set is evaluated for the record (0: no validation split, the
    # test set's evaluation chooses best.pt, as the paper-faithful recipes do)
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    val_seed: int = 0
    # image folders only
    image_size: PositiveInt = 224  # RandomResizedCrop / resize + centre crop to this
    crop_pct: Annotated[float, Field(gt=0.0, le=1.0)] = 0.875  # evaluation's centre crop
    class_list: str | None = None  # a file naming the class folders to use (ImageNet-100)
    workers: Annotated[int, Field(ge=0)] | None = None  # loader processes; null: every core
    # text only (dataset: text; root: a UTF-8 file or a folder of them): tokens by character
    # (a vocabulary from the training split) or by byte; windows of block_size tokens; the
    # last test_fraction of the text is the test split, the val_fraction before it validation
    tokenizer: Literal["char", "byte"] = "char"
    block_size: PositiveInt = 128
    test_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    eval_windows: PositiveInt | None = None  # evaluate this many windows, evenly spread


# ------------------------------------------------------------------------ train/output
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
COMPILE_MODES = get_args(CompileMode)


class TrainConfig(Section):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 128  # global batch, split over torchrun ranks
    eval_batch_size: PositiveInt = 1000
    eval_every: PositiveInt = 1  # epochs
    eval_every_steps: PositiveInt | None = None  # also evaluate every N steps (finer curves)
    log_every: PositiveInt = 50  # steps between train events in metrics.jsonl
    seed: int = 0
    deterministic: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    # torch.compile of the model: true (its default mode) or a mode by name; on a GPU,
    # "reduce-overhead" also replays the compiled forward and backward as CUDA graphs
    compile: bool | CompileMode = False
    # what train.compile compiles: the model (its forward, and autograd's backward of it)
    # or the whole step's forward and backward with the rules' work (eq. 9) as one graph
    compile_scope: Literal["model", "step"] = "model"
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # every N steps: per converted layer, the angle and norm ratio of B against W^T and the
    # cosine of the rule's input gradient with backprop's on a fixed probe batch (off: null)
    log_alignment_every: PositiveInt | None = None
    ema_decay: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None  # timm's ModelEmaV3
    # last.pt also mid-epoch, with the data position, every N steps and/or every M minutes,
    # so that a kill (a preempted job) loses at most that much; --resume continues there
    checkpoint_every_steps: PositiveInt | None = None
    checkpoint_every_minutes: Annotated[float, Field(gt=0.0)] | None = 30.0
    alignment_probe: PositiveInt = 256  # probe images: the first N of the training set

    @field_validator("compile", mode="before")
    @classmethod
    def _known_compile_mode(cls, value):
        if isinstance(value, bool) or value in COMPILE_MODES:
            return value
        raise ValueError(f"must be true, false or a torch.compile mode: "
                         f"{', '.join(COMPILE_MODES)}")  # fmt: skip


def compile_mode(train: TrainConfig, scope: str | None = None) -> str | None:
    """``torch.compile``'s mode for ``train.compile``, or None when it is off (or, given a
    ``scope``, "model" or "step", when ``train.compile_scope`` is the other one)."""
    if train.compile is False or scope not in (None, train.compile_scope):
        return None
    return "default" if train.compile is True else train.compile


class OutputConfig(Section):
    dir: str = "runs"  # runs/<recipe>/<timestamp>/ unless --out is given
    tensorboard: bool = False
    save_best: bool = True


class ReferenceConfig(Section):
    """A published number the recipe reproduces: top-1 accuracy (``top1``) or top-1 error
    (``top1_error``), fractions in [0, 1], with its spread over seeds (``sd``, optional) and
    where it comes from (``source``). ``ldfa eval`` and ``ldfa flops RUN...`` print it
    beside the measured accuracy."""

    top1: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top1_error: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    sd: NonNegative | None = None
    source: str

    @model_validator(mode="after")
    def _one_number(self):
        if (self.top1 is None) == (self.top1_error is None):
            raise ValueError("give exactly one of top1 and top1_error (fractions in [0, 1])")
        return self

    @property
    def accuracy(self) -> float:
        return self.top1 if self.top1 is not None else 1.0 - self.top1_error


class Recipe(Section):
    """A whole recipe."""

    description: str = ""
    reference: ReferenceConfig | None = None
    model: ModelConfig = MODELS["mlp"].config()
    feedback: FeedbackConfig = FeedbackConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _model_named(cls, data):
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, dict) and "name" not in model:
            raise ValueError(f"'model.name' is missing: choose one of {', '.join(MODELS)}")
        return data
