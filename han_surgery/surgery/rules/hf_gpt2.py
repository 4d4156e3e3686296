"""GPT-2's ``GPT2MLP`` (``Conv1D`` c_fc d->h, activation, ``Conv1D`` c_proj h->d, dropout),
pre-norm ``ln_2`` in ``GPT2Block`` (``x + mlp(ln_2(x))``). Also catches the models copied
from it (``c_fc`` / ``c_proj`` names: GPT-Neo's MLP, ImageGPT, ...).
"""

from __future__ import annotations

from ..config import HanConfig
from ..registry import Candidate, Replacement, register_rule
from ._common import Site, dims, dropout_p, finish, han_block, require_square

GPT2_SITES = {"GPT2Block": Site(norm="ln_2"), "ImageGPTBlock": Site(norm="ln_2"), "GPTNeoBlock": Site(norm="ln_2")}


def _is_gpt2_mlp(cand: Candidate) -> bool:
    m = cand.module
    return hasattr(m, "c_fc") and hasattr(m, "c_proj") and type(m.c_fc).__name__ in ("Conv1D", "Linear")


@register_rule("hf.gpt2_mlp", matcher=_is_gpt2_mlp, changes=("norm", "residual"), priority=90)
def build_gpt2_mlp(cand: Candidate, config: HanConfig) -> Replacement:
    """GPT-2 ``GPT2MLP`` (Conv1D c_fc, act, Conv1D c_proj, dropout) -> ``HanBlock``; ``ln_2`` dropped."""
    m = cand.module
    (d_in, hidden), (_, d_out) = dims(m.c_fc), dims(m.c_proj)
    require_square(d_in, hidden, d_out, "c_fc")
    han = han_block(d_in, config, (0.0, dropout_p(getattr(m, "dropout", None))))
    site = GPT2_SITES.get(type(cand.parent).__name__)
    return finish(cand, config, han, site)
