"""transformers ConvNeXt / ConvNeXt-V2 layers, whose FFN is inline:
``dwconv -> layernorm -> pwconv1 -> act [-> grn] -> pwconv2 -> layer scale -> + residual``.

Swapped piecewise, as the inline FFNs of BART/Whisper: ``pwconv1`` -> ``HanLayer``,
``act`` -> ``Identity``, ``pwconv2`` -> ``HouseholderLinear`` (exactly ``H2 |H1 x + b1| + b2``);
V2's ``grn`` (a norm over the hidden width, which no longer exists) -> ``Identity``;
``layernorm`` (the pre-norm) -> ``Identity`` when ``drop_norm``. The residual spans the
depthwise conv too, so ``residual="drop"`` is refused.
"""

from __future__ import annotations

from torch import nn

from ..calibration.site import CalibratedReplacement
from ..config import HanConfig
from ..registry import Candidate, SkipCandidate, register_rule
from ._common import dims, inline_han_swaps, inline_site, require_square


def _is_convnext_layer(cand: Candidate) -> bool:
    m = cand.module
    return (
        isinstance(getattr(m, "pwconv1", None), nn.Linear)
        and isinstance(getattr(m, "pwconv2", None), nn.Linear)
        and isinstance(getattr(m, "act", None), nn.Module)
        and isinstance(getattr(m, "dwconv", None), nn.Conv2d)
    )


@register_rule("hf.convnext", matcher=_is_convnext_layer, changes=("norm",), priority=90)
def build_convnext(cand: Candidate, config: HanConfig) -> CalibratedReplacement:
    """transformers ConvNeXt(-V2) layer (pwconv1, act, [grn], pwconv2 inline) -> ``HanLayer``, ``Identity``, ``HouseholderLinear``."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.pwconv1), dims(m.pwconv2)
    require_square(d_in, hidden, d_out, "pwconv1")
    if config.residual == "drop":
        raise SkipCandidate(
            "HanConfig.residual='drop' not possible: the ConvNeXt residual also spans dwconv; "
            "use HanConfig.residual='keep'"
        )
    swaps = inline_han_swaps(cand, config, d_in, "pwconv1", "act", "pwconv2")
    q = f"{cand.path}." if cand.path else ""
    nb = {}
    has_grn = isinstance(getattr(m, "grn", None), nn.Module)
    if has_grn:
        swaps[q + "grn"] = nn.Identity()
        nb["grn"] = "grn (norm over the hidden width) -> Identity"
    dropped = config.drop_norm and isinstance(getattr(m, "layernorm", None), nn.Module)
    if dropped:
        swaps[q + "layernorm"] = nn.Identity()
        nb["norm"] = f"layernorm ({type(m.layernorm).__name__}) -> Identity"
    else:
        nb["norm"] = "layernorm kept"
    nb["residual"] = "kept"
    if has_grn:  # GRN normalises over all pixels of an image: no token-by-token target
        return CalibratedReplacement(
            swaps, nb, not_calibrated="ConvNeXt-V2's GRN mixes pixels; calibration fits pixel by pixel"
        )
    site = inline_site(
        cand,
        swaps,
        "pwconv1",
        ("pwconv1", "act", "pwconv2"),
        removed_norm="layernorm" if dropped else None,
        block_target="the block's input is the depthwise conv's output, not the residual stream",
    )
    return CalibratedReplacement(swaps, nb, site=site)
