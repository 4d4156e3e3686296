"""Han-MobileViT: timm's MobileViT (v1) with Han-blocks in place of its transformer MLPs.

Every transformer block inside timm's ``MobileVitBlock`` (a ``vision_transformer.Block``)

    x = x + DropPath(Attn(LN1(x)))
    x = x + DropPath(MLP(LN2(x)))          MLP: d -> 2d -> d, SiLU

becomes (Yu & Zhang, Section 5.4: the MLP block ``LN -> dense -> Swish -> dense`` replaced one-for-one
by a Han-block; the paper is silent on the residual around it, which we drop, as its Han-Mixer blocks
have no skip; ``han_residual=True`` keeps it, ``x = x + DropPath(H2 |H1 x + b1| + b2)``):

    x = x + DropPath(Attn(LN1(x)))          (timm's modules, unchanged)
    x = H2 |H1 x + b1| + b2                 (HanBlock; LN2 and the FFN residual dropped)

The network is built by timm itself (``ByobNet`` with timm's ``mobilevit_*`` configs, so the
stem, MobileNetV2 blocks, local/global representation, fusion, head, ``features_only``,
``set_grad_checkpointing``, ``reset_classifier`` are timm's). :class:`HanMobileVit` then runs
the surgery engine on it, before any pretrained weights are loaded:
``hanify(model, HanConfig(rules=["timm.mlp"], drop_norm=True, residual="drop"))``. The engine's
``timm.mlp`` rule turns ``norm2`` into ``Identity`` and puts a ``ResidualFree(HanBlock)`` in place
of ``mlp`` (it returns ``Han(x) - x``, so the block's ``x + ...`` yields ``Han(x)``, up to one
rounding); checkpoint keys of the Han path are ``...transformer.<i>.mlp.ffn.fc{1,2}.{u,bias}``.

Registered: ``han_mobilevit_xxs``, ``han_mobilevit_xs``, ``han_mobilevit_s``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.byobnet import ByobNet, ByoModelCfg
from timm.models.mobilevit import model_cfgs as timm_mobilevit_cfgs

from ..errors import ConfigError
from ..surgery import HanConfig, hanify
from ._checkpoint import checkpoint_filter_fn

__all__ = ["HanMobileVit", "hanformer_config"]


def hanformer_config(reflections: int = 1, residual: bool = False) -> HanConfig:
    """The surgery that makes a timm MobileViT (v1) a Han-MobileViT: every transformer MLP, no LN2, and no
    residual around it unless ``residual`` (``x + Han(x)``: the paper is silent on the skip)."""
    return HanConfig(
        rules=["timm.mlp"],
        include=("*.transformer.*.mlp",),
        drop_norm=True,
        residual="keep" if residual else "drop",
        reflections=reflections,
    )


class HanMobileVit(ByobNet):
    """timm's :class:`~timm.models.ByobNet` (MobileViT configs) with Hanformer transformer blocks.

    Args:
        cfg: a MobileViT ``ByoModelCfg`` (timm's ``mobilevit_xxs``/``xs``/``s``).
        han_reflections: Householder reflections per Han layer (1 = paper).
        han_residual: keep the residual around each Han-block (``x + Han(x)``); default ``False``:
            ``x = Han(x)``, our reading of the paper's one-for-one replacement (see the module docstring).
        **kwargs: ``ByobNet``'s arguments (``num_classes``, ``in_chans``, ``global_pool``,
            ``drop_rate``, ``drop_path_rate``, ...).

    Stochastic depth: with ``drop_path_rate > 0`` (and ``han_residual=False``), timm's ``DropPath`` acts in
    training on what the block adds to ``x``, the residual-free branch ``Han(x) - x``. With ``p`` the block's own
    drop probability (timm raises it with depth, up to ``drop_path_rate``), a dropped sample gets ``x``
    (it skips the Han-block), a kept one ``x + (Han(x) - x) / (1 - p)``, not ``Han(x)``. The expectation is
    ``Han(x)``, what the block computes in eval. With ``han_residual=True`` it is timm's usual ``x + Han(x)``
    branch.

    Shapes: ``(B, in_chans, H, W) -> (B, num_classes)``, ``H`` and ``W`` multiples of 32.
    """

    def __init__(self, cfg: ByoModelCfg, han_reflections: int = 1, han_residual: bool = False, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.han_reflections, self.han_residual = han_reflections, han_residual
        report = hanify(self, hanformer_config(han_reflections, residual=han_residual))
        if report.skipped:  # e.g. more reflections than a stage's width: that stage would stay a dense MobileViT's
            skip, widths = report.skipped[0], _widths(cfg)
            fix = f"; the transformer widths are {widths}, so han_reflections must be at most {min(widths)}"
            raise ConfigError(
                f"{type(self).__name__}: han_reflections={han_reflections} leaves {len(report.skipped)} MLP block(s) "
                f"dense ({skip.path}: {skip.reason})" + (fix if han_reflections > min(widths) else "")
            )


def _widths(cfg: ByoModelCfg) -> list[int]:
    """The widths of the transformer blocks (``transformer_dim``) of a MobileViT config, in stage order."""
    blocks = [block for stage in cfg.blocks for block in (stage if isinstance(stage, tuple) else (stage,))]
    return [block.block_kwargs["transformer_dim"] for block in blocks if "transformer_dim" in block.block_kwargs]


def _create_han_mobilevit(variant: str, pretrained: bool = False, **kwargs: Any) -> HanMobileVit:
    base = variant.removeprefix("han_")
    return build_model_with_cfg(
        HanMobileVit,
        variant,
        pretrained,
        model_cfg=timm_mobilevit_cfgs[base],
        pretrained_filter_fn=partial(checkpoint_filter_fn, strict=kwargs.get("pretrained_strict", True)),
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
