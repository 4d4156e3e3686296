"""transformers MLP modules ``fc2(activation_fn(fc1(x)))`` (CLIP, SigLIP, ViT, DeiT, Dinov2, ...),
with the pre-norm named by the parent layer class (``layer_norm2`` in CLIP/SigLIP,
``layernorm_after`` in ViT/DeiT/Dinov2 ...).
"""

from __future__ import annotations

from torch import nn

from ..config import HanConfig
from ..registry import Candidate, Replacement, register_rule
from ._common import Site, dims, finish, han_block, require_square

# parent layer class name -> Site of its ``mlp``
HF_MLP_SITES: dict[str, Site] = {
    "CLIPEncoderLayer": Site(norm="layer_norm2"),
    "SiglipEncoderLayer": Site(norm="layer_norm2"),
    "Siglip2EncoderLayer": Site(norm="layer_norm2"),
    "AltCLIPEncoderLayer": Site(norm="layer_norm2"),
    "ViTLayer": Site(norm="layernorm_after"),
    "DeiTLayer": Site(norm="layernorm_after"),
    "ViTMSNLayer": Site(norm="layernorm_after"),
    "SwinLayer": Site(norm="layernorm_after"),
    "ASTLayer": Site(norm="layernorm_after"),
    "Dinov2Layer": Site(norm="norm2", scales=("layer_scale2",)),
}


def _is_hf_mlp(cand: Candidate) -> bool:
    m = cand.module
    return (
        isinstance(getattr(m, "fc1", None), nn.Linear)
        and isinstance(getattr(m, "fc2", None), nn.Linear)
        and isinstance(getattr(m, "activation_fn", None), nn.Module)
        and not isinstance(getattr(m, "final_layer_norm", None), nn.Module)
    )


@register_rule("hf.mlp", matcher=_is_hf_mlp, changes=("norm", "residual"), priority=90)
def build_hf_mlp(cand: Candidate, config: HanConfig) -> Replacement:
    """transformers ``*MLP`` (fc1, activation_fn, fc2: CLIP, ViT, ...) -> ``HanBlock``."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.fc1), dims(m.fc2)
    require_square(d_in, hidden, d_out)
    site = HF_MLP_SITES.get(type(cand.parent).__name__) if cand.attr == "mlp" else None
    return finish(cand, config, han_block(d_in, config), site)
