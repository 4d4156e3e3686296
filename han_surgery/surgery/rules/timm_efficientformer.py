"""timm EfficientFormer-V2's ``ConvMlpWithNorm`` on ``(N, C, H, W)``: ``fc1`` (1x1 conv + BatchNorm +
activation, ``d -> h``), ``mid`` (a ``3 x 3`` depthwise conv + BatchNorm + activation at width ``h``, or
``Identity``), ``fc2`` (1x1 conv + BatchNorm, ``h -> d``), held by ``EfficientFormerV2Block`` as
``x + drop_path(ls2(mlp(x)))``.

With a ``mid`` conv it is a Mix-FFN on feature maps and becomes
:class:`~han_surgery.surgery.modules.HanMixFfn2d`, ``H2 |DW(|H1 x + b1|)| + b2``: each
activation becomes ``|.|``, the depthwise conv is kept at width ``d`` (identity at first, so the
block starts as the paper's ``H2 |H1 x + b1| + b2``), and the BatchNorms go with the
projections, as in LeViT. Without it, a ``ChannelsFirst(HanBlock)``. No pre-norm;
``residual="drop"`` turns the layer scale ``ls2`` into ``Identity``.
"""

from __future__ import annotations

from timm.models.efficientformer_v2 import ConvMlpWithNorm, EfficientFormerV2Block
from torch import nn

from ..config import HanConfig
from ..modules import ChannelsFirst
from ..registry import Candidate, Replacement, register_rule
from ._common import Site, dims, dropout_p, finish, han_block, mix_ffn_2d, require_square


@register_rule("timm.efficientformerv2_mlp", matcher=ConvMlpWithNorm, changes=("residual",), priority=100)
def build_efficientformerv2_mlp(cand: Candidate, config: HanConfig) -> Replacement:
    """timm EfficientFormer-V2 ``ConvMlpWithNorm`` (1x1 conv, [depthwise conv], 1x1 conv, with BatchNorms) -> ``HanMixFfn2d``."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.fc1.conv), dims(m.fc2.conv)
    require_square(d_in, hidden, d_out)
    drop = (dropout_p(m.drop1), dropout_p(m.drop2))
    if isinstance(m.mid, nn.Identity):
        han: nn.Module = ChannelsFirst(han_block(d_in, config, drop))
        note = "no depthwise conv"
    else:
        k = m.mid.conv.kernel_size[0]
        han = mix_ffn_2d(d_in, k, config, drop)
        note = f"depthwise {k}x{k} conv kept at width {d_in}; BatchNorms replaced with the projections"
    site = Site(norm=None, scales=("ls2",)) if isinstance(cand.parent, EfficientFormerV2Block) else None
    repl = finish(cand, config, han, site)
    repl.neighbours["mid"] = note
    return repl
