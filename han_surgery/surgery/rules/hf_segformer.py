"""transformers Mix-FFNs, ``forward(hidden_states, height, width)``: SegFormer's ``SegformerMixMLP``
(``fc1``, ``fc2``), PVTv2's ``PvtV2ConvFeedForwardNetwork`` and GLPN's ``GLPNMixFFN`` (``dense1``,
``dense2``): ``d -> h``, [ReLU], a ``3 x 3`` depthwise conv over the token grid (``dwconv``),
activation, dropout, ``h -> d``, dropout; in their layer as
``x + drop_path(mlp(norm(x), height, width))`` (``layernorm_after`` / ``layer_norm_2``).

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

PROJECTIONS = (("fc1", "fc2"), ("dense1", "dense2"))
PRE_NORMS = ("layernorm_after", "layer_norm_2")


def _depthwise_conv(m: nn.Module) -> nn.Conv2d | None:
    """The depthwise conv of ``m.dwconv`` (a ``Conv2d`` or a wrapper holding exactly one)."""
    holder = getattr(m, "dwconv", None)
    convs = [c for c in holder.modules() if isinstance(c, nn.Conv2d)] if isinstance(holder, nn.Module) else []
    if len(convs) != 1 or len([p for p in holder.parameters()]) != len([p for p in convs[0].parameters()]):
        return None
    conv = convs[0]
    return conv if conv.groups == conv.in_channels == conv.out_channels > 1 else None


def _projections(m: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    for up, down in PROJECTIONS:
        pair = getattr(m, up, None), getattr(m, down, None)
        if all(isinstance(p, nn.Linear) for p in pair):
            return pair
    return None


def _is_mix_ffn(cand: Candidate) -> bool:
    return _projections(cand.module) is not None and _depthwise_conv(cand.module) is not None


@register_rule("hf.mix_ffn", matcher=_is_mix_ffn, changes=("norm", "residual"), priority=95)
def build_mix_ffn(cand: Candidate, config: HanConfig) -> Replacement:
    """SegFormer / PVTv2 / GLPN Mix-FFN (d->h, depthwise conv, act, h->d; ``forward(h, height, width)``) -> ``HanMixFfn``."""
    m = cand.module
    up, down = _projections(m)
    (d_in, hidden), (_, d_out) = dims(up), dims(down)
    require_square(d_in, hidden, d_out)
    require_reflections(d_in, config)
    conv = _depthwise_conv(m)
    if conv.kernel_size[0] != conv.kernel_size[1] or conv.kernel_size[0] % 2 == 0:
        raise SkipCandidate(f"depthwise conv kernel {conv.kernel_size} is not square and odd")
    p = dropout_p(getattr(m, "dropout", None))
    han = HanMixFfn(
        d_in,
        kernel_size=conv.kernel_size[0],
        pre_conv=nn.ReLU() if isinstance(getattr(m, "relu", None), nn.ReLU) else None,
        drop=block_dropout(config, (p, p)),
        final_abs=config.final_abs,
        **config.han_kwargs(),
    )
    norm = next((n for n in PRE_NORMS if cand.sibling(n) is not None), None) if cand.attr == "mlp" else None
    repl = finish(cand, config, han, Site(norm=norm) if norm else None)
    repl.neighbours["dwconv"] = f"depthwise {conv.kernel_size[0]}x{conv.kernel_size[1]} conv kept at width {d_in}"
    return repl
