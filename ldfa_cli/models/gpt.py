"""A decoder-only transformer language model in the style of nanoGPT (GPT-2's layout):
token and learned position embeddings, pre-LayerNorm blocks of causal self-attention
(``scaled_dot_product_attention``) and a GELU MLP, a final LayerNorm and a language-model
head, by default tied to the token embedding.

Its Linear layers are named ``blocks.<i>.attn.qkv``, ``blocks.<i>.attn.proj``,
``blocks.<i>.mlp.fc``, ``blocks.<i>.mlp.proj`` and ``head``, for include/exclude and
``feedback.rank_scale`` patterns (``{"*.qkv": 3}``). The embeddings are looked up by token
id, so no feedback rule has a W^T g to replace there: they stay on autograd."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from ldfa_cli.errors import ConfigError
from ldfa_cli.sections import Fraction, PositiveInt, Section

from .registry import register_model


class GPTConfig(Section):
    """``n_layer`` blocks of ``n_head`` heads over ``n_embd`` channels; ``block_size`` the
    longest context (null: the data's ``block_size``); ``dropout`` on the embeddings,
    attention and residual branches; ``bias`` in the Linear layers and LayerNorms;
    ``tie_weights``: the head's weight is the token embedding's."""

    name: Literal["gpt"] = "gpt"
    n_layer: PositiveInt = 4
    n_head: PositiveInt = 4
    n_embd: PositiveInt = 128
    block_size: PositiveInt | None = None
    dropout: Fraction = 0.0
    bias: bool = True
    tie_weights: bool = True

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(width, dim=2))  # fmt: skip
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(batch, length, width)
        return self.residual_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token ids (batch, length) in, next-token logits (batch, length, vocabulary) out."""

    def __init__(self, config: GPTConfig, vocab: int, block_size: int):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab, config.n_embd)
        self.wpe = nn.Embedding(block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, vocab, bias=False)
        self.apply(self._init)
        for name, parameter in self.named_parameters():  # GPT-2: residual branches scaled
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(parameter, 0.0, 0.02 / math.sqrt(2 * config.n_layer))
        if config.tie_weights:
            self.head.weight = self.wte.weight

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.block_size:
            raise ValueError(f"a sequence of {length} tokens is longer than the model's "
                             f"block_size {self.block_size}")  # fmt: skip
        positions = torch.arange(length, device=tokens.device)
        x = self.drop(self.wte(tokens) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def no_weight_decay(self) -> set[str]:
        """The position embedding (timm's parameter groups read this)."""
        return {"wpe.weight"}


@register_model(GPTConfig)
def build_gpt(config: GPTConfig, shape) -> GPT:
    if not shape.tokens:
        raise ConfigError("model 'gpt' reads token sequences: use data.dataset: text")
    block_size = config.block_size or shape.size
    if block_size < shape.size:
        raise ConfigError(f"model.block_size ({block_size}) is shorter than data.block_size "
                          f"({shape.size}): raise it or set it to null")  # fmt: skip
    return GPT(config, shape.classes, block_size)
