"""Han-MobileViT: timm's MobileViT (v1) with the paper's Hanformer blocks.

Every transformer block inside timm's ``MobileVitBlock`` (a ``vision_transformer.Block``)

    x = x + DropPath(Attn(LN1(x)))
    x = x + DropPath(MLP(LN2(x)))          MLP: d -> 2d -> d, SiLU

becomes the Hanformer block of Yu & Zhang (Section 5.3):

    x = x + DropPath(Attn(LN1(x)))          (timm's modules, unchanged)
    x = H2 |H1 x + b1| + b2                 (HanBlock; LN2 and the FFN residual dropped)

The network is built by timm itself (``ByobNet`` with timm's ``mobilevit_*`` configs, so the
stem, MobileNetV2 blocks, local/global representation, fusion, head, ``features_only``,
``set_grad_checkpointing``, ``reset_classifier`` are timm's); :class:`HanMobileVit` only swaps
the transformer blocks after timm builds it, before any pretrained weights are loaded.

Registered: ``han_mobilevit_xxs``, ``han_mobilevit_xs``, ``han_mobilevit_s``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.byobnet import ByobNet, ByoModelCfg
from timm.models.mobilevit import MobileVitBlock
from timm.models.mobilevit import model_cfgs as timm_mobilevit_cfgs
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..layers import HanBlock
from ._checkpoint import checkpoint_filter_fn

__all__ = ["HanTransformerBlock", "HanMobileVit"]


class HanTransformerBlock(nn.Module):
    """Hanformer block: ``x + DropPath(LS(Attn(LN(x))))`` then ``H2 |H1 x + b1| + b2``.

    Built from a timm :class:`~timm.models.vision_transformer.Block` with
    :meth:`from_block`, which keeps that block's ``norm1``, ``attn``, ``ls1`` and
    ``drop_path1`` modules (same names, so their checkpoint keys are unchanged) and replaces
    ``norm2``/``mlp``/``ls2``/``drop_path2`` and the second residual with one
    :class:`~han_surgery.layers.HanBlock` named ``mlp``, using the MLP's two dropout rates.

    Shapes: ``(B, N, d) -> (B, N, d)``. The MLP path drops from ``2 d h + d + h + 2 d``
    parameters (``h = mlp_ratio * d``, plus LN2) to ``4 d``.
    """

    def __init__(
        self,
        norm1: nn.Module,
        attn: nn.Module,
        mlp: HanBlock,
        ls1: nn.Module | None = None,
        drop_path1: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.ls1 = ls1 if ls1 is not None else nn.Identity()
        self.drop_path1 = drop_path1 if drop_path1 is not None else nn.Identity()
        self.mlp = mlp

    @classmethod
    def from_block(cls, block: Block, reflections: int = 1) -> HanTransformerBlock:
        """Take over ``block``'s attention path and give it a fresh ``HanBlock`` MLP path."""
        first = next(block.parameters())
        dim = first.shape[-1] if block.norm1.weight is None else block.norm1.weight.shape[0]
        mlp = block.mlp
        drop = (getattr(mlp, "drop1", nn.Dropout(0.0)).p, getattr(mlp, "drop2", nn.Dropout(0.0)).p)
        han = HanBlock(dim, reflections=reflections, drop=drop, device=first.device, dtype=first.dtype)
        return cls(block.norm1, block.attn, han, ls1=block.ls1, drop_path1=block.drop_path1)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        return self.mlp(x)


class HanMobileVit(ByobNet):
    """timm's :class:`~timm.models.ByobNet` (MobileViT configs) with Hanformer transformer blocks.

    Args:
        cfg: a MobileViT ``ByoModelCfg`` (timm's ``mobilevit_xxs``/``xs``/``s``).
        han_reflections: Householder reflections per Han layer (1 = paper).
        **kwargs: ``ByobNet``'s arguments (``num_classes``, ``in_chans``, ``global_pool``,
            ``drop_rate``, ``drop_path_rate``, ...).

    Shapes: ``(B, in_chans, H, W) -> (B, num_classes)``, ``H`` and ``W`` multiples of 32.
    """

    def __init__(self, cfg: ByoModelCfg, han_reflections: int = 1, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.han_reflections = han_reflections
        swapped = 0
        for module in self.modules():
            if isinstance(module, MobileVitBlock):
                module.transformer = nn.Sequential(
                    *[HanTransformerBlock.from_block(b, reflections=han_reflections) for b in module.transformer]
                )
                swapped += len(module.transformer)
        if swapped == 0:
            raise ValueError("HanMobileVit: cfg has no 'mobilevit' blocks; use one of timm's MobileViT (v1) configs")


def _create_han_mobilevit(variant: str, pretrained: bool = False, **kwargs: Any) -> HanMobileVit:
    base = variant.removeprefix("han_")
    return build_model_with_cfg(
        HanMobileVit,
        variant,
        pretrained,
        model_cfg=timm_mobilevit_cfgs[base],
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # timm's mobilevit_* defaults (256x256, no mean/std normalisation).
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 256, 256),
        "pool_size": (8, 8),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "stem.conv",
        "classifier": "head.fc",
        "fixed_input_size": False,
        "license": "apache-2.0",
        "paper_ids": "doi:10.1016/j.neunet.2024.106269",
        **kwargs,
    }


# No weights are published yet: every tag is ``untrained`` (timm's convention).
default_cfgs = generate_default_cfgs(
    {
        "han_mobilevit_xxs.untrained": _cfg(),
        "han_mobilevit_xs.untrained": _cfg(),
        "han_mobilevit_s.untrained": _cfg(),
    }
)


@register_model
def han_mobilevit_xxs(pretrained: bool = False, **kwargs: Any) -> HanMobileVit:
    """MobileViT-XXS (timm) with Hanformer blocks (transformer dims 64/80/96)."""
    return _create_han_mobilevit("han_mobilevit_xxs", pretrained=pretrained, **kwargs)


@register_model
def han_mobilevit_xs(pretrained: bool = False, **kwargs: Any) -> HanMobileVit:
    """MobileViT-XS (timm) with Hanformer blocks (transformer dims 96/120/144)."""
    return _create_han_mobilevit("han_mobilevit_xs", pretrained=pretrained, **kwargs)


@register_model
def han_mobilevit_s(pretrained: bool = False, **kwargs: Any) -> HanMobileVit:
    """MobileViT-S (timm) with Hanformer blocks (transformer dims 144/192/240)."""
    return _create_han_mobilevit("han_mobilevit_s", pretrained=pretrained, **kwargs)
