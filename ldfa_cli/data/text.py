"""Text for language models: a UTF-8 file or a folder of them, tokenized by character (a
vocabulary built from the training split, one id for every character it lacks) or by byte
(256 ids), split contiguously into train, val and test, and kept on the device as one
integer tensor per split. A training batch is ``batch_size`` windows of ``block_size``
tokens at random positions, each target the input shifted by one; the positions depend on
(seed, epoch, step) only, so a resumed run draws exactly the batches an unbroken one does.
Evaluation reads the split's non-overlapping windows in order."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ldfa_cli.errors import DataError
from ldfa_cli.shapes import InputShape

from .device import _mix

UNKNOWN = "\ufffd"  # the character vocabulary's last id: any character training lacks


@dataclass(frozen=True)
class Tokenizer:
    """``char``: ids of ``vocab``'s characters (the last one standing for every character
    the training text lacks); ``byte``: the UTF-8 bytes, 256 ids."""

    kind: str
    vocab: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return 256 if self.kind == "byte" else len(self.vocab)

    @property
    def unit(self) -> str:
        """What one token is, for bits per token: a character or a byte."""
        return "byte" if self.kind == "byte" else "character"

    def encode(self, text: str) -> torch.Tensor:
        if self.kind == "byte":
            return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = len(self.vocab) - 1
        return torch.tensor([index.get(c, unknown) for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.vocab[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "vocab": list(self.vocab)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """The tokenizer a run wrote; anything else is a ValueError."""
        data = json.loads(text)
        if (
            not isinstance(data, dict)
            or data.get("kind") not in ("char", "byte")
            or not (
                isinstance(data.get("vocab"), list)
                and all(isinstance(v, str) for v in data["vocab"])
            )
        ):
            raise ValueError("not a tokenizer: 'kind' (char or byte) and 'vocab' expected")
        return cls(data["kind"], tuple(data["vocab"]))


def read_corpus(root: str) -> str:
    """A UTF-8 file, or every file of a folder (sorted, recursively) joined by blank lines.
    Missing, empty or undecodable text is a one-line error naming the file."""
    path = Path(root).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        raise DataError(f"data.root {path} is neither a text file nor a folder of them: give "
                        "a UTF-8 file (e.g. bible gen1:1-rev22:21 > data/kjv.txt) or a "
                        "folder")  # fmt: skip
    parts = []
    for file in files:
        try:
            parts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise DataError(f"{file} is not UTF-8 text (byte {error.start}): convert it or "
                            "leave it out of data.root") from None  # fmt: skip
    text = "\n\n".join(p for p in parts if p)
    if not text.strip():
        raise DataError(f"data.root {path} holds no text")
    return text


def split_points(length: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Where training ends and where validation ends: train | val | test, contiguous."""
    test = round(length * test_fraction)
    val = round(length * val_fraction)
    return length - val - test, length - test


@functools.lru_cache(maxsize=4)
def _prepared(root: str, stamp: tuple, tokenizer: str, val_fraction: float,
              test_fraction: float) -> tuple[Tokenizer, tuple]:  # fmt: skip
    """(tokenizer, (train, val, test) token tensors) of a corpus; cached by the files'
    sizes and times, so that a recipe's shape and its data read the corpus once."""
    text = read_corpus(root)
    train_end, val_end = split_points(len(text), val_fraction, test_fraction)
    if tokenizer == "char":
        vocab = (*sorted(set(text[:train_end]) - {UNKNOWN}), UNKNOWN)
        chosen = Tokenizer("char", vocab)
    else:
        chosen = Tokenizer("byte")
    parts = (text[:train_end], text[train_end:val_end], text[val_end:])
    return chosen, tuple(chosen.encode(part) for part in parts)


def _stamp(root: str) -> tuple:
    path = Path(root).expanduser()
    files = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


def prepare(config) -> tuple[Tokenizer, tuple]:
    """The tokenizer and the three splits' tokens of a recipe's ``data`` section, checked:
    every split must hold at least two windows of ``block_size`` tokens."""
    tokenizer, splits = _prepared(str(config.root), _stamp(str(config.root)), config.tokenizer,
                                  config.val_fraction, config.test_fraction)  # fmt: skip
    for name, tokens in zip(("training", "validation", "test"), splits, strict=True):
        if len(tokens) < 2 * config.block_size + 1:
            raise DataError(f"the {name} split of {config.root} holds {len(tokens):,} tokens, "
                            f"fewer than two windows of data.block_size={config.block_size}: "
                            "use more text, a smaller block_size or other split "
                            "fractions")  # fmt: skip
    return tokenizer, splits


def text_shape(config) -> InputShape:
    tokenizer, _ = prepare(config)
    return InputShape(1, config.block_size, tokenizer.size, tokens=True)


@dataclass
class TextData:
    """The three splits' tokens on the device (:class:`~ldfa_cli.data.protocol.TrainingData`)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    tokenizer: Tokenizer
    block_size: int
    unknown: int = 0  # validation and test characters the vocabulary lacks
    eval_windows: int | None = None  # evaluate at most this many windows, evenly spread

    channels = 1
    has_val = True

    @property
    def size(self) -> int:
        return self.block_size

    @property
    def classes(self) -> int:
        return self.tokenizer.size

    @property
    def class_names(self) -> list[str]:
        return [repr(self.tokenizer.decode([i])) for i in range(self.classes)]

    @property
    def input_shape(self) -> InputShape:
        return InputShape(1, self.block_size, self.classes, tokens=True)

    @property
    def device(self) -> torch.device:
        return self.train.device

    def run_files(self) -> dict[str, str]:
        """Files the run's folder keeps: the tokenizer, for ``ldfa sample``."""
        return {"tokenizer.json": self.tokenizer.to_json() + "\n"}

    def windows(self, tokens: torch.Tensor) -> int:
        return (len(tokens) - 1) // self.block_size

    @staticmethod
    def epoch_steps(windows: int, batch_size: int, world: int = 1) -> int:
        """Steps in an epoch: as many windows as the training tokens hold without overlap,
        in batches (the last one partial for one process, dropped under torchrun)."""
        return max(1, windows // batch_size if world > 1 else -(-windows // batch_size))

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int:
        return self.epoch_steps(self.windows(self.train), batch_size, world)

    def _windows_at(self, tokens: torch.Tensor, starts: torch.Tensor):
        index = starts[:, None] + torch.arange(self.block_size, device=starts.device)
        return tokens[index], tokens[index + 1]

    def train_batches(self, epoch: int, batch_size: int, seed: int, rank: int = 0,
                      world: int = 1, start: int = 0):  # fmt: skip
        generator = torch.Generator(device=self.device)
        last = len(self.train) - self.block_size - 1
        for step in range(start, self.steps_per_epoch(batch_size, world)):
            generator.manual_seed(_mix(seed, epoch, step))
            starts = torch.randint(0, last + 1, (batch_size,), generator=generator,
                                   device=self.device)  # fmt: skip
            if world > 1:
                starts = starts.tensor_split(world)[rank]
            yield self._windows_at(self.train, starts)

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1, split: str = "test"):
        tokens = self.val if split == "val" else self.test
        chosen = torch.arange(self.windows(tokens), device=self.device)
        if self.eval_windows is not None and self.eval_windows < len(chosen):
            spread = torch.linspace(0, len(chosen) - 1, self.eval_windows, device=self.device)
            chosen = spread.round().long().unique()
        starts = chosen * self.block_size
        for i, chunk in enumerate(starts.split(batch_size)):
            if i % world == rank:
                yield self._windows_at(tokens, chunk)

    def example(self, n: int = 2) -> torch.Tensor:
        return self.train[: n * self.block_size].view(n, self.block_size)

    def probe(self, n: int, split: str = "train"):
        tokens = {"train": self.train, "val": self.val}.get(split, self.test)
        count = min(n, self.windows(tokens))
        return self._windows_at(tokens, torch.arange(count, device=self.device) * self.block_size)

    def describe(self) -> str:
        splits = (("train", self.train), ("val", self.val), ("test", self.test))
        sizes = ", ".join(f"{name} {len(t):,}" for name, t in splits)
        unknown = (f"; {self.unknown:,} validation and test characters the training text "
                   "lacks map to one id" if self.tokenizer.kind == "char" else "")  # fmt: skip
        return (f"data: text on the device ({self.device}), tokens by {self.tokenizer.unit}: "
                f"{sizes}; vocabulary {self.classes}, windows of {self.block_size}"
                f"{unknown}")  # fmt: skip

    def with_train_as_test(self) -> TextData:
        return dataclasses.replace(self, test=self.train)


def load_text(config, device: torch.device | str = "cpu") -> TextData:
    tokenizer, (train, val, test) = prepare(config)
    unknown_id = tokenizer.size - 1
    unknown = int((val == unknown_id).sum() + (test == unknown_id).sum()) if (
        tokenizer.kind == "char") else 0  # fmt: skip
    return TextData(train.to(device), val.to(device), test.to(device), tokenizer,
                    config.block_size, unknown, config.eval_windows)  # fmt: skip


def bits_per_token(loss_nats: float) -> float:
    return loss_nats / math.log(2)
