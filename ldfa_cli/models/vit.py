"""timm's VisionTransformer with the paper's Table C2 defaults (patch 4, dim 384, depth 8,
8 heads, MLP ratio 2, qkv bias, dropout 0.1, attention dropout 0.1, drop path 0.1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from ldfa_cli.sections import Fraction, PositiveInt, Section

from .registry import register_model

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer


class ViTConfig(Section):
    """timm's VisionTransformer with Table C2's defaults."""

    name: Literal["vit"] = "vit"
    patch_size: PositiveInt = 4
    embed_dim: PositiveInt = 384
    depth: PositiveInt = 8
    num_heads: PositiveInt = 8
    mlp_ratio: Annotated[float, Field(gt=0.0)] = 2.0
    qkv_bias: bool = True
    drop_rate: Fraction = 0.1
    attn_drop_rate: Fraction = 0.1
    drop_path_rate: Fraction = 0.1

    @model_validator(mode="after")
    def _heads_divide_dim(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        return self


@register_model(ViTConfig)
def build_vit(config, shape) -> VisionTransformer:
    """Every Linear (qkv, proj, fc1, fc2, head) is a conversion candidate; patch_embed's
    conv sees the raw image, so it stays on plain autograd."""
    from timm.models.vision_transformer import VisionTransformer  # timm loads when used

    if shape.size % config.patch_size:
        from ldfa_cli.errors import ConfigError

        raise ConfigError(
            f"'model.patch_size' ({config.patch_size}) must divide the image size ({shape.size})"
        )
    return VisionTransformer(
        img_size=shape.size,
        patch_size=config.patch_size,
        in_chans=shape.channels,
        num_classes=shape.classes,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        drop_rate=config.drop_rate,
        attn_drop_rate=config.attn_drop_rate,
        drop_path_rate=config.drop_path_rate,
    )
