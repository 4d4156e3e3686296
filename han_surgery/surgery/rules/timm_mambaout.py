"""timm MambaOut's ``GatedConvBlock`` (channels-last ``(B, H, W, C)``), a whole residual block:
``x + drop_path(ls(fc2(act(g) * [i, conv(c)])))`` with ``g, i, c = split(fc1(norm(x)))``: a gated MLP
whose value path runs a ``7 x 7`` depthwise conv over part of its channels, MambaOut's only token mixer.

It becomes :class:`~han_surgery.surgery.modules.HanGatedConvBlock` around
``HanMixFfn`` = ``H2 |DW(H1 x + b1)| + b2``: the gate goes (as in LLaMA's gated MLPs), the projections
become reflections, and the depthwise conv stays, at width ``d`` (identity at first), so the block
still mixes tokens. ``drop_norm`` turns the block's ``norm`` into ``Identity``; ``residual="drop"``
returns the branch alone (layer scale -> ``Identity``). The depthwise conv mixes tokens, so calibrated
surgery replaces the block without fitting it ("not calibrated").
"""

from __future__ import annotations

from timm.models.mambaout import GatedConvBlock
from torch import nn

from ..calibration.site import CalibratedReplacement
from ..config import HanConfig
from ..modules import HanGatedConvBlock, HanMixFfn
from ..registry import Candidate, SkipCandidate, register_rule
from ._common import block_dropout, dims, require_reflections, token_mixing_reason


@register_rule("timm.mambaout_block", matcher=GatedConvBlock, changes=("norm", "residual"), priority=100)
def build_mambaout_block(cand: Candidate, config: HanConfig) -> CalibratedReplacement:
    """timm MambaOut ``GatedConvBlock`` (gated MLP with a depthwise conv, its own norm and residual) -> ``HanGatedConvBlock``."""
    m = cand.module
    (d_in, _), (_, d_out) = dims(m.fc1), dims(m.fc2)
    if d_in != d_out:
        raise SkipCandidate(f"fc1 {d_in} -> ... -> {d_out}: a Householder layer is square")
    require_reflections(d_in, config)
    k = m.conv.kernel_size[0]
    ffn = HanMixFfn(
        d_in, kernel_size=k, drop=block_dropout(config, (0.0, 0.0)), final_abs=config.final_abs, **config.han_kwargs()
    )
    drop_norm = config.drop_norm and not isinstance(m.norm, nn.Identity)
    residual = config.residual == "keep"
    block = HanGatedConvBlock(
        ffn,
        nn.Identity() if drop_norm else m.norm,
        m.ls if residual else nn.Identity(),
        m.drop_path,
        residual=residual,
    )
    nb = {
        "norm": f"norm ({type(m.norm).__name__}) -> Identity" if drop_norm else "norm kept",
        "residual": "kept" if residual else "dropped (the block returns Han(x)), layer scale -> Identity",
        "gate": f"gate removed; depthwise {k}x{k} conv kept at width {d_in}",
    }
    return CalibratedReplacement({cand.path: block}, nb, not_calibrated=token_mixing_reason(ffn))
