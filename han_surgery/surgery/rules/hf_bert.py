"""transformers split FFNs: ``*Intermediate`` (dense d->h, activation) + ``*Output`` (dense h->d,
dropout, [LayerNorm](x + input)) -- BERT, RoBERTa, ELECTRA, HF MobileViT and the many models
copied from them.

The ``Intermediate`` becomes a :class:`~han_surgery.layers.HanBlock` (width d) and the
``Output`` a :class:`~han_surgery.surgery.modules.HanSplitOutput` (dropout, residual add,
post-norm). Norm and residual:

* post-norm (the ``Output`` owns a ``LayerNorm``: BERT, RoBERTa, ELECTRA): that norm
  normalises the residual stream, not the FFN's input, so it is kept whatever
  ``drop_norm`` says; ``residual="drop"`` gives ``LayerNorm(dropout(Han(x)))``;
* pre-norm (``layernorm_after`` in the parent layer: HF MobileViT): ``drop_norm``
  turns it into ``Identity``; ``residual="drop"`` gives ``dropout(Han(norm(x)))``;
* an ``*Output`` that takes no residual (``forward(hidden_states)``: Swin-V2, whose layer adds
  ``x + drop_path(layernorm_after(ffn(x)))``, a norm *after* the FFN): the norm is kept, the
  residual cannot be dropped by a swap.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..calibration.site import CalibratedReplacement, CalibrationSite
from ..config import HanConfig
from ..modules import HanSplitOutput
from ..registry import Candidate, SkipCandidate, register_rule
from ._common import dims, han_block, require_square

PRE_NORM_ATTRS = ("layernorm_after",)
OUTPUT_CHILDREN = ("dense", "dropout", "LayerNorm")  # all HanSplitOutput keeps of an ``*Output``


def _is_split_ffn(cand: Candidate) -> bool:
    m, out = cand.module, cand.sibling("output")
    return (
        cand.attr == "intermediate"
        and isinstance(getattr(m, "dense", None), nn.Linear)
        and out is not None
        and isinstance(getattr(out, "dense", None), nn.Linear)
    )


def _no_residual_output(
    cand: Candidate, config: HanConfig, features: int, out: nn.Module, params: list[str]
) -> CalibratedReplacement:
    """An ``*Output`` without the residual input (Swin-V2): ``dense`` + ``dropout`` only; the layer adds the residual."""
    extra = sorted(set(dict(out.named_children())) - {"dense", "dropout"})
    if extra:
        raise SkipCandidate(
            f"{type(out).__name__}.forward({', '.join(params)}) takes no residual and has sub-modules {extra}"
        )
    if config.residual == "drop":
        raise SkipCandidate(
            f"HanConfig.residual='drop' not possible: {type(cand.parent).__name__} adds the residual itself; "
            "use HanConfig.residual='keep'"
        )
    dropout = getattr(out, "dropout", None)
    split = HanSplitOutput(dropout if isinstance(dropout, nn.Module) else None, None, residual=False)
    if config.dropout is not None:
        split.dropout = nn.Dropout(config.dropout)
    norm = "layernorm_after" if cand.sibling("layernorm_after") is not None else None
    nb = {
        "norm": f"{norm} (applied after the FFN) kept" if norm else "no norm found: left as is",
        "residual": "kept (added by the layer)",
    }
    return CalibratedReplacement(
        {cand.path: han_block(features, config, output_dropout_outside=True), cand.qualify("output"): split},
        nb,
        not_calibrated="the layer normalises the FFN's output before its residual add (Swin-V2); not calibrated yet",
    )


@register_rule("hf.split_ffn", matcher=_is_split_ffn, changes=("norm", "residual"), priority=90)
def build_split_ffn(cand: Candidate, config: HanConfig) -> CalibratedReplacement:
    """transformers ``*Intermediate`` + ``*Output`` (BERT, RoBERTa, ELECTRA, MobileViT, ...) -> ``HanBlock`` + ``HanSplitOutput``."""
    inter, out = cand.module, cand.sibling("output")
    (d_in, hidden), (_, d_out) = dims(inter.dense), dims(out.dense)
    require_square(d_in, hidden, d_out, "intermediate.dense")
    params = list(inspect.signature(out.forward).parameters)
    if len(params) < 2:
        return _no_residual_output(cand, config, d_in, out, params)
    required = [
        p.name
        for p in inspect.signature(out.forward).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    extra = sorted(set(dict(out.named_children())) - set(OUTPUT_CHILDREN))
    if len(required) > 2 or extra:
        raise SkipCandidate(
            f"{type(out).__name__} does more than dropout + residual + norm (forward({', '.join(params)}), "
            f"sub-modules {extra}): HanSplitOutput would drop it"
        )
    out_path = cand.qualify("output")
    post_norm = getattr(out, "LayerNorm", None)
    dropout = getattr(out, "dropout", None)
    swaps: dict[str, nn.Module] = {}
    nb: dict[str, str] = {}
    pre_attr = next((a for a in PRE_NORM_ATTRS if isinstance(cand.sibling(a), nn.Module)), None)
    dropped_norm = None
    if isinstance(post_norm, nn.Module):
        nb["norm"] = "post-norm output.LayerNorm kept (it normalises the residual stream)"
    elif pre_attr is not None and config.drop_norm and not isinstance(cand.sibling(pre_attr), nn.Identity):
        swaps[cand.qualify(pre_attr)] = nn.Identity()
        nb["norm"] = f"{pre_attr} ({type(cand.sibling(pre_attr)).__name__}) -> Identity"
        dropped_norm = cand.sibling(pre_attr)
    elif pre_attr is not None:
        nb["norm"] = f"{pre_attr} kept"
    else:
        nb["norm"] = "no norm found: left as is"
    residual = config.residual == "keep"
    nb["residual"] = "kept" if residual else "dropped (HanSplitOutput adds no input)"
    han = han_block(d_in, config, (0.0, 0.0), output_dropout_outside=True)
    swaps[cand.path] = han
    swaps[out_path] = HanSplitOutput(
        dropout if isinstance(dropout, nn.Module) else None,
        post_norm if isinstance(post_norm, nn.Module) else None,
        residual,
    )
    if config.dropout is not None:
        swaps[out_path].dropout = nn.Dropout(config.dropout)
    # The Han block sees the Intermediate's input x, which is also the Output's residual input.
    # Old: norm(x + output.dense(intermediate(pre_norm(x)))); new: norm([x +] han(x)).
    old_branch = [m for m in (dropped_norm, inter, out.dense) if m is not None]
    site = CalibrationSite(
        input_path=cand.path,
        fitted=han,
        reference=nn.Sequential(*old_branch),
        residual=residual,
        post_norm=post_norm if isinstance(post_norm, nn.Module) else None,
        original_input_path=cand.qualify(pre_attr) if dropped_norm is not None else None,
        stream_path=cand.parent_path or None,
    )
    return CalibratedReplacement(swaps, nb, site=site)
