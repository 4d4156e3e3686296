"""DistilBERT's ``FFN`` (lin1 d->h, activation, lin2 h->d, dropout) inside a post-norm
``TransformerBlock`` (``output_layer_norm(ffn(x) + x)``).

The FFN becomes a ``HanBlock``; the post-norm is kept (it normalises the residual
stream); ``residual="drop"`` wraps the block in ``ResidualFree`` so the layer computes
``output_layer_norm(Han(x))``.
"""

from __future__ import annotations

from torch import nn

from ..config import HanConfig
from ..registry import Candidate, Replacement, register_rule
from ._common import Site, dims, dropout_p, finish, han_block, require_square


def _is_distilbert_ffn(cand: Candidate) -> bool:
    m = cand.module
    return isinstance(getattr(m, "lin1", None), nn.Linear) and isinstance(getattr(m, "lin2", None), nn.Linear)


@register_rule("hf.distilbert_ffn", matcher=_is_distilbert_ffn, changes=("residual",), priority=90)
def build_distilbert_ffn(cand: Candidate, config: HanConfig) -> Replacement:
    """DistilBERT ``FFN`` (lin1, activation, lin2, dropout) -> ``HanBlock``; post-norm kept."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.lin1), dims(m.lin2)
    require_square(d_in, hidden, d_out, "lin1")
    han = han_block(d_in, config, (0.0, dropout_p(getattr(m, "dropout", None))))
    post = "output_layer_norm" if cand.sibling("output_layer_norm") is not None else None
    site = Site(norm=None, residual="post", post_norm=post) if post else None
    return finish(cand, config, han, site)
