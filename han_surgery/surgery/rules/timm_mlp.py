"""timm MLP blocks: ``Mlp`` (ViT, DeiT, MobileViT, Swin, ConvNeXt, BEiT, CaiT, PoolFormer,
MLP-Mixer token and channel mixing, ...), ``GluMlp`` / ``SwiGLU`` (EVA), ``GatedMlp``
(gMLP) and ``ConvMlp`` (1x1-conv MLPs).

Every block becomes a :class:`~han_surgery.layers.HanBlock` of its width
(wrapped in :class:`~han_surgery.surgery.modules.ChannelsFirst` for
``(N, C, H, W)`` MLPs). The parent-block table below says where the pre-norm
is and how the residual is added, so ``drop_norm`` and ``residual="drop"`` can
be applied by module swaps.
"""

from __future__ import annotations

from timm.layers import ConvMlp, GatedMlp, GluMlp, Mlp, SwiGLU
from timm.layers.mlp import GlobalResponseNormMlp
from timm.models import (
    beit,
    cait,
    convnext,
    eva,
    metaformer,
    mlp_mixer,
    mobilevit,
    swin_transformer,
    vision_transformer,
)
from torch import nn

from ..config import HanConfig
from ..modules import ChannelsFirst, HanGatedMlp
from ..registry import Candidate, Replacement, SkipCandidate, register_rule
from ._common import (
    Site,
    block_dropout,
    dims,
    dropout_p,
    finish,
    han_block,
    require_not_in_attention,
    require_reflections,
    require_square,
)

_ADD = Site(norm="norm2")
_GAMMA2 = Site(norm="norm2", gammas=("gamma_2",))
_CONVNEXT_NOTE = "the ConvNeXt residual also spans conv_dw, not only the MLP"

# (parent class, FFN attribute) -> how the parent uses it.
TIMM_SITES: dict[tuple[type, str], Site] = {
    (vision_transformer.Block, "mlp"): Site(norm="norm2", scales=("ls2",)),  # ViT, DeiT, MobileViT
    (beit.Block, "mlp"): _GAMMA2,
    (cait.LayerScaleBlock, "mlp"): _GAMMA2,
    (cait.LayerScaleBlockClassAttn, "mlp"): _GAMMA2,
    (eva.EvaBlock, "mlp"): _GAMMA2,
    (swin_transformer.SwinTransformerBlock, "mlp"): _ADD,
    (mobilevit.LinearTransformerBlock, "mlp"): _ADD,
    (metaformer.MetaFormerBlock, "mlp"): Site(norm="norm2", scales=("layer_scale2",), res_scales=("res_scale2",)),
    (convnext.ConvNeXtBlock, "mlp"): Site(norm="norm", residual="fixed", note=_CONVNEXT_NOTE),
    (mlp_mixer.MixerBlock, "mlp_tokens"): Site(norm="norm1", transposed=True),
    (mlp_mixer.MixerBlock, "mlp_channels"): _ADD,
    (mlp_mixer.SpatialGatingBlock, "mlp_channels"): Site(norm="norm"),
}


def timm_site(cand: Candidate) -> Site | None:
    """The :class:`Site` of a timm FFN, or ``None`` if its parent block is not in the table."""
    if cand.parent is None:
        return None
    for klass in type(cand.parent).__mro__:
        site = TIMM_SITES.get((klass, cand.attr))
        if site is not None:
            return site
    return None


def _wrap(han: nn.Module, conv: bool) -> nn.Module:
    return ChannelsFirst(han) if conv else han


@register_rule("timm.mlp", matcher=Mlp, changes=("norm", "residual"), priority=100)
def build_timm_mlp(cand: Candidate, config: HanConfig) -> Replacement:
    """timm ``Mlp`` (fc1, act, drop, norm, fc2, drop; Linear or 1x1 Conv2d) -> ``HanBlock``."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.fc1), dims(m.fc2)
    require_not_in_attention(cand, d_in)
    require_square(d_in, hidden, d_out)
    han = han_block(d_in, config, (dropout_p(m.drop1), dropout_p(m.drop2)))
    return finish(cand, config, _wrap(han, isinstance(m.fc1, nn.Conv2d)), timm_site(cand))


@register_rule("timm.glu_mlp", matcher=GluMlp, changes=("norm", "residual"), priority=100)
def build_timm_glu(cand: Candidate, config: HanConfig) -> Replacement:
    """timm ``GluMlp`` / ``SwiGLUPacked`` (fused gate, EVA) -> ``HanBlock`` (the gate goes away)."""
    m = cand.module
    (d_in, hidden2), (_, d_out) = dims(m.fc1), dims(m.fc2)
    require_square(d_in, f"2x{hidden2 // 2}", d_out)
    han = han_block(d_in, config, (dropout_p(m.drop1), dropout_p(m.drop2)))
    return finish(cand, config, _wrap(han, isinstance(m.fc1, nn.Conv2d)), timm_site(cand))


@register_rule("timm.swiglu", matcher=SwiGLU, changes=("norm", "residual"), priority=100)
def build_timm_swiglu(cand: Candidate, config: HanConfig) -> Replacement:
    """timm ``SwiGLU`` (fc1_g, fc1_x, fc2; EVA-02) -> ``HanBlock``."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.fc1_x), dims(m.fc2)
    require_square(d_in, hidden, d_out, "fc1_x")
    han = han_block(d_in, config, (dropout_p(m.drop1), dropout_p(m.drop2)))
    return finish(cand, config, han, timm_site(cand))


@register_rule("timm.gated_mlp", matcher=GatedMlp, changes=("norm", "residual"), priority=100)
def build_timm_gated(cand: Candidate, config: HanConfig) -> Replacement:
    """timm ``GatedMlp`` (gMLP) -> ``HanGatedMlp`` (spatial gating kept, its token projection copied) or ``HanBlock``."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.fc1), dims(m.fc2)
    require_square(d_in, hidden, d_out)
    drop = (dropout_p(m.drop1), dropout_p(m.drop2))
    if isinstance(m.gate, mlp_mixer.SpatialGatingUnit):
        require_reflections(d_in, config)
        if config.has_block_extras:
            raise SkipCandidate("gain / input_scale / side_rank are not available on HanGatedMlp (gMLP)")
        proj = nn.Linear(m.gate.proj.in_features, m.gate.proj.out_features)
        proj.load_state_dict(m.gate.proj.state_dict())
        han = HanGatedMlp(
            d_in, proj, eps=getattr(m.gate.norm, "eps", 1e-6), drop=block_dropout(config, drop), **config.han_kwargs()
        )
    elif isinstance(m.gate, nn.Identity):
        han = han_block(d_in, config, drop)
    else:
        raise SkipCandidate(f"GatedMlp with an unknown gate {type(m.gate).__name__}")
    return finish(cand, config, han, timm_site(cand))


@register_rule("timm.conv_mlp", matcher=(ConvMlp, GlobalResponseNormMlp), changes=("norm", "residual"), priority=100)
def build_timm_conv_mlp(cand: Candidate, config: HanConfig) -> Replacement:
    """timm ``ConvMlp`` (1x1 convs on ``(N, C, H, W)``) and ``GlobalResponseNormMlp`` -> ``HanBlock`` (channels-first wrapper if conv)."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.fc1), dims(m.fc2)
    require_square(d_in, hidden, d_out)
    han = han_block(d_in, config, (0.0, dropout_p(getattr(m, "drop", None) or getattr(m, "drop2", None))))
    grn = "GlobalResponseNorm mixes the pixels of an image; calibration fits pixel by pixel"
    not_calibrated = grn if isinstance(m, GlobalResponseNormMlp) else ""
    return finish(cand, config, _wrap(han, isinstance(m.fc1, nn.Conv2d)), timm_site(cand), not_calibrated)
