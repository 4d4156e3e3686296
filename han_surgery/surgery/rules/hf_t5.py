"""T5's ``T5DenseActDense`` (wi, act, dropout, wo) and ``T5DenseGatedActDense`` (wi_0, wi_1, wo),
held by ``T5LayerFF`` as ``x + dropout(DenseReluDense(layer_norm(x)))`` (pre-norm).
Also mT5, UMT5, LongT5 and others that copy it.
"""

from __future__ import annotations

from torch import nn

from ..config import HanConfig
from ..registry import Candidate, Replacement, register_rule
from ._common import Site, dims, dropout_p, finish, han_block, require_square


def _is_t5_ffn(cand: Candidate) -> bool:
    m = cand.module
    return isinstance(getattr(m, "wo", None), nn.Linear) and (
        isinstance(getattr(m, "wi", None), nn.Linear) or isinstance(getattr(m, "wi_1", None), nn.Linear)
    )


@register_rule("hf.t5_ffn", matcher=_is_t5_ffn, changes=("norm", "residual"), priority=90)
def build_t5_ffn(cand: Candidate, config: HanConfig) -> Replacement:
    """T5 ``DenseReluDense`` (plain or gated) -> ``HanBlock``; ``T5LayerFF.layer_norm`` dropped."""
    m = cand.module
    wi = getattr(m, "wi", None) or m.wi_1
    (d_in, hidden), (_, d_out) = dims(wi), dims(m.wo)
    require_square(d_in, hidden, d_out, "wi")
    han = han_block(d_in, config, (dropout_p(getattr(m, "dropout", None)), 0.0))
    site = Site(norm="layer_norm") if cand.attr == "DenseReluDense" and cand.sibling("layer_norm") is not None else None
    return finish(cand, config, han, site)
