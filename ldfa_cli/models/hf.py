"""Any Hugging Face causal language model, built from a config with random weights (no
download): ``model: {name: hf, config: {model_type: llama, hidden_size: 64, ...}}``.

``transformers.AutoConfig.for_model(model_type, **config)`` makes the configuration and
``AutoModelForCausalLM.from_config`` the model; the vocabulary is the data's. The model
is wrapped so that token ids go in and logits come out, as from ``gpt``; its module names
keep transformers' own under ``lm.`` (``lm.model.layers.0.self_attn.q_proj`` for Llama,
``lm.transformer.h.0.attn.c_attn`` for GPT-2), which include/exclude and
``feedback.rank_scale`` patterns match (``{"*.q_proj": 2}``). GPT-2's ``Conv1D`` layers
(weight stored transposed) become equivalent ``nn.Linear``s when a rule converts the
model (``feedback/conv1d.py``). transformers is an optional extra: ``pip install -e
".[hf]"``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from ldfa_cli.errors import ConfigError
from ldfa_cli.sections import Section

from .registry import register_model

INSTALL = 'pip install -e ".[hf]" -c requirements/lock.txt'


class HFConfig(Section):
    """``config``: the keyword arguments of ``transformers.AutoConfig.for_model``, its
    ``model_type`` first (llama, gpt2, mistral, qwen2, ...); ``vocab_size`` comes from the
    data. ``attn_implementation``: transformers' attention kernel (``sdpa`` by default)."""

    name: Literal["hf"] = "hf"
    config: dict[str, Any] = Field(default_factory=dict)
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


class CausalLM(nn.Module):
    """Token ids (batch, length) in, next-token logits (batch, length, vocabulary) out."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lm(input_ids=tokens, use_cache=False).logits


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"model 'hf' needs transformers, an optional extra: {INSTALL}") from None
    return transformers


def _positions(config) -> int | None:
    """The longest context the configuration allows, where it has one."""
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(value := getattr(config, key, None), int):
            return value
    return None


@register_model(HFConfig)
def build_hf(config: HFConfig, shape) -> CausalLM:
    if not shape.tokens:
        raise ConfigError("model 'hf' is a causal language model: use data.dataset: text")
    options = dict(config.config)
    model_type = options.pop("model_type", None)
    if not model_type:
        raise ConfigError("model.config needs model_type (llama, gpt2, mistral, ...)")
    if options.pop("vocab_size", shape.classes) != shape.classes:
        raise ConfigError(f"model.config.vocab_size must be the data's vocabulary "
                          f"({shape.classes}): leave it out")  # fmt: skip
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):  # GPT-2's are 50256:
        options.setdefault(token, None)  # no special token in a character vocabulary
    transformers = _transformers()
    try:  # transformers' validators raise their own types (huggingface_hub's too)
        hf_config = transformers.AutoConfig.for_model(model_type, vocab_size=shape.classes,
                                                      **options)  # fmt: skip
    except Exception as error:
        raise ConfigError(f"model.config: {_first_line(error)}") from None
    longest = _positions(hf_config)
    if longest is not None and longest < shape.size:
        raise ConfigError(f"model.config allows {longest} positions, fewer than "
                          f"data.block_size ({shape.size}): raise it")  # fmt: skip
    try:
        lm = transformers.AutoModelForCausalLM.from_config(
            hf_config, attn_implementation=config.attn_implementation
        )
    except (ValueError, TypeError, KeyError, AssertionError) as error:
        raise ConfigError(f"model.config: {_first_line(error)}") from None
    return CausalLM(lm)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
