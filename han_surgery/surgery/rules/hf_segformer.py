"""transformers SegFormer's Mix-FFN (``SegformerMixMLP``, ``forward(hidden_states, height, width)``):
``fc1`` (``d -> h``), a ``3 x 3`` depthwise conv over the token grid (``dwconv.dwconv``), activation,
dropout, ``fc2`` (``h -> d``), dropout; in ``SegformerLayer`` as
``x + drop_path(mlp(layernorm_after(x), height, width))``.

It becomes :class:`~han_surgery.surgery.modules.HanMixFfn`, ``H2 |DW(H1 x + b1)| + b2``: the
projections are reflections, ``|.|`` the activation, and the depthwise conv stays, at width
``d``: SegFormer has no position embeddings, the zero-padded conv is where position comes
from. The new conv starts as the identity (the old one works at the hidden width ``h``, which no
longer exists). ``layernorm_after`` is the pre-norm.
"""

from __future__ import annotations

from torch import nn

from ..config import HanConfig
from ..modules import HanMixFfn
from ..registry import Candidate, Replacement, SkipCandidate, register_rule
from ._common import Site, block_dropout, dims, dropout_p, finish, require_reflections, require_square


def _depthwise_conv(m: nn.Module) -> nn.Conv2d | None:
    conv = getattr(getattr(m, "dwconv", None), "dwconv", None)
    return conv if isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels > 1 else None


def _is_mix_ffn(cand: Candidate) -> bool:
    m = cand.module
    return (
        isinstance(getattr(m, "fc1", None), nn.Linear)
        and isinstance(getattr(m, "fc2", None), nn.Linear)
        and _depthwise_conv(m) is not None
    )


@register_rule("hf.mix_ffn", matcher=_is_mix_ffn, changes=("norm", "residual"), priority=95)
def build_mix_ffn(cand: Candidate, config: HanConfig) -> Replacement:
    """SegFormer Mix-FFN (fc1, depthwise conv, act, fc2; ``forward(hidden_states, height, width)``) -> ``HanMixFfn``."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.fc1), dims(m.fc2)
    require_square(d_in, hidden, d_out)
    require_reflections(d_in, config)
    conv = _depthwise_conv(m)
    if conv.kernel_size[0] != conv.kernel_size[1] or conv.kernel_size[0] % 2 == 0:
        raise SkipCandidate(f"depthwise conv kernel {conv.kernel_size} is not square and odd")
    p = dropout_p(getattr(m, "dropout", None))
    han = HanMixFfn(
        d_in,
        kernel_size=conv.kernel_size[0],
        drop=block_dropout(config, (p, p)),
        final_abs=config.final_abs,
        **config.han_kwargs(),
    )
    has_norm = cand.attr == "mlp" and cand.sibling("layernorm_after") is not None
    repl = finish(cand, config, han, Site(norm="layernorm_after") if has_norm else None)
    repl.neighbours["dwconv"] = f"depthwise {conv.kernel_size[0]}x{conv.kernel_size[1]} conv kept at width {d_in}"
    return repl
