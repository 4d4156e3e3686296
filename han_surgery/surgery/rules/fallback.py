"""The structural fallback: an FFN no other rule names.

A module is taken for an FFN when its direct children are exactly

* two or three projections (``nn.Linear``, 1x1 ``nn.Conv2d`` or transformers
  ``Conv1D``): ``d -> h`` (one, or two for a gated FFN) and ``h -> d`` (all
  1x1 convolutions: the block works on ``(N, C, H, W)`` and the replacement is
  ``ChannelsFirst(HanBlock)``). A projection may come as a *unit*, a small module
  holding the Linear / 1x1 conv first, then its norm and/or activation (the
  ``ConvNorm`` / ``Conv2d_BN`` / ``ConvLayer`` of LeViT-style hybrids: EfficientViT-MSRA,
  SHViT, RepViT, iFormer, EfficientViM): the norm goes with it, as in LeViT;
* at least one activation module (GELU, ReLU, SiLU, ..., or a class whose name
  says activation / GELU / ReLU / SiLU / Swish / Act), alone or inside a unit, and no
  sigmoid gate (that is squeeze-excitation, not an FFN);
* optionally dropouts, identities and norms;

and nothing else (so attention, which has no activation module and 3-4
projections, is not caught). It becomes a ``HanBlock`` of width ``d`` if its
``forward`` takes a single input (BLOOM's MLP, ``forward(x, residual)``, is
skipped with that reason) and does not add that input to anything (XLNet's
feed-forward returns ``norm(x + ffn(x))``: skipped, as a Han-block would lose
the residual and the norm); a projection unit takes a single input too. Norms
of the stream the module holds go with it, and the report names them.
The fallback cannot know the parent's layout: the pre-norm is left as is and
``residual="drop"`` is refused. It has the lowest priority: any named rule wins.
"""

from __future__ import annotations

import inspect
import re

from torch import nn

from ..config import HanConfig
from ..modules import ChannelsFirst
from ..registry import Candidate, Replacement, SkipCandidate, register_rule
from ._common import dims, dropout_p, finish, han_block, require_not_in_attention, require_square

ACTIVATIONS = (
    nn.GELU,
    nn.ReLU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Mish,
    nn.LeakyReLU,
    nn.ELU,
    nn.Hardswish,
    nn.ReLU6,
    nn.GLU,
    nn.Softplus,
)
ACT_NAME_HINTS = ("activation", "gelu", "relu", "silu", "swish", "act", "mish")
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


def _is_projection(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, nn.Conv2d):
        return m.kernel_size == (1, 1) and m.groups == 1
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _is_activation(m: nn.Module) -> bool:
    if isinstance(m, ACTIVATIONS):
        return True
    name = type(m).__name__.lower()
    return not list(m.parameters()) and any(h in name for h in ACT_NAME_HINTS)


_NORM_NAME = re.compile(r"(layer|rms|batch|group|instance)?norm(\d*d?)?$")


def _is_passive(m: nn.Module) -> bool:
    if isinstance(m, (nn.Dropout, nn.Identity, *NORMS)):
        return True
    # named like a norm and holding no weights a norm would not have (LeViT-style ``ConvNorm`` units hold convs)
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return _NORM_NAME.search(type(m).__name__.lower()) is not None and not any(
        isinstance(c, layers) or _is_projection(c) for c in m.modules()
    )


def _projection(m: nn.Module) -> nn.Module | None:
    """The Linear / 1x1 conv of a projection or a projection unit (first child a projection, then at most
    a norm and an activation, nothing with other parameters), else ``None``."""
    if _is_projection(m):
        return m
    children = list(m.children())
    if not 2 <= len(children) <= 3 or not _is_projection(children[0]):
        return None
    if len(_required_inputs(m)) != 1:  # MobileBERT's FFNOutput: norm(dense(x) + residual), not a plain chain
        return None
    rest = children[1:]
    if not all(_is_passive(c) or _is_activation(c) for c in rest):
        return None
    return children[0]


def _unit_activation(m: nn.Module) -> bool:
    return not _is_projection(m) and any(_is_activation(c) for c in m.children())


def _split(module: nn.Module):
    units = [(c, _projection(c)) for c in module.children()]  # once each: a unit's check reads its signature
    projs = [p for _, p in units if p is not None]
    acts = [c for c, p in units if p is None and _is_activation(c)]
    rest = [c for c, p in units if p is None and not _is_activation(c)]
    return projs, acts, rest


def _is_sigmoid_gate(m: nn.Module) -> bool:
    return isinstance(m, (nn.Sigmoid, nn.Hardsigmoid)) or "sigmoid" in type(m).__name__.lower()


def _looks_like_ffn(cand: Candidate) -> bool:
    children = list(cand.module.children())
    projs, acts, rest = _split(cand.module)
    if not (2 <= len(projs) <= 3 and all(_is_passive(c) for c in rest)) or any(map(_is_sigmoid_gate, acts)):
        return False
    return bool(acts) or any(_unit_activation(c) and _projection(c) is not None for c in children)  # cheap check first


def _required_inputs(module: nn.Module) -> list[str]:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return ["?"]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]


@register_rule("fallback.ffn", matcher=_looks_like_ffn, changes=(), priority=-100)
def build_fallback(cand: Candidate, config: HanConfig) -> Replacement:
    """Any module made of d->h projection(s), an activation and an h->d projection -> ``HanBlock``."""
    inputs = _required_inputs(cand.module)
    if len(inputs) != 1:
        raise SkipCandidate(
            f"fallback: {type(cand.module).__name__}.forward({', '.join(inputs)}) takes {len(inputs)} inputs; "
            "a Han block takes one (register a rule for this block)"
        )
    projs, _, rest = _split(cand.module)
    shapes = [dims(p) for p in projs]
    *ups, down = shapes
    d_in, hidden = ups[0]
    require_not_in_attention(cand, d_in)
    if any(u != ups[0] for u in ups) or down[0] != hidden:
        raise SkipCandidate(f"fallback: projections {shapes} are not d -> h (, d -> h) -> d")
    require_square(d_in, hidden, down[1], "first projection")
    convs = [isinstance(p, nn.Conv2d) for p in projs]
    if any(convs) and not all(convs):
        raise SkipCandidate("fallback: mixes 1x1 convolutions and linear layers (layout unknown)")
    if _adds_its_input(cand.module, inputs[0]):
        raise SkipCandidate(
            f"fallback: {type(cand.module).__name__}.forward adds its input {inputs[0]!r} to something: a residual (and "
            "maybe a norm) inside the module, which a Han-block in its place would lose (register a rule for this block)"
        )
    own_norm = _own_norm(cand.module, d_in, hidden)
    drops = [dropout_p(c) for c in rest if isinstance(c, nn.Dropout)]
    han = han_block(d_in, config, (0.0, max(drops, default=0.0)))
    replacement = finish(cand, config, ChannelsFirst(han) if all(convs) else han, None)
    if own_norm:
        replacement.neighbours["norm"] = own_norm
    return replacement


def _norm_width(norm: nn.Module) -> int | None:
    """The number of features ``norm`` normalises, where it says (``None`` for a norm without weights or sizes)."""
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(norm, attr, None), int):
            return getattr(norm, attr)
    shape = getattr(norm, "normalized_shape", None)
    if shape:
        return int(tuple(shape)[-1])
    weight = getattr(norm, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, nn.Parameter) and weight.dim() == 1 else None


def _own_norm(module: nn.Module, width: int, hidden: int) -> str:
    """The report's note on the norms of the stream (``width`` features) that the FFN module holds itself and that
    go with it (``""`` if none): a pre-norm (timm's ``NormMlp``), a norm of the branch's output (EfficientFormer's
    ``ConvMlpWithNorm``). A norm of the ``hidden`` features sits between the projections and needs no note."""
    norms = [
        f"{name} ({type(c).__name__})"
        for name, c in module.named_children()
        if _is_passive(c)  # a norm, a dropout or an identity: the last two need no note
        and not isinstance(c, (nn.Dropout, nn.Identity))
        and (hidden == width or _norm_width(c) != hidden)
    ]
    return f"its own {', '.join(norms)} replaced with it" if norms else ""


_ADDS_INPUT = r"(?<![\w.]){name}\s*\+|\+\s*{name}(?![\w(])"


def _adds_its_input(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward``'s source adds its input ``name`` to something: a residual inside the module
    (XLNet's and Funnel's feed-forward modules return ``norm(x + ffn(x))``), which a Han-block in its place would
    lose together with the norm. Unknown (no source): no."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return re.search(_ADDS_INPUT.format(name=re.escape(name)), source) is not None
