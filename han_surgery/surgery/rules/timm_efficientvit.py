"""timm EfficientViT (MIT)'s FFN: the ``MBConv`` in each ``EfficientVitBlock``'s ``local_module``
(``ResidualBlock(MBConv, Identity)``, ``x + mbconv(x)``): ``inverted_conv`` (1x1 conv ``d -> h``, norm,
activation), ``depth_conv`` (``3 x 3`` depthwise at ``h``, norm, activation), ``point_conv``
(1x1 conv ``h -> d``, norm).

It is the block's FFN (the attention is the ``context_module``), a Mix-FFN on feature maps: it
becomes :class:`~han_surgery.surgery.modules.HanMixFfn2d`, ``H2 |DW(|H1 x + b1|)| + b2``, as
EfficientFormer-V2's: activations become ``|.|``, the depthwise conv is kept at width ``d``
(identity at first), the norms go with the projections. The ``MBConv`` of the stem and the
downsampling stages are convolution blocks, not FFNs, and are left alone.
"""

from __future__ import annotations

from timm.models.efficientvit_mit import EfficientVitBlock, MBConv

from ..config import HanConfig
from ..registry import Candidate, Replacement, register_rule
from ._common import Site, dims, dropout_p, finish, mix_ffn_2d, require_square


def _is_ffn_mbconv(cand: Candidate) -> bool:
    if not isinstance(cand.module, MBConv) or cand.attr != "main":
        return False
    block_path = cand.parent_path.rpartition(".")[0]
    block = cand.root.get_submodule(block_path) if block_path else cand.root
    return isinstance(block, EfficientVitBlock) and cand.parent is block.local_module


@register_rule("timm.efficientvit_mbconv", matcher=_is_ffn_mbconv, changes=("norm", "residual"), priority=100)
def build_efficientvit_mbconv(cand: Candidate, config: HanConfig) -> Replacement:
    """timm EfficientViT (MIT) ``local_module`` MBConv (1x1, depthwise, 1x1 convs) -> ``HanMixFfn2d``."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.inverted_conv.conv), dims(m.point_conv.conv)
    require_square(d_in, hidden, d_out, "inverted_conv")
    k = m.depth_conv.conv.kernel_size[0]
    drop = (dropout_p(m.depth_conv.dropout), dropout_p(m.point_conv.dropout))
    han = mix_ffn_2d(d_in, k, config, drop)
    repl = finish(cand, config, han, Site(norm="pre_norm", res_scales=("shortcut",)))
    repl.neighbours["mid"] = f"depthwise {k}x{k} conv kept at width {d_in}; norms replaced with the projections"
    return repl
