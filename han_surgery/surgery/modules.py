"""Small wrapper modules the surgery rules put into models.

They exist so that every rewrite is a plain module swap (no monkey-patched
``forward``), which keeps the result picklable-free, ``state_dict``-exact and
replayable by :func:`han_surgery.from_pretrained`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..layers import Abs, HanBlock, HanLayer, HouseholderLinear

__all__ = [
    "ResidualFree",
    "ChannelsFirst",
    "HanSplitOutput",
    "HanGatedMlp",
    "HanMixFfn",
    "HanMixFfnFeatSize",
    "HanMixFfn2d",
    "HanGatedConvBlock",
    "HanConvMlp",
    "HanExperts",
    "HAN_MODULE_TYPES",
]


class ResidualFree(nn.Module):
    """``y = ffn(norm(x)) - x``: cancels the residual its parent adds around it.

    Put in place of the FFN of a block computing ``x + branch(x)``, the block
    then computes ``ffn(norm(x))`` (Han-MobileViT's block, no residual). The
    forward result differs from ``ffn(norm(x))`` by one rounding of the add;
    the gradient through the cancelled path is exactly zero. Any stochastic
    depth / dropout the parent applies to the branch still applies to it.

    Args:
        ffn: the Han block.
        norm: the pre-norm, moved here from the parent when it is kept
            (``drop_norm=False``), so the subtraction sees the un-normalised ``x``.

    Inputs after ``x`` (SegFormer's ``height, width``) are passed on to ``ffn``.

    Shapes: ``(..., n) -> (..., n)`` (or whatever ``ffn`` maps, same shape).
    """

    def __init__(self, ffn: nn.Module, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()
        self.ffn = ffn

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.ffn(self.norm(x), *args, **kwargs) - x


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
            if input_tensor is None:
                raise TypeError(
                    "HanSplitOutput.forward() missing the argument 'input_tensor' (the residual branch it adds back, "
                    "as the *Output module it replaced took it)"
                )
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


class HanMixFfn(nn.Module):
    """A Mix-FFN (SegFormer, PVTv2: an MLP with a depthwise conv inside) in Han form.

    ``z = H1 x + b1`` (width ``n``), ``z = DW(z)`` (a ``k x k`` depthwise conv over the
    ``height x width`` token grid), ``y = H2 |z| + b2``: the dense ``n -> h`` and ``h -> n``
    projections become Householder layers, the activation becomes ``|.|``, and the depthwise conv,
    the block's spatial mixing (and, with its zero padding, its only source of position
    information), is kept at width ``n``. It starts as the identity (a Dirac kernel, zero
    bias), so without ``pre_conv`` (or with ``Abs()``) the new block initially computes exactly the
    paper's ``H2 |H1 x + b1| + b2``; with another ``pre_conv`` it computes ``H2 |f(H1 x + b1)| + b2``
    (``H2 ReLU(H1 x + b1) + b2`` with ``nn.ReLU()``). Its ``n k^2 + n`` parameters keep the block ``O(n)``.

    Args:
        features: ``n``.
        kernel_size: of the depthwise conv (the replaced one's); odd, so that the zero padding keeps the
            ``height x width`` grid (``ValueError`` otherwise).
        pre_conv: an activation between ``H1 x + b1`` and the conv, where the replaced block has one
            (PVTv2's linear variants: ``nn.ReLU()``; EfficientFormer-V2: ``Abs()``).
        drop: dropout after ``|.|`` and after ``H2``.
        final_abs: end with ``|.|``.
        **han_kwargs: ``reflections``, ``init``, ``bias_init`` of both Householder layers.

    Shapes: ``forward(x, height, width)``: ``(B, height * width, n) -> (B, height * width, n)``.
    """

    def __init__(
        self,
        features: int,
        kernel_size: int = 3,
        pre_conv: nn.Module | None = None,
        drop: tuple[float, float] = (0.0, 0.0),
        final_abs: bool = False,
        **han_kwargs: Any,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            # padding kernel_size // 2 keeps the grid only for odd sizes: an even one adds a row and a column of
            # tokens (and puts the Dirac start off-centre)
            raise ValueError(f"{type(self).__name__}: kernel_size must be odd and positive, got {kernel_size}")
        self.fc1 = HouseholderLinear(features, **han_kwargs)
        self.pre_conv = pre_conv if pre_conv is not None else nn.Identity()
        self.dwconv = nn.Conv2d(features, features, kernel_size, padding=kernel_size // 2, groups=features)
        with torch.no_grad():
            self.dwconv.weight.zero_()
            self.dwconv.weight[:, 0, kernel_size // 2, kernel_size // 2] = 1.0
            self.dwconv.bias.zero_()
        self.act = Abs()
        self.drop1 = nn.Dropout(drop[0])
        self.fc2 = (HanLayer if final_abs else HouseholderLinear)(features, **han_kwargs)
        self.drop2 = nn.Dropout(drop[1])

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        z = self.pre_conv(self.fc1(x))
        batch, tokens, channels = z.shape
        z = self.dwconv(z.transpose(1, 2).reshape(batch, channels, height, width)).flatten(2).transpose(1, 2)
        return self.drop2(self.fc2(self.drop1(self.act(z))))


class HanMixFfnFeatSize(HanMixFfn):
    """:class:`HanMixFfn` called as timm's PVTv2 ``MlpWithDepthwiseConv``: ``forward(x, feat_size)``,
    ``feat_size = (height, width)``."""

    def forward(self, x: Tensor, feat_size: list[int]) -> Tensor:  # type: ignore[override]
        return super().forward(x, feat_size[0], feat_size[1])


class HanMixFfn2d(HanMixFfn):
    """:class:`HanMixFfn` on ``(N, n, H, W)`` feature maps (EfficientFormer-V2's ``ConvMlpWithNorm``):
    the Householder layers act on the channels of each pixel."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        batch, channels, height, width = x.shape
        y = super().forward(x.flatten(2).transpose(1, 2), height, width)
        return y.transpose(1, 2).reshape(batch, channels, height, width)


class HanGatedConvBlock(nn.Module):
    """MambaOut's ``GatedConvBlock`` in Han form: ``x + drop_path(ls(HanMixFfn(norm(x))))`` on channels-last maps.

    The replaced block is a gated MLP with a depthwise conv inside (``fc2(act(g) * [i, conv(c)])``)
    that also holds its norm and residual. The gate goes (as in the gated MLPs of LLaMA), the
    projections become reflections and the depthwise conv, the block's only spatial mixing, stays
    at width ``n`` (:class:`HanMixFfn`). ``norm``, ``ls`` and ``drop_path`` are the replaced block's
    modules (``Identity`` when the rule drops them); ``residual=False`` returns the branch alone.

    Shapes: ``(B, H, W, n) -> (B, H, W, n)``.
    """

    def __init__(
        self, ffn: HanMixFfn, norm: nn.Module, ls: nn.Module, drop_path: nn.Module, residual: bool = True
    ) -> None:
        super().__init__()
        self.norm = norm
        self.ffn = ffn
        self.ls = ls
        self.drop_path = drop_path
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        y = self.ffn(self.norm(x).reshape(batch, height * width, channels), height, width)
        y = self.drop_path(self.ls(y.reshape(batch, height, width, channels)))
        return x + y if self.residual else y

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


class HanConvMlp(nn.Module):
    """FastViT's ``ConvMlp`` in Han form: its depthwise conv (kept, with its weights), then a Han-block on
    the channels.

    ``y = Han(conv(x))`` with ``conv`` the replaced block's ``k x k`` depthwise conv + BatchNorm (the
    block's spatial mixing, already width ``n``) and ``Han`` the paper's ``H2 |H1 . + b1| + b2``
    in place of the 1x1-conv ``n -> h -> n`` MLP, applied per pixel.

    Shapes: ``(N, n, H, W) -> (N, n, H, W)``.
    """

    def __init__(self, conv: nn.Module, block: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class HanExperts(nn.Module):
    """The experts of a mixture-of-experts FFN, each a Han-block, called like transformers' experts modules.

    ``forward(hidden_states, top_k_index, top_k_weights)``: token ``t`` gets
    ``sum_j top_k_weights[t, j] * expert[top_k_index[t, j]](hidden_states[t])``, the
    routing the replaced module did (the router that chose ``top_k_index`` and ``top_k_weights``
    is not touched). Indices outside ``[0, num_experts)`` (padding experts) contribute nothing.

    Shapes: ``(T, n), (T, k) long, (T, k) -> (T, n)``.
    """

    def __init__(
        self,
        num_experts: int,
        features: int,
        drop: tuple[float, float] = (0.0, 0.0),
        final_abs: bool = False,
        **han_kwargs: Any,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.experts = nn.ModuleList(
            HanBlock(features, final_abs=final_abs, drop=drop, **han_kwargs) for _ in range(num_experts)
        )

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self.experts):
            token, slot = torch.where(top_k_index == index)
            if token.numel() == 0:
                continue
            y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


# Modules hanify never looks into: already Han (this is what makes a second call a no-op).
HAN_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    HouseholderLinear,
    HanBlock,
    ResidualFree,
    ChannelsFirst,
    HanSplitOutput,
    HanGatedMlp,
    HanMixFfn,
    HanGatedConvBlock,
    HanConvMlp,
    HanExperts,
)
