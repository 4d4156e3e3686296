"""timm PVTv2's ``MlpWithDepthwiseConv``, a Mix-FFN called as ``mlp(norm2(x), feat_size)``:
``fc1`` (``d -> h``), [ReLU], a ``3 x 3`` depthwise conv over the token grid, activation, ``fc2``
(``h -> d``), in ``Block`` as ``x + drop_path(mlp(norm2(x), feat_size))``.

It becomes :class:`~han_surgery.surgery.modules.HanMixFfnFeatSize`,
``H2 |DW(H1 x + b1)| + b2``: the projections are reflections, ``|.|`` the activation, and the
depthwise conv, the block's spatial mixing and position signal, is kept at width ``d`` (started
as the identity; the old one works at the hidden width ``h``, which no longer exists).
``norm2`` is the pre-norm.
"""

from __future__ import annotations

from timm.models.pvt_v2 import Block, MlpWithDepthwiseConv
from torch import nn

from ..config import HanConfig
from ..modules import HanMixFfnFeatSize
from ..registry import Candidate, Replacement, register_rule
from ._common import Site, block_dropout, dims, dropout_p, finish, require_reflections, require_square


@register_rule("timm.pvt_mix_ffn", matcher=MlpWithDepthwiseConv, changes=("norm", "residual"), priority=100)
def build_pvt_mix_ffn(cand: Candidate, config: HanConfig) -> Replacement:
    """timm PVTv2 ``MlpWithDepthwiseConv`` (fc1, dwconv, act, fc2; ``forward(x, feat_size)``) -> ``HanMixFfnFeatSize``."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.fc1), dims(m.fc2)
    require_square(d_in, hidden, d_out)
    require_reflections(d_in, config)
    p = dropout_p(m.drop)
    han = HanMixFfnFeatSize(
        d_in,
        kernel_size=m.dwconv.kernel_size[0],
        pre_conv=nn.ReLU() if isinstance(m.relu, nn.ReLU) else None,
        drop=block_dropout(config, (p, p)),
        final_abs=config.final_abs,
        **config.han_kwargs(),
    )
    site = Site(norm="norm2") if isinstance(cand.parent, Block) and cand.attr == "mlp" else None
    repl = finish(cand, config, han, site)
    repl.neighbours["dwconv"] = (
        f"depthwise {m.dwconv.kernel_size[0]}x{m.dwconv.kernel_size[1]} conv kept at width {d_in}"
    )
    return repl
