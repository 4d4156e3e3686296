"""Small wrapper modules the surgery rules put into models.

They exist so that every rewrite is a plain module swap (no monkey-patched
``forward``), which keeps the result picklable-free, ``state_dict``-exact and
replayable by :func:`han_surgery.from_pretrained`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..layers import HanBlock, HanLayer, HouseholderLinear

__all__ = ["ResidualFree", "ChannelsFirst", "HanSplitOutput", "HanGatedMlp", "HAN_MODULE_TYPES"]


class ResidualFree(nn.Module):
    """``y = ffn(norm(x)) - x``: cancels the residual its parent adds around it.

    Put in place of the FFN of a block computing ``x + branch(x)``, the block
    then computes ``ffn(norm(x))`` (the paper's Hanformer, no residual). The
    forward result differs from ``ffn(norm(x))`` by one rounding of the add;
    the gradient through the cancelled path is exactly zero. Any stochastic
    depth / dropout the parent applies to the branch still applies to it.

    Args:
        ffn: the Han block.
        norm: the pre-norm, moved here from the parent when it is kept
            (``drop_norm=False``), so the subtraction sees the un-normalised ``x``.

    Shapes: ``(..., n) -> (..., n)`` (or whatever ``ffn`` maps, same shape).
    """

    def __init__(self, ffn: nn.Module, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()
        self.ffn = ffn

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(self.norm(x)) - x


class ChannelsFirst(nn.Module):
    """Apply a channels-last module to an ``(N, C, H, W)`` tensor (replaces 1x1-conv MLPs).

    ``y = inner(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)``; shapes ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class HanSplitOutput(nn.Module):
    """The second half of a transformers split FFN (``*Output``), after its dense layer moved into the Han block.

    ``forward(hidden_states, input_tensor) = norm(dropout(hidden_states) + input_tensor)``
    (``residual=True``) or ``norm(dropout(hidden_states))`` (``residual=False``);
    ``norm`` is the post-LayerNorm of post-norm models (BERT) or ``Identity``
    (pre-norm models such as ViT, whose ``*Output`` has no norm).

    Shapes: ``(B, L, n), (B, L, n) -> (B, L, n)``.
    """

    def __init__(self, dropout: nn.Module | None, norm: nn.Module | None, residual: bool = True) -> None:
        super().__init__()
        self.dropout = dropout if dropout is not None else nn.Identity()
        self.LayerNorm = norm if norm is not None else nn.Identity()  # BERT's attribute name
        self.residual = residual

    def forward(self, hidden_states: Tensor, input_tensor: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        hidden_states = self.dropout(hidden_states)
        if self.residual:
            hidden_states = hidden_states + input_tensor
        return self.LayerNorm(hidden_states)

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


class HanGatedMlp(nn.Module):
    """gMLP's channel MLP with spatial gating, in Han form.

    ``z = |H1 x + b1|``; ``v = proj(norm(z)^T)^T`` (token mixing over the
    sequence, the spatial gating unit); ``y = H2 (z * v) + b2``. The pretrained
    ``proj`` of the gating unit (a ``seq_len x seq_len`` linear) is copied over;
    its norm is rebuilt at width ``n``.

    Shapes: ``(B, seq_len, n) -> (B, seq_len, n)``.
    """

    def __init__(
        self,
        features: int,
        proj: nn.Linear,
        eps: float = 1e-6,
        drop: tuple[float, float] = (0.0, 0.0),
        **han_kwargs: Any,
    ) -> None:
        super().__init__()
        self.fc1 = HanLayer(features, **han_kwargs)
        self.drop1 = nn.Dropout(drop[0])
        self.gate_norm = nn.LayerNorm(features, eps=eps)
        self.gate_proj = proj
        self.fc2 = HouseholderLinear(features, **han_kwargs)
        self.drop2 = nn.Dropout(drop[1])

    def forward(self, x: Tensor) -> Tensor:
        z = self.drop1(self.fc1(x))
        v = self.gate_proj(self.gate_norm(z).transpose(-1, -2)).transpose(-1, -2)
        return self.drop2(self.fc2(z * v))


# Modules hanify never looks into: already Han (this is what makes a second call a no-op).
HAN_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    HouseholderLinear,
    HanBlock,
    ResidualFree,
    ChannelsFirst,
    HanSplitOutput,
    HanGatedMlp,
)
