"""Mixture-of-experts FFNs of transformers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, ...).

Their sparse-MoE block holds a router (``gate``: scores the experts, keeps the top ``k`` per token,
normalises their weights) and an experts module holding every expert's gated MLP as stacked 3-D
weights (``gate_up_proj``, ``down_proj``), called as ``experts(hidden_states, top_k_index,
top_k_weights)``. Each expert is an FFN, so each becomes a Han-block
(:class:`~han_surgery.surgery.modules.HanExperts`; the gate of its gated MLP goes, as in LLaMA).

The router is kept, with its weights, and so is the top-k routing: the same experts are chosen
for a token as before (the router reads the block's input, which does not change) and
their outputs are combined with the same weights, ``sum_j w_j Han_j(x)``; only what an
expert computes changes. So is the pre-norm, whatever ``drop_norm`` says: the router was
trained on the normalised stream. Shared experts (Qwen2-MoE's ``shared_expert``) are plain gated
MLPs and are rewritten by ``hf.gated_mlp``; their sigmoid gate stays. ``residual="drop"`` is refused.
Older models that keep experts as a ``ModuleList`` of MLPs (Switch, NLLB-MoE) get each expert
rewritten by its own family's rule.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..config import HanConfig
from ..modules import HanExperts
from ..registry import Candidate, Replacement, SkipCandidate, register_rule
from ._common import block_dropout, require_reflections

CALL = ("hidden_states", "top_k_index", "top_k_weights")


def _is_fused_experts(cand: Candidate) -> bool:
    m = cand.module
    down = getattr(m, "down_proj", None)
    return isinstance(getattr(m, "num_experts", None), int) and isinstance(down, nn.Parameter) and down.dim() == 3


@register_rule("hf.moe_experts", matcher=_is_fused_experts, changes=(), priority=90)
def build_moe_experts(cand: Candidate, config: HanConfig) -> Replacement:
    """transformers fused MoE experts (3-D gate_up_proj / down_proj) -> ``HanExperts`` (one Han-block per expert; router kept)."""
    m = cand.module
    names = tuple(inspect.signature(m.forward).parameters)
    if names[:3] != CALL:
        raise SkipCandidate(
            f"{type(m).__name__}.forward({', '.join(names)}): not the experts(hidden_states, top_k_index, "
            "top_k_weights) call han-surgery knows how to route"
        )
    features = getattr(m, "hidden_dim", None) or getattr(m, "hidden_size", None)
    if not isinstance(features, int):
        raise SkipCandidate(f"{type(m).__name__} does not say its hidden size (hidden_dim / hidden_size)")
    require_reflections(features, config)
    han = HanExperts(
        m.num_experts,
        features,
        drop=block_dropout(config, (0.0, 0.0)),
        final_abs=config.final_abs,
        **config.han_kwargs(),
    )
    nb = {
        "norm": "pre-norm kept (the router reads it)",
        "residual": "kept",
        "router": f"{cand.qualify('gate')} kept: same top-k experts and weights per token, each expert a Han-block",
    }
    return Replacement({cand.path: han}, nb)
