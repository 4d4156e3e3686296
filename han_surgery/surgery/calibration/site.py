"""``CalibrationSite``: what one rewrite computed before surgery and computes after, as functions of one input.

A rule that can be calibrated returns a :class:`CalibratedReplacement`: the
usual :class:`~han_surgery.surgery.registry.Replacement` plus a site. With the
recorded input ``x`` of the module at ``input_path`` (in the rewritten model,
so that blocks fitted before it are in place) the site defines

* the old output: ``N(x + reference(x))``;
* the new output: ``N(x + fitted(x))`` (``residual=True``) or ``N(fitted(x))``
  (``residual=False``: the rewrite dropped the skip connection, so ``fitted``
  must reproduce ``x + reference(x)`` on its own);

where ``N`` is the post-norm of post-norm models (BERT, DistilBERT, BART: the
fit is scored after it, as the network sees it) or nothing (pre-norm models:
the branch output is scored, the residual add being the same on both sides).
Every one of these functions must act on each token (row) independently: a block
that mixes tokens (gMLP's spatial gating, a Mix-FFN's depthwise conv, ConvNeXt-V2's GRN)
has no site.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ..registry import Replacement

__all__ = ["CalibrationSite", "CalibratedReplacement", "PixelRows", "SequenceRows"]


@dataclass
class CalibrationSite:
    """How calibrated surgery fits one rewrite (see the module docstring).

    Attributes:
        input_path: qualified name, in the rewritten model, of the module whose
            first input is ``x`` (shape ``(..., d)``, or ``(N, d, H, W)`` with
            ``channels_first``).
        fitted: the new module whose parameters calibration fits, ``(T, d) -> (T, d)``
            on rows of ``x`` (e.g. the :class:`~han_surgery.layers.HanBlock`).
        reference: the replaced computation, ``(T, d) -> (T, d)``: the old FFN,
            preceded by the old pre-norm if the rewrite dropped it. Built from the
            original modules; never trained.
        residual: ``True`` if the parent still adds ``x`` to ``fitted(x)``.
        post_norm: the norm the parent applies after the residual add (kept by
            the rewrite), or ``None``.
        channels_first: ``x`` is ``(N, d, H, W)``; its tokens are the pixels.
        original_input_path: qualified name, in the *original* model, of the module
            whose first input is the same point of the network (default
            ``input_path``; the dropped pre-norm when the rewrite removed one, whose
            input is the un-normalised ``x``). Used by the ``"model"`` target.
        stream_path: qualified name of the module whose output is the hidden
            state (residual stream) right after this block, e.g. the transformer
            layer holding the FFN; healing distils it. ``None``: not distilled.
        block_target: why only the ``"block"`` target is right here, in words
            (empty: the ``"model"`` target applies). The ``"model"`` target fits the
            branch ``x_o + reference(x_o) - x``, which is right only where ``x`` is the
            residual stream the parent adds ``fitted(x)`` to, unscaled: not behind a
            kept pre-norm, a layer scale, or a depthwise conv (ConvNeXt).
        flat_tokens: ``x`` arrives as ``(B * L, d)``, the batch's tokens flattened
            (OPT's decoder layer): the batch's padding mask selects its rows.
    """

    input_path: str
    fitted: nn.Module
    reference: nn.Module
    residual: bool = True
    post_norm: nn.Module | None = None
    channels_first: bool = False
    original_input_path: str | None = None
    stream_path: str | None = None
    block_target: str = ""
    flat_tokens: bool = False


@dataclass
class CalibratedReplacement(Replacement):
    """A :class:`Replacement` that says how to calibrate it.

    Attributes:
        site: the :class:`CalibrationSite`, or ``None`` if this rewrite cannot
            be calibrated (then ``not_calibrated`` says why).
        not_calibrated: the reason, in words, when ``site`` is ``None``.
    """

    site: CalibrationSite | None = None
    not_calibrated: str = field(default="")


class PixelRows(nn.Module):
    """Apply a channels-first ``(N, C, H, W)`` module to rows ``(T, C)`` (each row one pixel).

    ``y = inner(x[:, :, None, None])[:, :, 0, 0]``; only valid for modules that act
    on each pixel independently (1x1 convolutions, BatchNorm in eval mode).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x[:, :, None, None])[:, :, 0, 0]


class SequenceRows(nn.Module):
    """Apply a module that expects ``(B, N, C)`` sequences to rows ``(T, C)``, as one sequence of ``T`` tokens.

    ``y = inner(x[None])[0]``; only valid for modules that act on each token independently
    (LeViT's Linear + BatchNorm pairs in eval mode, which flatten ``(B, N)`` for the BatchNorm).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x[None])[0]
