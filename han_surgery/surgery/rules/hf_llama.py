"""Gated MLPs of decoder LLMs: ``down_proj(act(gate_proj(x)) * up_proj(x))`` --
LLaMA, Mistral, Qwen2, Gemma, ... (``gate_proj``, ``up_proj``, ``down_proj`` Linear), and the
fused form ``gate_up_proj`` (``d -> 2h``) + ``down_proj`` (Phi-3).

The whole gated MLP becomes a ``HanBlock`` (the gate goes). The pre-norm is the
layer's ``post_attention_layernorm`` (``x + mlp(norm(x))``); Gemma-2/3 layers have a
``pre_feedforward_layernorm`` instead and a ``post_feedforward_layernorm`` on the
branch, so their residual cannot be dropped by a swap.
"""

from __future__ import annotations

from torch import nn

from ..config import HanConfig
from ..registry import Candidate, Replacement, register_rule
from ._common import Site, dims, finish, han_block, require_square

GATED = (("gate_proj", "up_proj", "down_proj"), ("gate_up_proj", "down_proj"))


def _is_gated_mlp(cand: Candidate) -> bool:
    m = cand.module
    return any(all(isinstance(getattr(m, a, None), nn.Linear) for a in names) for names in GATED)


def _site(cand: Candidate) -> Site | None:
    if cand.attr != "mlp":
        return None
    if cand.sibling("pre_feedforward_layernorm") is not None:
        note = "post_feedforward_layernorm sits on the branch"
        return Site(norm="pre_feedforward_layernorm", residual="fixed", note=note)
    if cand.sibling("post_feedforward_layernorm") is not None:  # OLMo-2/3: post-norms on both branches
        note = (
            "post-norm layer: post_feedforward_layernorm sits on the branch (post_attention_layernorm normalises the "
            "attention's output, not the MLP's input)"
        )
        return Site(norm=None, residual="fixed", note=note)
    if cand.sibling("post_mlp_layernorm") is not None:  # GLM-4: x + post_mlp_layernorm(mlp(norm(x)))
        note = "post_mlp_layernorm sits on the branch"
        return Site(norm="post_attention_layernorm", residual="fixed", note=note)
    scaled = _branch_scale(cand.parent)
    if scaled:
        return Site(norm="post_attention_layernorm", residual="fixed", note=scaled)
    if cand.sibling("post_attention_layernorm") is not None:
        return Site(norm="post_attention_layernorm")
    return None


def _branch_scale(layer: nn.Module) -> str:
    """How the layer scales the MLP's output before adding it to the stream (``""``: it does not): Granite's
    ``residual_multiplier``, MiniCPM's ``scale_depth``."""
    for name in ("residual_multiplier", "scale_depth"):
        value = getattr(layer, name, None)
        if isinstance(value, (int, float)) and value != 1:
            return f"the layer scales the branch by its {name} ({value:g})"
    return ""


@register_rule("hf.gated_mlp", matcher=_is_gated_mlp, changes=("norm", "residual"), priority=90)
def build_gated_mlp(cand: Candidate, config: HanConfig) -> Replacement:
    """LLaMA / Mistral / Qwen2 / Phi-3 gated MLP (gate_proj, up_proj or gate_up_proj, down_proj) -> ``HanBlock``; ``post_attention_layernorm`` dropped."""
    m = cand.module
    if isinstance(getattr(m, "up_proj", None), nn.Linear):
        (d_in, hidden), (_, d_out) = dims(m.up_proj), dims(m.down_proj)
        require_square(d_in, hidden, d_out, "up_proj")
    else:
        (d_in, hidden2), (_, d_out) = dims(m.gate_up_proj), dims(m.down_proj)
        require_square(d_in, f"2x{hidden2 // 2}", d_out, "gate_up_proj")
    return finish(cand, config, han_block(d_in, config), _site(cand))
