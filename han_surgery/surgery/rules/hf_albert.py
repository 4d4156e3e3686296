"""transformers ALBERT's ``AlbertLayer``, which inlines its FFN (``ffn`` ``d -> h``, ``activation``,
``ffn_output`` ``h -> d``) and adds the residual before its post-norm ``full_layer_layer_norm``.

ALBERT shares one set of layer weights across the depth: the encoder calls the same
``AlbertLayer`` ``num_hidden_layers / num_hidden_groups`` times. The FFN is rewritten once (as in
BART: ``ffn`` -> ``HanLayer``, ``activation`` -> ``Identity``, ``ffn_output`` ->
``HouseholderLinear``), so the Han-block is shared exactly as the dense FFN was, and the report
says by how many layers. The post-norm is kept; the residual is added inline, so
``residual="drop"`` is refused.
"""

from __future__ import annotations

from torch import nn

from ..config import HanConfig
from ..registry import Candidate, Replacement, SkipCandidate, register_rule
from ._common import dims, inline_han_swaps, require_square


def _is_albert_layer(cand: Candidate) -> bool:
    m = cand.module
    return (
        isinstance(getattr(m, "ffn", None), nn.Linear)
        and isinstance(getattr(m, "ffn_output", None), nn.Linear)
        and isinstance(getattr(m, "activation", None), nn.Module)
        and isinstance(getattr(m, "full_layer_layer_norm", None), nn.Module)
    )


def _sharing(cand: Candidate) -> str:
    config = getattr(cand.root, "config", None)
    layers, groups = getattr(config, "num_hidden_layers", None), getattr(config, "num_hidden_groups", None)
    if not (isinstance(layers, int) and isinstance(groups, int) and groups > 0):
        return "ALBERT shares layer weights: rewritten once, still shared"
    uses = layers // groups
    who = f"all {layers} layers" if groups == 1 else f"{uses} of the {layers} layers"
    return f"one FFN used by {who} (ALBERT shares layer weights): rewritten once, still shared"


@register_rule("hf.albert_ffn", matcher=_is_albert_layer, changes=(), priority=90)
def build_albert_ffn(cand: Candidate, config: HanConfig) -> Replacement:
    """ALBERT ``AlbertLayer`` (ffn, activation, ffn_output inline; shared) -> ``HanLayer``, ``Identity``, ``HouseholderLinear``."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.ffn), dims(m.ffn_output)
    require_square(d_in, hidden, d_out, "ffn")
    if config.residual == "drop":
        raise SkipCandidate(
            "HanConfig.residual='drop' not possible: AlbertLayer adds its residual inline; "
            "use HanConfig.residual='keep'"
        )
    swaps = inline_han_swaps(cand, config, d_in, "ffn", "activation", "ffn_output")
    nb = {"norm": "post-norm full_layer_layer_norm kept", "residual": "kept", "shared": _sharing(cand)}
    return Replacement(swaps, nb)
