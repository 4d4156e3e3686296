"""The structural fallback: an FFN no other rule names.

A module is taken for an FFN when its direct children are exactly

* two or three projections (``nn.Linear``, 1x1 ``nn.Conv2d`` or transformers
  ``Conv1D``): ``d -> h`` (one, or two for a gated FFN) and ``h -> d`` (all
  1x1 convolutions: the block works on ``(N, C, H, W)`` and the replacement is
  ``ChannelsFirst(HanBlock)``);
* at least one activation module (GELU, ReLU, SiLU, ..., or a class whose name
  says activation / GELU / ReLU / SiLU / Swish / Act);
* optionally dropouts, identities and norms;

and nothing else (so attention, which has no activation module and 3-4
projections, is not caught). It becomes a ``HanBlock`` of width ``d`` if its
``forward`` takes a single input (BLOOM's MLP, ``forward(x, residual)``, is
skipped with that reason).
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
from ._common import dims, dropout_p, finish, han_block, require_square

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
    return _NORM_NAME.search(type(m).__name__.lower()) is not None and not any(_is_projection(c) for c in m.modules())


def _split(module: nn.Module):
    children = list(module.children())
    projs = [c for c in children if _is_projection(c)]
    acts = [c for c in children if not _is_projection(c) and _is_activation(c)]
    rest = [c for c in children if not _is_projection(c) and not _is_activation(c)]
    return projs, acts, rest


def _looks_like_ffn(cand: Candidate) -> bool:
    projs, acts, rest = _split(cand.module)
    return 2 <= len(projs) <= 3 and len(acts) >= 1 and all(_is_passive(c) for c in rest)


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
    if any(u != ups[0] for u in ups) or down[0] != hidden:
        raise SkipCandidate(f"fallback: projections {shapes} are not d -> h (, d -> h) -> d")
    require_square(d_in, hidden, down[1], "first projection")
    convs = [isinstance(p, nn.Conv2d) for p in projs]
    if any(convs) and not all(convs):
        raise SkipCandidate("fallback: mixes 1x1 convolutions and linear layers (layout unknown)")
    drops = [dropout_p(c) for c in rest if isinstance(c, nn.Dropout)]
    han = han_block(d_in, config, (0.0, max(drops, default=0.0)))
    return finish(cand, config, ChannelsFirst(han) if all(convs) else han, None)
