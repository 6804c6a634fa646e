"""Run folders named on a command line: run folders themselves, sweep folders (whose run
folders are taken, in order), and whatever else a glob brings along (a sweep's ``.log``
files, a plot written beside the runs), which is left out with a note."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ldfa_cli.errors import ConfigError

SPLITS = ("test", "val")


def metric_key(metric: str, split: str) -> str:
    """An evaluation record's key for ``metric`` on ``split``: the test split's under the
    metric's own name, the validation split's under ``val_`` and it (the loop's records)."""
    return f"val_{metric}" if split == "val" else metric


def checked_split(split: str) -> str:
    """``split`` as a command's ``--split`` gives it, if it is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ConfigError(f"--split must be test or val, got '{split}'")
    return split


def is_run(path: Path) -> bool:
    return path.is_dir() and (path / "metrics.jsonl").is_file() and (path / "config.yaml").is_file()


def collect_runs(targets, say=None) -> list[Path]:
    """The run folders among ``targets`` (a sweep folder stands for the run folders in it),
    each once, in the order given; ``say(line)`` is told what was left out and why."""
    runs, left_out = [], []
    for target in map(Path, targets):
        if is_run(target):
            runs.append(target)
        elif target.is_dir() and (inside := sorted(p for p in target.iterdir() if is_run(p))):
            runs.extend(inside)
        else:
            left_out.append(target)
    if left_out and say is not None:
        names = ", ".join(str(p) for p in left_out[:4]) + (" ..." if len(left_out) > 4 else "")
        say(f"left out {len(left_out)} path(s) that are not run folders: {names}")
    if not runs:
        raise ConfigError(
            f"no run folder among {', '.join(map(str, targets))} (a run folder holds "
            "config.yaml and metrics.jsonl; a sweep folder holds run folders)"
        )
    return list(dict.fromkeys(runs))


# not what a run is: its seed, where it writes, its prose and its published reference
NOT_SETTINGS = ("train.seed", "output.", "description", "reference.", "feedback.plugins")


# the sections whose keys a record may lack because a later version added them; the model
# is left out: its defaults depend on the kind of model
SECTIONS_WITH_DEFAULTS = ("feedback", "data", "optim", "schedule", "train", "output")


def with_defaults(config: dict) -> dict:
    """The config with every key that an older record lacks at its current default (a
    key is added with the default that keeps the old behaviour), so that a run written
    before ``train.compile_scope`` existed groups with one written after, as the same
    setting."""
    from ldfa_cli.config.schema import Recipe

    filled = dict(config)
    for name in SECTIONS_WITH_DEFAULTS:
        if isinstance(filled.get(name), dict):
            default = Recipe.model_fields[name].default.model_dump(mode="json")
            filled[name] = _fill(filled[name], default)
    return filled


def _fill(given: dict, defaults: dict) -> dict:
    filled = dict(given)
    for key, value in defaults.items():
        if key not in filled:
            filled[key] = value
        elif isinstance(value, dict) and isinstance(filled[key], dict):
            filled[key] = _fill(filled[key], value)
    return filled


def run_settings(config: dict) -> dict[str, str]:
    """What sets a run's group apart (every key but :data:`NOT_SETTINGS`), the keys an
    older record lacks at their defaults: how ``ldfa plot``, ``ldfa flops`` and
    ``scripts/summarise-runs`` group runs."""
    return settings_of(with_defaults(config))


def settings_of(config: dict, prefix: str = "") -> dict[str, str]:
    """A config as {dotted key: value as JSON}, without :data:`NOT_SETTINGS`."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name.startswith(NOT_SETTINGS) or name == "reference":
            continue
        if isinstance(value, dict) and value:
            flat.update(settings_of(value, f"{name}."))
        else:
            flat[name] = json.dumps(value, sort_keys=True)
    return flat


def distinguishing(groups: list[dict[str, str]], shown=("feedback.rule", "feedback.rank")):
    """For each group's settings, a label of where it departs from the others (those
    ``shown`` in columns of their own left out), e.g. ``optim.lr=0.0001``: a key is named
    for a group whose value differs from the one most groups share (for every group where
    no value is shared by more than the others); a group without the key (an older
    record) is not compared on it. A key's last part names it where no other key ends
    alike (``widths``), else the whole key."""
    keys = sorted({k for g in groups for k in g})
    last = [k.rsplit(".", 1)[-1] for k in keys]
    names = {k: k.rsplit(".", 1)[-1] if last.count(k.rsplit(".", 1)[-1]) == 1 else k
             for k in keys}  # fmt: skip

    def departures(members: list[int], missing: str | None) -> dict[int, list[str]]:
        found = {i: [] for i in members}
        for key in keys:
            values = {i: groups[i].get(key, missing) for i in members}
            values = {i: v for i, v in values.items() if v is not None}
            if key in shown or len(set(values.values())) < 2:
                continue
            counts = list(values.values())
            top = max(map(counts.count, counts))
            common = {v for v in counts if counts.count(v) == top}
            for i, value in values.items():
                if len(common) > 1 or value not in common:
                    shown_value = "-" if value == missing else json.loads(value)
                    found[i].append(f"{names[key]}={shown_value}")
        return found

    labels = departures(list(range(len(groups))), missing=None)
    texts = [", ".join(labels[i]) for i in range(len(groups))]
    for text in set(texts):  # groups still named alike: the keys only some of them have
        alike = [i for i, t in enumerate(texts) if t == text]
        if len(alike) > 1:
            extra = departures(alike, missing="-")
            for i in alike:
                texts[i] = ", ".join(dict.fromkeys(labels[i] + extra[i]))
    return texts


@dataclass
class RunRecord:
    """A run folder's resolved config and the recipe it was trained from."""

    path: Path
    config: dict
    recipe: str

    @property
    def seed(self):
        return self.config.get("train", {}).get("seed")

    @functools.cached_property
    def evaluations(self) -> list[dict]:
        """The eval events of metrics.jsonl, read once."""
        from ldfa_cli.engine.metrics import read_metrics

        return [e for e in read_metrics(self.path / "metrics.jsonl") if e.get("event") == "eval"]

    @property
    def dataset(self) -> str:
        return dataset_of(self.config)

    @property
    def rule_and_rank(self) -> str:
        feedback = self.config.get("feedback", {})
        rule, rank = feedback.get("rule", "?"), feedback.get("rank")
        return rule if rule == "bp" or rank is None else f"{rule} r={rank}"


def dataset_of(config: dict) -> str:
    """The data a run learned: the dataset's name, and for a folder or a corpus which one."""
    data = config.get("data", {})
    name = data.get("dataset", "?")
    root = data.get("root")
    if name in ("text", "imagefolder") and root:
        return f"{name} {Path(root).name}"
    return name


def recorded_recipe(path: Path) -> str:
    """The recipe a run folder's env.json names ("" where it names none or is unreadable:
    the name only labels the run)."""
    try:
        env = json.loads((Path(path) / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return str(env.get("recipe") or "") if isinstance(env, dict) else ""


def read_run(path: Path) -> RunRecord:
    path = Path(path)
    if not is_run(path):
        raise ConfigError(f"{path} is not a run folder (no metrics.jsonl/config.yaml)")
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    return RunRecord(path, config, recorded_recipe(path))


@dataclass
class RunGroup:
    """Runs whose config is the same but for the seed, and what names them apart from the
    other groups drawn with them."""

    name: str
    runs: list[RunRecord] = field(default_factory=list)


def group_by_setting(records: list[RunRecord], say=None) -> list[RunGroup]:
    """The runs grouped by config but for the seed, in the order first met, each named by
    its recipe (its rule and rank where the recipe is unknown) and the settings in which it
    differs from the other groups of its recipe, never by the run folder's name. A seed
    that two runs of one group share counts once (the first); ``say(line)`` is told."""
    keyed: dict[tuple, list[RunRecord]] = {}
    for record in records:
        key = (record.recipe, tuple(sorted(run_settings(record.config).items())))
        members = keyed.setdefault(key, [])
        twin = next((m for m in members if m.seed == record.seed), None)
        if twin is None:
            members.append(record)
        elif say is not None:
            say(f"{record.path} repeats seed {record.seed} of {twin.path} (the same config): "
                "counted once, the first")  # fmt: skip
    keys = list(keyed)
    names = {}
    for recipe in dict.fromkeys(key[0] for key in keys):
        mine = [key for key in keys if key[0] == recipe]
        differ = distinguishing([dict(key[1]) for key in mine], shown=())
        for key, extra in zip(mine, differ, strict=True):
            base = recipe or keyed[key][0].rule_and_rank
            names[key] = f"{base} ({extra})" if extra else base
    return [RunGroup(names[key], keyed[key]) for key in keys]
