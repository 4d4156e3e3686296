"""timm FastViT's ``ConvMlp``: a ``7 x 7`` depthwise conv + BatchNorm at width ``d`` (``conv``), then a
1x1-conv MLP ``fc1`` (``d -> h``), activation, ``fc2`` (``h -> d``), held by ``RepMixerBlock`` /
``AttentionBlock`` as ``x + drop_path(layer_scale(mlp(x)))``.

The depthwise conv is the block's spatial mixing, already ``O(d)`` parameters and not an MLP: it
is kept with its weights. The MLP after it becomes a Han-block applied per pixel
(:class:`~han_surgery.surgery.modules.HanConvMlp`). There is no pre-norm (the conv's
BatchNorm belongs to the conv); ``residual="drop"`` turns the layer scale into ``Identity``.
"""

from __future__ import annotations

from timm.models.fastvit import AttentionBlock, ConvMlp, RepMixerBlock

from ..config import HanConfig
from ..modules import HanConvMlp
from ..registry import Candidate, Replacement, register_rule
from ._common import Site, dims, dropout_p, finish, han_block, require_square

FASTVIT_SITES: dict[type, Site] = {
    RepMixerBlock: Site(norm=None, scales=("layer_scale",)),
    AttentionBlock: Site(norm=None, scales=("layer_scale_2",)),
}


@register_rule("timm.fastvit_conv_mlp", matcher=ConvMlp, changes=("residual",), priority=100)
def build_fastvit_conv_mlp(cand: Candidate, config: HanConfig) -> Replacement:
    """timm FastViT ``ConvMlp`` (depthwise conv, 1x1 fc1, act, 1x1 fc2) -> depthwise conv kept + ``HanBlock``."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.fc1), dims(m.fc2)
    require_square(d_in, hidden, d_out)
    p = dropout_p(m.drop)
    han = HanConvMlp(m.conv, han_block(d_in, config, (p, p)))
    site = FASTVIT_SITES.get(type(cand.parent)) if cand.attr == "mlp" else None
    repl = finish(cand, config, han, site)
    repl.neighbours["conv"] = "depthwise conv + BatchNorm kept (the spatial mixing)"
    return repl
