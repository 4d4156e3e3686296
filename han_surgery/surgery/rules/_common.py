"""Helpers shared by the built-in rules: building Han blocks and handling the pre-norm and the residual."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...layers import Abs, HanBlock, HanLayer, HouseholderLinear
from ..calibration.site import CalibratedReplacement, CalibrationSite, PixelRows
from ..config import HanConfig
from ..modules import ChannelsFirst, HanConvMlp, HanGatedMlp, HanMixFfn, HanMixFfn2d, ResidualFree
from ..registry import Candidate, SkipCandidate

__all__ = [
    "Site",
    "dims",
    "require_square",
    "require_reflections",
    "dropout_p",
    "block_dropout",
    "han_block",
    "calibration_site",
    "token_mixing_reason",
    "finish",
    "inline_han_swaps",
    "inline_site",
    "require_not_in_attention",
    "mix_ffn_2d",
]


@dataclass(frozen=True)
class Site:
    """How a parent block uses its FFN (one entry of a family table).

    Attributes:
        norm: attribute of the pre-norm the parent applies to the FFN's input
            (``None``: no pre-norm, e.g. post-norm blocks).
        residual: ``"add"`` -- the parent computes ``x + branch(ffn(norm(x)))``;
            ``"post"`` -- it computes ``post_norm(x + ffn(x))``; anything else
            (``"fixed"``) -- the residual cannot be removed by a module swap.
        scales: module attributes scaling the branch (layer scale); replaced by
            ``Identity`` when the residual is dropped.
        res_scales: module attributes scaling ``x``; must be ``Identity`` to drop the residual.
        gammas: parameter attributes scaling the branch (they cannot be
            swapped: residual ``"drop"`` is refused when they are set).
        transposed: the FFN sees ``norm(x)`` transposed (MLP-Mixer token mixing).
        note: why the residual cannot be dropped (for ``"fixed"``).
        post_norm: attribute of the post-norm (informational, always kept).
    """

    norm: str | None
    residual: str = "add"
    scales: tuple[str, ...] = ()
    res_scales: tuple[str, ...] = ()
    gammas: tuple[str, ...] = ()
    transposed: bool = False
    note: str = ""
    post_norm: str | None = None


def dims(layer: nn.Module) -> tuple[int, int]:
    """``(in, out)`` features of a Linear, a 1x1 Conv2d or a transformers Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):  # transformers.pytorch_utils.Conv1D
        return layer.weight.shape[0], layer.nf
    raise SkipCandidate(f"unsupported projection layer {type(layer).__name__}")


def require_square(d_in: int, hidden: int | str, d_out: int, what: str = "fc1") -> None:
    """Skip blocks whose output width differs from their input width."""
    if d_in != d_out:
        raise SkipCandidate(
            f"{what} {d_in} -> {hidden} -> {d_out} but block output is {d_out}, input {d_in}: "
            "a Householder layer is square"
        )


POSITION_MLP_MAX_INPUT = 4


def require_not_in_attention(cand: Candidate, features: int) -> None:
    """Skip a position-bias MLP: one inside an attention module, or a relative-position module, that reads
    ``features <= 4`` inputs (relative coordinates, ``2 -> h -> heads``: Swin-V2's and timm's rel-pos MLPs, also
    the model-level ``shared_rel_pos`` of timm's ``vit_srelpos_*``). It maps coordinates to attention biases; it is
    not an FFN (a block called ``...Attention...`` may well hold a real FFN, as MaxViT's and CaiT's do)."""
    if features > POSITION_MLP_MAX_INPUT:
        return
    parts = cand.path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        name = type(cand.root.get_submodule(".".join(parts[:i]))).__name__
        if any(word in name for word in ("Attention", "RelPos", "PosBias", "PositionBias")):
            raise SkipCandidate(
                f"{features} inputs, inside {name} ({'.'.join(parts[:i])}): a position-bias MLP, not an FFN"
            )


def dropout_p(module: nn.Module | None) -> float:
    """The probability of an ``nn.Dropout`` (0 for anything else)."""
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def require_reflections(features: int, config: HanConfig) -> None:
    """Skip blocks narrower than the configured number of reflections (or side-path rank)."""
    if config.reflections > features:
        raise SkipCandidate(f"reflections={config.reflections} > width {features}")
    if config.side_rank > features:
        raise SkipCandidate(f"side_rank={config.side_rank} > width {features}")


def block_dropout(config: HanConfig, inherited: tuple[float, float]) -> tuple[float, float]:
    """The ``(drop1, drop2)`` of a new Han block: ``config.dropout`` if set, else the replaced block's."""
    return (config.dropout, config.dropout) if config.dropout is not None else inherited


def han_block(
    features: int, config: HanConfig, drop: tuple[float, float] = (0.0, 0.0), *, output_dropout_outside: bool = False
) -> HanBlock:
    """``HanBlock(features)`` configured by ``config`` (dropout inherited unless ``config.dropout`` is set).

    ``output_dropout_outside``: the dropout after the second layer is a module the rule keeps outside the
    block (transformers' ``*Output.dropout``), so the block's own ``drop2`` stays 0: one dropout there, not two.
    """
    require_reflections(features, config)
    drop1, drop2 = block_dropout(config, drop)
    return HanBlock(
        features,
        final_abs=config.final_abs,
        drop=(drop1, 0.0 if output_dropout_outside else drop2),
        **config.han_kwargs(),
        **config.block_extras(),
    )


# New modules whose output at a token depends on other tokens: calibration fits token by token (rows), so a
# rewrite that puts one of them in has no calibration site.
TOKEN_MIXING: tuple[tuple[type[nn.Module], str], ...] = (
    (HanGatedMlp, "gMLP's spatial gating mixes tokens"),
    (HanMixFfn, "the depthwise conv inside this Mix-FFN mixes neighbouring tokens (pixels)"),
    (HanConvMlp, "the depthwise conv (kept) in front of this MLP mixes neighbouring pixels"),
)


def token_mixing_reason(module: nn.Module) -> str:
    """Why a rewrite that puts ``module`` in cannot be calibrated (``""``: it acts on each token on its own)."""
    inner = module.inner if isinstance(module, ChannelsFirst) else module
    what = next((why for kind, why in TOKEN_MIXING if isinstance(inner, kind)), "")
    return f"{what}; calibration fits token by token" if what else ""


def calibration_site(
    cand: Candidate,
    han: nn.Module,
    site: Site | None,
    removed_norm: nn.Module | None,
    residual_dropped: bool,
    removed_scales: tuple[nn.Module, ...] = (),
    removed_norm_path: str | None = None,
    kept_norm: nn.Module | None = None,
) -> tuple[CalibrationSite | None, str]:
    """The :class:`CalibrationSite` of an FFN module replaced by ``han`` (``finish``'s layout), or ``None`` and why.

    ``removed_norm`` is the parent's pre-norm when the rewrite took it off the
    FFN's input path (so the reference computes ``ffn(norm(x))``);
    ``removed_scales`` the layer scales on the branch that a dropped residual
    turned into ``Identity`` (the reference applies them after the FFN);
    ``removed_norm_path`` the qualified name of that norm; ``kept_norm`` the pre-norm
    ``drop_norm=False`` left in place (the FFN's input is then not the residual stream).
    """
    inner = han.inner if isinstance(han, ChannelsFirst) else han
    mixing = token_mixing_reason(han)
    if mixing:
        return None, mixing
    if site is not None and site.transposed and removed_norm is not None:
        return None, "the dropped norm normalises channels, but this token-mixing FFN sees tokens as features"
    chain = [m for m in (removed_norm, cand.module, *removed_scales) if m is not None]
    reference = chain[0] if len(chain) == 1 else nn.Sequential(*chain)
    channels_first = isinstance(han, ChannelsFirst)
    post = cand.sibling(site.post_norm) if site is not None and site.residual == "post" and site.post_norm else None
    # the layer holding the FFN: its output is the hidden state after it (also where no Site names the layer: Phi,
    # Falcon and GPT-NeoX could not be healed); a ModuleList / ModuleDict never runs, so it has no output to match
    holder = not isinstance(cand.parent, (nn.ModuleList, nn.ModuleDict))
    stream = cand.parent_path if cand.parent_path and holder else None
    block_target = _not_the_stream(cand, site, kept_norm, residual_dropped)
    return (
        CalibrationSite(
            input_path=cand.path,
            fitted=inner,
            reference=PixelRows(reference) if channels_first else reference,
            residual=not residual_dropped,
            post_norm=post,
            channels_first=channels_first,
            original_input_path=removed_norm_path if removed_norm is not None else None,
            stream_path=stream,
            block_target=block_target,
        ),
        "",
    )


def _not_the_stream(cand: Candidate, site: Site | None, kept_norm: nn.Module | None, residual_dropped: bool) -> str:
    """Why the FFN's input is not the residual stream its parent adds the new block's output to, unscaled (the
    ``"model"`` target's premise), or ``""``; see :attr:`CalibrationSite.block_target`."""
    if site is None:  # the fallback rule, or a layer no rule's table names: nothing says how its output is added
        return (
            f"no rule describes the layer around it ({type(cand.parent).__name__}), so whether its output is added to "
            "its input unscaled (the 'model' target's premise) is unknown"
        )
    if site.residual not in ("add", "post"):
        return f"{type(cand.parent).__name__}'s residual is not x + branch ({site.note or site.residual})"
    if kept_norm is not None:
        return kept_pre_norm(site.norm)
    if residual_dropped:  # the scales became Identity and went into the reference
        return ""

    def active(names: tuple[str, ...]) -> list[str]:  # the scale modules the parent has and applies
        return [n for n in names if not isinstance(cand.sibling(n) or nn.Identity(), nn.Identity)]

    scaled = active(site.scales) + [n for n in site.gammas if isinstance(getattr(cand.parent, n, None), torch.Tensor)]
    if scaled:
        return f"a layer scale ({', '.join(scaled)}) scales the branch"
    res_scaled = active(site.res_scales)
    return f"a scale ({', '.join(res_scaled)}) on the residual" if res_scaled else ""


def kept_pre_norm(norm: str | None) -> str:
    """:attr:`CalibrationSite.block_target` of a block whose pre-norm ``drop_norm=False`` kept."""
    return f"the pre-norm {norm} is kept, so the block's input is the normalised stream"


def _norm_path(cand: Candidate, site: Site | None) -> str | None:
    return cand.qualify(site.norm) if site is not None and site.norm else None


def finish(
    cand: Candidate, config: HanConfig, han: nn.Module, site: Site | None, not_calibrated: str = ""
) -> CalibratedReplacement:
    """The :class:`Replacement` for an FFN module whose parent is described by ``site``.

    Handles ``drop_norm`` (pre-norm -> ``Identity``) and ``residual="drop"``
    (FFN wrapped in :class:`ResidualFree`, layer scales -> ``Identity``);
    raises :class:`SkipCandidate` when the residual cannot be dropped. The
    result carries the :class:`CalibrationSite` (see :func:`calibration_site`),
    unless ``not_calibrated`` gives a reason why the block cannot be calibrated.
    """
    parent_name = type(cand.parent).__name__
    swaps: dict[str, nn.Module] = {cand.path: han}
    nb: dict[str, str] = {}
    kept_norm: nn.Module | None = None
    dropped_norm: nn.Module | None = None
    if site is None:
        nb["norm"] = f"unknown parent {parent_name}: left as is"
    elif site.norm is None:
        nb["norm"] = f"post-norm {site.post_norm} kept" if site.post_norm else "no pre-norm"
    else:
        norm = cand.sibling(site.norm)
        if norm is None or isinstance(norm, nn.Identity):
            nb["norm"] = f"{site.norm} is already Identity"
        elif config.drop_norm:
            swaps[cand.qualify(site.norm)] = nn.Identity()
            nb["norm"] = f"{site.norm} ({type(norm).__name__}) -> Identity"
            dropped_norm = norm
        else:
            kept_norm = norm
            nb["norm"] = f"{site.norm} kept"
    if config.residual == "keep":
        nb["residual"] = "kept"
        calib, why = calibration_site(cand, han, site, dropped_norm, False, (), _norm_path(cand, site), kept_norm)
        return CalibratedReplacement(
            swaps, nb, site=None if not_calibrated else calib, not_calibrated=not_calibrated or why
        )

    if site is None or site.residual not in ("add", "post"):
        why = (
            site.note
            if site is not None and site.note
            else f"han-surgery does not know how {parent_name} adds its residual"
        )
        raise SkipCandidate(f"HanConfig.residual='drop' not possible here ({why}); use HanConfig.residual='keep'")
    for g in site.gammas:
        if getattr(cand.parent, g, None) is not None:
            raise SkipCandidate(
                f"HanConfig.residual='drop' not possible: {parent_name}.{g} is a layer-scale parameter on the branch; "
                "use HanConfig.residual='keep'"
            )
    for r in site.res_scales:
        m = cand.sibling(r)
        if m is not None and not isinstance(m, nn.Identity):
            raise SkipCandidate(
                f"HanConfig.residual='drop' not possible: {parent_name}.{r} rescales the residual; "
                "use HanConfig.residual='keep'"
            )
    if site.transposed and kept_norm is not None:
        raise SkipCandidate(
            "HanConfig.residual='drop' with HanConfig.drop_norm=False is not possible on a transposed "
            "(token-mixing) FFN"
        )
    removed = []
    removed_scales = []
    for s in site.scales:
        m = cand.sibling(s)
        if m is not None and not isinstance(m, nn.Identity):
            swaps[cand.qualify(s)] = nn.Identity()
            removed.append(s)
            removed_scales.append(m)
    if kept_norm is not None:
        swaps[cand.qualify(site.norm)] = nn.Identity()
        nb["norm"] = f"{site.norm} kept, moved into ResidualFree"
    swaps[cand.path] = ResidualFree(han, norm=kept_norm)
    nb["residual"] = "dropped (ResidualFree)" + (f", layer scale {', '.join(removed)} -> Identity" if removed else "")
    if kept_norm is not None:
        calib, why = (
            None,
            "HanConfig.residual='drop' with HanConfig.drop_norm=False: the recorded input is not the one the "
            "Han-block sees",
        )
    else:
        calib, why = calibration_site(
            cand, han, site, dropped_norm, True, tuple(removed_scales), _norm_path(cand, site)
        )
    return CalibratedReplacement(
        swaps, nb, site=None if not_calibrated else calib, not_calibrated=not_calibrated or why
    )


def inline_han_swaps(
    cand: Candidate, config: HanConfig, features: int, up: str, act: str, down: str
) -> dict[str, nn.Module]:
    """Swaps for an FFN written inline in its layer (``up``, ``act``, ``down`` are attribute names):
    ``up -> HanLayer``, ``act -> Identity``, ``down -> HouseholderLinear`` (``HanLayer`` with ``final_abs``).

    With block extras (``gain``, ``input_scale``, ``side_rank``) the whole block goes into ``up``
    (``HanBlock``) and ``down`` becomes ``Identity``: the extras span both layers.
    """
    require_reflections(features, config)
    kw = config.han_kwargs()
    q = f"{cand.path}." if cand.path else ""
    if config.has_block_extras:
        return {q + up: han_block(features, config), q + act: nn.Identity(), q + down: nn.Identity()}
    return {
        q + up: HanLayer(features, **kw),
        q + act: nn.Identity(),
        q + down: (HanLayer if config.final_abs else HouseholderLinear)(features, **kw),
    }


def inline_site(
    cand: Candidate,
    swaps: dict[str, nn.Module],
    up: str,
    old_chain: tuple[str, ...],
    removed_norm: str | None = None,
    post_norm: nn.Module | None = None,
    block_target: str = "",
    flat_tokens: bool = False,
) -> CalibrationSite:
    """The :class:`CalibrationSite` of an inline FFN rewritten by :func:`inline_han_swaps`.

    ``old_chain`` names the layer's modules the old FFN applied in order (e.g.
    ``("fc1", "activation_fn", "fc2")``); ``removed_norm`` names the layer's pre-norm
    when the rewrite dropped it (the reference applies it first); ``post_norm`` the norm the layer applies
    after adding the residual (post-norm layers), whose input residual is ``up``'s input; ``block_target`` why
    ``up``'s input is not the residual stream (:attr:`CalibrationSite.block_target`); ``flat_tokens`` that it is
    ``(B * L, d)`` (:attr:`CalibrationSite.flat_tokens`).
    """
    q = f"{cand.path}." if cand.path else ""
    new = [swaps[q + name] for name in old_chain if not isinstance(swaps.get(q + name), nn.Identity)]
    old = [getattr(cand.module, name) for name in old_chain]
    if removed_norm is not None:
        old.insert(0, getattr(cand.module, removed_norm))
    return CalibrationSite(
        input_path=q + up,
        fitted=new[0] if len(new) == 1 else nn.Sequential(*new),
        reference=nn.Sequential(*old),
        post_norm=post_norm,
        original_input_path=q + removed_norm if removed_norm is not None else None,
        stream_path=cand.path or None,
        block_target=block_target,
        flat_tokens=flat_tokens,
    )


def mix_ffn_2d(features: int, kernel_size: int, config: HanConfig, drop: tuple[float, float]) -> HanMixFfn2d:
    """``H2 |DW(|H1 x + b1|)| + b2`` on feature maps: a conv-layout Mix-FFN whose two activations became ``|.|``."""
    require_reflections(features, config)
    return HanMixFfn2d(
        features,
        kernel_size=kernel_size,
        pre_conv=Abs(),
        drop=block_dropout(config, drop),
        final_abs=config.final_abs,
        **config.han_kwargs(),
    )
