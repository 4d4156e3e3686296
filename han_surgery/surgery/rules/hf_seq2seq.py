"""Layers that inline their FFN: ``fc2(activation_fn(fc1(x)))`` written directly in the
layer's ``forward`` (BART, mBART, Marian, Pegasus, Whisper, Speech2Text, ...).

There is no FFN module to swap, so the pieces are swapped: ``fc1`` -> ``HanLayer``
(``|H1 x + b1|``), ``activation_fn`` -> ``Identity``, ``fc2`` -> ``HouseholderLinear``
(``H2 z + b2``); together exactly the Han-block ``H2 |H1 x + b1| + b2``, with the
layer's functional activation dropout still between them. ``final_layer_norm`` is the
pre-norm in pre-norm layers (Whisper, mBART, Speech2Text, OPT with ``do_layer_norm_before``:
dropped when ``drop_norm``)
and the post-norm in BART / Marian / Pegasus-style post-norm layers (kept). The
residual is added inline, so ``residual="drop"`` is refused.
"""

from __future__ import annotations

from torch import nn

from ..calibration.site import CalibratedReplacement
from ..config import HanConfig
from ..registry import Candidate, SkipCandidate, register_rule
from ._common import dims, inline_han_swaps, inline_site, kept_pre_norm, require_square

# Class-name prefixes of layers that apply final_layer_norm *before* fc1.
PRE_NORM_PREFIXES = (
    "Whisper", "MBart", "Speech2Text", "M2M100", "NllbMoe", "Pegasus", "Blenderbot", "XGLM", "BioGpt"
)  # fmt: skip
POST_NORM_PREFIXES = ("BlenderbotSmall",)
# Everything else is treated as post-norm (BART, Marian, PLBart, ...): the norm is kept, which is
# safe either way. A layer's own ``do_layer_norm_before`` / ``normalize_before`` flag (OPT) wins.


def _is_inline_ffn(cand: Candidate) -> bool:
    m = cand.module
    return (
        isinstance(getattr(m, "fc1", None), nn.Linear)
        and isinstance(getattr(m, "fc2", None), nn.Linear)
        and isinstance(getattr(m, "activation_fn", None), nn.Module)
        and isinstance(getattr(m, "final_layer_norm", None), nn.Module)
        and not isinstance(getattr(m, "mlp", None), nn.Module)
    )


@register_rule("hf.inline_ffn", matcher=_is_inline_ffn, changes=("norm",), priority=90)
def build_inline_ffn(cand: Candidate, config: HanConfig) -> CalibratedReplacement:
    """BART / Whisper-style layers (fc1, activation_fn, fc2 inline) -> ``HanLayer``, ``Identity``, ``HouseholderLinear``."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.fc1), dims(m.fc2)
    require_square(d_in, hidden, d_out)
    if config.residual == "drop":
        raise SkipCandidate(
            f"HanConfig.residual='drop' not possible: {type(m).__name__} adds its residual inline around fc1/fc2; "
            "use HanConfig.residual='keep'"
        )
    swaps = inline_han_swaps(cand, config, d_in, "fc1", "activation_fn", "fc2")
    q = f"{cand.path}." if cand.path else ""
    name = type(m).__name__
    flag = getattr(m, "do_layer_norm_before", getattr(m, "normalize_before", None))  # OPT, some speech models
    if isinstance(flag, bool):
        pre = flag
    else:
        pre = name.startswith(PRE_NORM_PREFIXES) and not name.startswith(POST_NORM_PREFIXES)
    nb = {}
    norm = m.final_layer_norm
    if pre and config.drop_norm:
        swaps[q + "final_layer_norm"] = nn.Identity()
        nb["norm"] = "final_layer_norm (pre-norm) -> Identity"
    else:
        nb["norm"] = "final_layer_norm kept" + ("" if pre else " (post-norm)")
    nb["residual"] = "kept"
    site = inline_site(
        cand,
        swaps,
        "fc1",
        ("fc1", "activation_fn", "fc2"),
        removed_norm="final_layer_norm" if pre and config.drop_norm else None,
        post_norm=None if pre else norm,
        block_target=kept_pre_norm("final_layer_norm") if pre and not config.drop_norm else "",
        flat_tokens=name.startswith("OPT"),  # OPTDecoderLayer reshapes the tokens to (B * L, d) before fc1
    )
    return CalibratedReplacement(swaps, nb, site=site)
