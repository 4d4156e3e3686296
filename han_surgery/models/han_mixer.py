"""Han-Mixer: timm's ``MlpMixer`` with Han-Mixer blocks (Yu & Zhang, Section 5.3).

A Han-Mixer is ``stem -> k MixerBlocks -> m HanMixerBlocks -> LayerNorm -> mean pool -> Linear``.
A :class:`HanMixerBlock` mixes tokens and then channels, each with
``|H2 |H1 x + b1| + b2|`` (:class:`~han_surgery.layers.HanBlock` with ``final_abs=True``),
with no LayerNorm and no skip connection; ``4 (N + C)`` parameters for ``N`` tokens of
``C`` channels, against ``2 N N_h + 2 C C_h + ...`` for an MLP-Mixer block.

:class:`HanMixer` subclasses :class:`timm.models.MlpMixer`: the MLP blocks, final norm,
pooling, head, ``reset_classifier``, ``forward_features``/``forward_head``,
``forward_intermediates`` (hence ``features_only=True``), ``set_grad_checkpointing`` and the
weight init are timm's. It only appends Han-Mixer blocks and, for the paper's 32x32 models,
swaps the patch embedding for the paper's CNN stem (:class:`ConvStem`).

Registered models (``timm.create_model(name)`` after ``import han_surgery``):

=========================  ===========  ====  =============================================
name                        stem        k, m  paper row (Section 5.3, CIFAR, 32x32 input)
=========================  ===========  ====  =============================================
``han_mixer_m0h0_32``       CNN         0, 0  CNN stem only
``han_mixer_m2h0_32``       CNN         2, 0  MLP(2)
``han_mixer_m4h0_32``       CNN         4, 0  MLP(4)
``han_mixer_m0h16_32``      CNN         0, 16 MLP(0) + Han(16)
``han_mixer_m1h16_32``      CNN         1, 16 MLP(1) + Han(16)
``han_mixer_m2h16_32``      CNN         2, 16 MLP(2) + Han(16)
``han_mixer_m4h16_32``      CNN         4, 16 MLP(4) + Han(16)
``han_mixer_s16_224``       patch 16    2, 16 Mixer-S/16 width (512), MLP(2) + Han(16)
``han_mixer_b16_224``       patch 16    2, 16 Mixer-B/16 width (768), MLP(2) + Han(16)
=========================  ===========  ====  =============================================

The 32x32 models follow the paper authors' released code: embedding width 512, 4x4 "patches"
(64 tokens), MLP blocks with token MLP 64 -> 64 -> 64 and channel MLP 512 -> 512 -> 512
(``mlp_ratio=(0.125, 1.0)``), GELU, 10 classes (CIFAR-10) by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import ConvNormAct, get_padding
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import named_apply
from timm.models.mlp_mixer import MlpMixer, _init_weights
from torch import Tensor, nn

from ..checks import check_int
from ..layers import HanBlock
from ._checkpoint import checkpoint_filter_fn

__all__ = ["ConvStem", "HanMixerBlock", "HanMixer"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _check_strides(what: str, strides: Sequence[int]) -> None:
    """A ``ValueError`` naming ``what`` unless ``strides`` is one or more integers ``>= 1``."""
    if not strides or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in strides):
        raise ValueError(f"{what} must be one or more positive integers, got {strides!r}")


def conv_stem_grid(img_size: tuple[int, int], strides: Sequence[int]) -> tuple[int, int]:
    """The token grid ``(h, w)`` of :class:`ConvStem` for an ``img_size = (H, W)`` input: per 3x3 conv of stride
    ``s``, padded as timm pads it (``(s + 1) // 2``), ``out = (in + 2 pad - 3) // s + 1``: ``ceil(in / s)`` for
    strides 1 and 2; a stride of 4 maps 32 to 9, not 8."""
    h, w = img_size
    for s in strides:
        pad = get_padding(3, s)
        h, w = (h + 2 * pad - 3) // s + 1, (w + 2 * pad - 3) // s + 1
    return h, w


class ConvStem(nn.Module):
    """The paper's 5-layer CNN stem for small images, returning tokens.

    ``len(strides)`` 3x3 ``Conv-BN-ReLU`` layers with ``C/2^(L-1), ..., C/2, C`` channels
    (``64, 128, 256, 512`` for ``C = 512``), then a 1x1 ``Conv`` to ``C`` (no norm, no act).
    ``strides=(1, 2, 1, 2)`` is the paper's CIFAR stem (32x32 -> 8x8 = 64 tokens);
    ``(1, 2, 2, 2)`` its STL-10 stem (96x96 -> 12x12 = 144 tokens).

    Shapes:
        ``(B, in_chans, H, W) -> (B, ceil(H / r) * ceil(W / r), embed_dim)``, ``r = prod(strides)``, for strides of 1
        and 2 (a stride ``s >= 3`` pads by ``(s + 1) // 2``, as timm pads a 3x3 conv: see ``dynamic_feat_size``).

    It exposes ``num_patches``, ``grid_size``, ``feat_ratio()`` and ``dynamic_feat_size()``
    like :class:`timm.layers.PatchEmbed`, so :class:`timm.models.MlpMixer` can use it.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        in_chans: int = 3,
        embed_dim: int = 512,
        strides: Sequence[int] = (1, 2, 1, 2),
        conv_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _check_strides("ConvStem: strides", strides)
        if embed_dim % 2 ** (len(strides) - 1):
            raise ValueError(f"ConvStem: embed_dim={embed_dim} must be divisible by 2**(len(strides)-1)")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.strides = tuple(strides)
        self.reduction = math.prod(self.strides)
        self.grid_size = self.dynamic_feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        chs, width = in_chans, embed_dim // 2 ** (len(strides) - 1)
        for stride in self.strides:
            # The authors' convs keep their bias in front of BatchNorm; kept for identical counts.
            layers.append(ConvNormAct(chs, width, kernel_size=3, stride=stride, bias=conv_bias, **dd))
            chs, width = width, width * 2
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(chs, embed_dim, kernel_size=1, **dd)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return self.reduction if as_scalar else (self.reduction, self.reduction)

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return conv_stem_grid(img_size, self.strides)

    def forward(self, x: Tensor) -> Tensor:
        # as timm's PatchEmbed: the token count is fixed, and a ceil-division stem maps 29-32 px to the same grid
        torch._assert(
            x.shape[-2] == self.img_size[0], f"Input height ({x.shape[-2]}) doesn't match model ({self.img_size[0]})."
        )
        torch._assert(
            x.shape[-1] == self.img_size[1], f"Input width ({x.shape[-1]}) doesn't match model ({self.img_size[1]})."
        )
        x = self.proj(self.convs(x))
        return x.flatten(2).transpose(1, 2)


class HanMixerBlock(nn.Module):
    """The paper's Han-Mixer block: token mixing then channel mixing, each ``|H2 |H1 x + b1| + b2|``.

    ``x <- HanBlock_N(x^T)^T`` (mixes the ``N`` tokens of every channel), then
    ``x <- HanBlock_C(x)`` (mixes the ``C`` channels of every token). No LayerNorm, no
    residual: both maps are 1-Lipschitz with orthogonal Jacobians almost everywhere.
    The token block acts on ``dim=-2`` directly, so ``x`` is never transposed or copied.

    Takes :class:`timm.models.mlp_mixer.MixerBlock`'s arguments so it can be a
    ``block_layer``; ``mlp_ratio``, ``mlp_layer``, ``norm_layer``, ``act_layer`` and
    ``drop_path`` do not apply and are ignored. ``drop`` is the dropout after each
    Householder layer.

    Shapes: ``(B, N, C) -> (B, N, C)`` with ``N = seq_len``, ``C = dim``.
    Parameters: ``4 (N + C)`` with ``reflections=1``.
    """

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: Any = None,
        mlp_layer: Any = None,
        norm_layer: Any = None,
        act_layer: Any = None,
        drop: float = 0.0,
        drop_path: float = 0.0,
        reflections: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = dict(reflections=reflections, final_abs=True, drop=drop, device=device, dtype=dtype)
        self.mlp_tokens = HanBlock(seq_len, dim=-2, **kw)
        self.mlp_channels = HanBlock(dim, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp_channels(self.mlp_tokens(x))


class HanMixer(MlpMixer):
    """timm's :class:`~timm.models.MlpMixer` with ``mlp_depth`` MLP blocks then ``han_depth`` Han-Mixer blocks.

    Args:
        mlp_depth: ``k``, timm ``MixerBlock`` s (pre-norm, residual) right after the stem.
        han_depth: ``m``, :class:`HanMixerBlock` s after them.
        stem_type: ``"patch"`` (timm's ``PatchEmbed``, ``patch_size``) or ``"cnn"``
            (the paper's :class:`ConvStem`; its total stride replaces ``patch_size``).
        stem_strides: the strides of the CNN stem's 3x3 convs.
        han_reflections: Householder reflections per Han layer (1 = paper).
        **kwargs: the rest of ``MlpMixer``'s arguments (``num_classes``, ``img_size``,
            ``in_chans``, ``embed_dim``, ``mlp_ratio``, ``global_pool``, ``drop_rate``, ...).

    Shapes: ``(B, in_chans, H, W) -> (B, num_classes)``; ``forward_features`` gives
    ``(B, N, embed_dim)`` (tokens after the final LayerNorm).

    Raises:
        ConfigError: ``mlp_depth`` or ``han_depth`` is not an int ``>= 0``.
    """

    def __init__(
        self,
        mlp_depth: int = 2,
        han_depth: int = 16,
        stem_type: str = "patch",
        stem_strides: Sequence[int] = (1, 2, 1, 2),
        han_reflections: int = 1,
        img_size: int = 224,
        in_chans: int = 3,
        patch_size: int = 16,
        embed_dim: int = 512,
        proj_drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        _check_depths(mlp_depth, han_depth)
        if stem_type not in ("patch", "cnn"):
            raise ValueError(f"HanMixer: stem_type must be 'patch' or 'cnn', got {stem_type!r}")
        if stem_type == "cnn":
            _check_strides("HanMixer: stem_strides", stem_strides)
            patch_size = math.prod(stem_strides)
        sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if any(s % patch_size for s in sizes):
            raise ValueError(f"HanMixer: img_size {img_size} must be a multiple of the stem's stride {patch_size}")
        grid = tuple(s // patch_size for s in sizes)
        if stem_type == "cnn" and conv_stem_grid(sizes, stem_strides) != grid:  # the Mixer blocks are built for `grid`
            raise ValueError(
                f"HanMixer: stem_strides {tuple(stem_strides)} give a {conv_stem_grid(sizes, stem_strides)} token grid "
                f"at img_size {img_size}, not the {grid} of img_size / {patch_size} the Mixer blocks are sized for "
                "(a 3x3 conv of stride 3 or more pads by 2); use strides of 1 and 2, as the paper's stems do"
            )
        dd = {"device": device, "dtype": dtype}
        super().__init__(
            img_size=img_size,
            in_chans=in_chans,
            patch_size=patch_size,
            num_blocks=mlp_depth,
            embed_dim=embed_dim,
            proj_drop_rate=proj_drop_rate,
            **dd,
            **kwargs,
        )
        self.mlp_depth, self.han_depth, self.stem_type = mlp_depth, han_depth, stem_type
        if stem_type == "cnn":
            self.stem = ConvStem(img_size, in_chans, embed_dim, stem_strides, **dd)
            named_apply(_init_weights, self.stem)  # timm's Mixer init (lecun normal convs)
        self.blocks.extend(
            HanMixerBlock(embed_dim, self.stem.num_patches, drop=proj_drop_rate, reflections=han_reflections, **dd)
            for _ in range(han_depth)
        )
        reduction = self.stem.feat_ratio()
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(len(self.blocks))
        ]


def _check_depths(mlp_depth: int, han_depth: int) -> None:
    """Block counts are whole numbers ``>= 0`` (:class:`~han_surgery.errors.ConfigError` naming the argument)."""
    check_int("HanMixer mlp_depth", mlp_depth, 0)
    check_int("HanMixer han_depth", han_depth, 0)


def _create_han_mixer(variant: str, pretrained: bool = False, **kwargs: Any) -> HanMixer:
    mlp_depth, han_depth = kwargs.get("mlp_depth", 2), kwargs.get("han_depth", 16)
    _check_depths(mlp_depth, han_depth)  # before the block count below is taken from them
    depth = mlp_depth + han_depth
    if depth == 0 and kwargs.get("features_only"):
        raise ValueError(
            f"{variant}: features_only needs at least one Mixer or Han-Mixer block and this model has none; "
            "use model.forward_features(x) for the stem's tokens"
        )
    out_indices = kwargs.pop("out_indices", min(3, depth))
    return build_model_with_cfg(
        HanMixer,
        variant,
        pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, strict=kwargs.get("pretrained_strict", True)),
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_INCEPTION_MEAN,
        "std": IMAGENET_INCEPTION_STD,
        "first_conv": "stem.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "doi:10.1016/j.neunet.2024.106269",
        **kwargs,
    }


def _cfg32(**kwargs: Any) -> dict[str, Any]:
    return _cfg(
        num_classes=10,
        input_size=(3, 32, 32),
        crop_pct=1.0,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        first_conv="stem.convs.0.conv",
        **kwargs,
    )


# No weights are published yet: every tag is ``untrained`` (timm's convention).
default_cfgs = generate_default_cfgs(
    {
        "han_mixer_m0h0_32.untrained": _cfg32(),
        "han_mixer_m2h0_32.untrained": _cfg32(),
        "han_mixer_m4h0_32.untrained": _cfg32(),
        "han_mixer_m0h16_32.untrained": _cfg32(),
        "han_mixer_m1h16_32.untrained": _cfg32(),
        "han_mixer_m2h16_32.untrained": _cfg32(),
        "han_mixer_m4h16_32.untrained": _cfg32(),
        "han_mixer_s16_224.untrained": _cfg(),
        "han_mixer_b16_224.untrained": _cfg(),
    }
)

# The paper's CIFAR models (authors' code: hidden 512, token MLP dim 64, channel MLP dim 512).
_CIFAR_ARGS = dict(stem_type="cnn", stem_strides=(1, 2, 1, 2), img_size=32, embed_dim=512, mlp_ratio=(0.125, 1.0))


def _cifar(variant: str, k: int, m: int, pretrained: bool, **kwargs: Any) -> HanMixer:
    args = dict(_CIFAR_ARGS, mlp_depth=k, han_depth=m)
    return _create_han_mixer(variant, pretrained=pretrained, **dict(args, **kwargs))


@register_model
def han_mixer_m0h0_32(pretrained: bool = False, **kwargs: Any) -> HanMixer:
    """The paper's "CNN stem" baseline: CNN stem -> LayerNorm -> mean pool -> Linear."""
    return _cifar("han_mixer_m0h0_32", 0, 0, pretrained, **kwargs)


@register_model
def han_mixer_m2h0_32(pretrained: bool = False, **kwargs: Any) -> HanMixer:
    """The paper's MLP(2): CNN stem + 2 MLP-Mixer blocks."""
    return _cifar("han_mixer_m2h0_32", 2, 0, pretrained, **kwargs)


@register_model
def han_mixer_m4h0_32(pretrained: bool = False, **kwargs: Any) -> HanMixer:
    """The paper's MLP(4): CNN stem + 4 MLP-Mixer blocks."""
    return _cifar("han_mixer_m4h0_32", 4, 0, pretrained, **kwargs)


@register_model
def han_mixer_m0h16_32(pretrained: bool = False, **kwargs: Any) -> HanMixer:
    """The paper's MLP(0)+Han(16): CNN stem + 16 Han-Mixer blocks."""
    return _cifar("han_mixer_m0h16_32", 0, 16, pretrained, **kwargs)


@register_model
def han_mixer_m1h16_32(pretrained: bool = False, **kwargs: Any) -> HanMixer:
    """The paper's MLP(1)+Han(16)."""
    return _cifar("han_mixer_m1h16_32", 1, 16, pretrained, **kwargs)


@register_model
def han_mixer_m2h16_32(pretrained: bool = False, **kwargs: Any) -> HanMixer:
    """The paper's MLP(2)+Han(16)."""
    return _cifar("han_mixer_m2h16_32", 2, 16, pretrained, **kwargs)


@register_model
def han_mixer_m4h16_32(pretrained: bool = False, **kwargs: Any) -> HanMixer:
    """The paper's MLP(4)+Han(16)."""
    return _cifar("han_mixer_m4h16_32", 4, 16, pretrained, **kwargs)


@register_model
def han_mixer_s16_224(pretrained: bool = False, **kwargs: Any) -> HanMixer:
    """Mixer-S/16 width (512, patch 16, 196 tokens): 2 MLP-Mixer blocks + 16 Han-Mixer blocks."""
    args = dict(patch_size=16, embed_dim=512, mlp_depth=2, han_depth=16)
    return _create_han_mixer("han_mixer_s16_224", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def han_mixer_b16_224(pretrained: bool = False, **kwargs: Any) -> HanMixer:
    """Mixer-B/16 width (768, patch 16, 196 tokens): 2 MLP-Mixer blocks + 16 Han-Mixer blocks."""
    args = dict(patch_size=16, embed_dim=768, mlp_depth=2, han_depth=16)
    return _create_han_mixer("han_mixer_b16_224", pretrained=pretrained, **dict(args, **kwargs))
