"""timm LeViT's ``LevitMlp``: ``ln1`` (Linear + BatchNorm, or 1x1 Conv + BatchNorm in ``levit_conv_*``),
activation, dropout, ``ln2`` (the same, ``h -> d``), held by ``LevitBlock`` / ``LevitDownsample`` as
``x + drop_path(mlp(x))``.

The whole MLP becomes a :class:`~han_surgery.layers.HanBlock` (``ChannelsFirst`` for the conv
variant). The two BatchNorms go with it: at inference each is an affine map after its
projection (LeViT folds them into the Linear), and the Han layers' biases take their shift; a
reflection is norm-preserving, so it has no use for their scale. LeViT has no norm in front of
the MLP, so ``drop_norm`` changes nothing; ``residual="drop"`` gives ``x = Han(x)``.

Calibration fits the new block token by token to the old MLP, BatchNorms included (in eval mode each
is a per-token affine map); the Linear variant's ``LinearNorm`` runs its BatchNorm on
``x.flatten(0, 1)``, so the old MLP is called on the token rows as one sequence (``SequenceRows``).
"""

from __future__ import annotations

from timm.models.levit import LevitBlock, LevitDownsample, LevitMlp
from torch import nn

from ..calibration.site import SequenceRows
from ..config import HanConfig
from ..modules import ChannelsFirst
from ..registry import Candidate, Replacement, register_rule
from ._common import Site, dims, dropout_p, finish, han_block, require_square

LEVIT_SITES: dict[type, Site] = {LevitBlock: Site(norm=None), LevitDownsample: Site(norm=None)}


@register_rule("timm.levit_mlp", matcher=LevitMlp, changes=("residual",), priority=100)
def build_levit_mlp(cand: Candidate, config: HanConfig) -> Replacement:
    """timm ``LevitMlp`` (Linear/1x1-conv + BatchNorm pairs) -> ``HanBlock``; the BatchNorms go with it."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.ln1.linear), dims(m.ln2.linear)
    require_square(d_in, hidden, d_out, "ln1")
    han = han_block(d_in, config, (dropout_p(m.drop), 0.0))
    conv = isinstance(m.ln1.linear, nn.Conv2d)
    site = LEVIT_SITES.get(type(cand.parent)) if cand.attr == "mlp" else None
    repl = finish(cand, config, ChannelsFirst(han) if conv else han, site)
    if not conv and repl.site is not None:  # LinearNorm needs (B, N, d): x.flatten(0, 1) feeds its BatchNorm1d
        repl.site.reference = SequenceRows(repl.site.reference)
    repl.neighbours["bn"] = "ln1.bn, ln2.bn (BatchNorm after each projection) replaced with the MLP"
    return repl
