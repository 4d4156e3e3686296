"""The timm entry point of hanified models: ``timm.create_model("local-dir:<dir>" | "hf-hub:<repo>", pretrained=True)``.

:func:`han_surgery.save_pretrained` writes the ``config.json`` of a hanified timm model as timm's
``save_for_hf`` does, except that ``architecture`` is ``"hanified"`` and ``model_args`` carry the
base architecture and the recipe::

    {"architecture": "hanified", "num_classes": 10, "pretrained_cfg": {...the base model's...},
     "model_args": {"han_base": "vit_small_patch16_224", "han_recipe": {...han_config.json...}, "img_size": 224, ...}}

timm reads that file itself (``local-dir:`` from a folder, ``hf-hub:`` from the Hub or its cache),
then calls the entry point registered here, :func:`hanified`, with ``model_args`` as keyword
arguments. It builds the base model with random weights (``pretrained=False``, the other
``model_args`` checked by :func:`~han_surgery.folders.checked_timm_model_args`), replays the
recipe, and loads ``model.safetensors`` (safetensors only, never a pickle: a folder that holds only
``pytorch_model.bin``, as timm's ``save_for_hf`` writes without ``safe_serialization=True``, is refused
with what to do) through timm's ``load_pretrained`` (so ``num_classes=...`` re-initialises the classifier
the timm way). The model is built in the recipe's dtype; a tensor the file holds in a dtype that one does
not hold exactly keeps the file's (the float32 head of a bfloat16 model). The result
computes bit for bit what the saved model did; its ``pretrained_cfg["architecture"]`` stays
``"hanified"``, so timm's own ``save_for_hf`` / ``push_to_hf_hub`` write a folder that loads again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from timm.models import load_pretrained, register_model
from torch import nn

from ..errors import CheckpointError, ConfigError, UnsafeCheckpointError
from ..folders import (
    TIMM_BASE_ARG,
    TIMM_HANIFIED_ARCH,
    TIMM_RECIPE_ARG,
    WEIGHTS_NAME,
    checked_timm_model_args,
    refuse_pickles,
)
from ..surgery.engine import register_hanify_hook
from ..surgery.recipe import Recipe, record_last_step_on_parts
from ..surgery.serialization import config_build_errors, recipe_for, replay_remaining_steps, to_file_dtypes
from ._checkpoint import checkpoint_filter_fn

__all__ = ["hanified"]

_SOURCE_KEYS = ("file", "url", "hf_hub_id", "hf_hub_filename", "source", "state_dict")


def _describe(pretrained_cfg: dict[str, Any]) -> str:
    """Where the model came from, for error messages: the folder's config.json or the Hub repo."""
    if pretrained_cfg.get("source") == "hf-hub":
        return f"hf-hub:{pretrained_cfg.get('hf_hub_id')} config.json"
    if pretrained_cfg.get("file"):
        path = Path(pretrained_cfg["file"])
        return str(path / "config.json" if path.is_dir() else path)
    return f"timm.create_model({TIMM_HANIFIED_ARCH!r}) arguments"


def _load_safetensors(pretrained_cfg: dict[str, Any], cache_dir: str | Path | None) -> tuple[dict, str]:
    """The checkpoint's tensors and the file they came from: ``model.safetensors`` of the folder
    (``local-dir:``) or of the Hub repo (``hf-hub:``), or a ``.safetensors`` file named by
    ``pretrained_cfg_overlay=dict(file=...)``. Anything else is refused: no pickle is read."""
    import safetensors.torch

    source, file = pretrained_cfg.get("source"), pretrained_cfg.get("file")
    if source == "hf-hub":
        from huggingface_hub import hf_hub_download
        from timm.models._hub import hf_split

        repo_id, revision = hf_split(pretrained_cfg["hf_hub_id"])
        path = Path(hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir))
        name = f"hf-hub:{pretrained_cfg['hf_hub_id']}/{WEIGHTS_NAME}"
    elif file:
        if Path(file).is_dir():  # timm's save_for_hf writes pytorch_model.bin unless safe_serialization=True
            refuse_pickles(Path(file))
        path = Path(file) / WEIGHTS_NAME if Path(file).is_dir() else Path(file)
        name = str(path)
        if path.suffix != ".safetensors":
            raise UnsafeCheckpointError(f"{path}: han-surgery loads safetensors files only, never a pickle")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
    else:
        raise CheckpointError(
            f"timm.create_model({TIMM_HANIFIED_ARCH!r}, pretrained=True) needs a checkpoint: load a folder with "
            "'local-dir:<dir>', a Hub repo with 'hf-hub:<owner>/<name>', or pass pretrained_cfg_overlay=dict(file=...)"
        )
    try:
        return safetensors.torch.load_file(str(path), device="cpu"), name
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{name}: not a readable safetensors file ({e})") from None


@register_model
def hanified(
    pretrained: bool = False,
    *,
    han_base: str | None = None,
    han_recipe: dict[str, Any] | None = None,
    pretrained_cfg: dict[str, Any] | None = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    pretrained_model_args: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A hanified timm model: the base architecture ``han_base`` rewritten by the recipe ``han_recipe``.

    Not meant to be called by name: timm calls it with the ``model_args`` of a ``config.json``
    written by :func:`han_surgery.save_pretrained` (see the module docstring).

    Args:
        pretrained: load ``model.safetensors`` from where ``pretrained_cfg`` points (timm sets it
            for ``local-dir:`` and ``hf-hub:``).
        han_base: the timm architecture the recipe starts from.
        han_recipe: the content of ``han_config.json`` (:class:`~han_surgery.surgery.recipe.Recipe`).
        pretrained_cfg, pretrained_cfg_overlay, cache_dir, pretrained_model_args: timm's.
        **kwargs: the base model's constructor arguments (``num_classes``, ``img_size``, ...).

    Raises:
        ConfigError: called without ``han_base`` / ``han_recipe``.
        CheckpointError: the recipe or the checkpoint is malformed, or does not fit the model.
    """
    cfg = dict(pretrained_cfg or {})
    cfg.update(pretrained_cfg_overlay or {})
    source = _describe(cfg)
    if han_base is None or han_recipe is None:
        raise ConfigError(
            f"timm model {TIMM_HANIFIED_ARCH!r} is what han_surgery.save_pretrained writes for a hanified timm model; "
            "load such a folder with timm.create_model('local-dir:<dir>' or 'hf-hub:<repo>', pretrained=True)"
        )
    recipe = Recipe.from_dict(han_recipe, source)
    if recipe.base.library != "timm" or recipe.base.name != han_base:
        raise CheckpointError(
            f"{source}: model_args[{TIMM_RECIPE_ARG!r}] starts from {recipe.base.name!r} "
            f"({recipe.base.library}), not from model_args[{TIMM_BASE_ARG!r}] = {han_base!r}"
        )
    if not isinstance(han_base, str) or not timm.is_model(han_base) or han_base == TIMM_HANIFIED_ARCH:
        raise CheckpointError(f"{source}: model_args[{TIMM_BASE_ARG!r}] = {han_base!r} is not a timm architecture")
    if pretrained_model_args is not None:  # the folder's own model_args (timm merged the caller's over them)
        checked_timm_model_args(pretrained_model_args, source, keep=(TIMM_BASE_ARG, TIMM_RECIPE_ARG))
    if kwargs.pop("features_only", False):  # the caller's argument, not the folder's: timm merges them
        raise ConfigError(
            f"{source}: timm.create_model(..., features_only=True) is not supported for a hanified model; load it "
            "without features_only and take features with model.forward_intermediates(x, indices=...)"
        )
    # where to put the model and how strictly to load it: the caller's, as timm's builder takes them
    device, dtype = kwargs.pop("device", None), _torch_dtype(kwargs.pop("dtype", None), source)
    strict = kwargs.pop("pretrained_strict", True)
    base_args = checked_timm_model_args(kwargs, source)
    base_cfg = {k: v for k, v in cfg.items() if k not in _SOURCE_KEYS and k != "architecture"}
    with config_build_errors(source, repr(han_base)):  # a value the constructor refuses, whatever it raises
        model = timm.create_model(han_base, pretrained=False, pretrained_cfg=base_cfg or None, **base_args)
    replay_remaining_steps(model, recipe.steps, source)
    built = getattr(torch, recipe.dtype)
    model.to(dtype=built)
    if pretrained:
        state_dict, name = _load_safetensors(cfg, cache_dir)
        # no tensor is rounded: one the file holds in a dtype the model's does not hold exactly keeps the file's (the
        # float32 head of a bfloat16 model, as from_pretrained loads it); a save_for_hf folder's float32 stays
        to_file_dtypes(model, {k: v for k, v in state_dict.items() if torch.promote_types(v.dtype, built) != built})

        def fits(state: dict, model: nn.Module) -> dict:
            try:
                return checkpoint_filter_fn(state, model, strict=strict)
            except ValueError as e:
                problem = e
            adapt = _base_filter_fn(han_base)  # e.g. a ViT's: pos_embed resampled for another img_size
            if adapt is not None:
                with contextlib.suppress(Exception):  # not adaptable: the first problem is the one to report
                    return checkpoint_filter_fn(adapt(state, model), model, strict=strict)
            raise CheckpointError(f"{name}: {problem}") from None

        load_cfg = {**model.pretrained_cfg, "state_dict": state_dict, "source": None}
        for key in ("file", "url", "hf_hub_id", "hf_hub_filename"):
            load_cfg.pop(key, None)
        try:
            load_pretrained(
                model,
                pretrained_cfg=load_cfg,
                num_classes=getattr(model, "num_classes", 1000),
                in_chans=base_args.get("in_chans", 3),
                filter_fn=fits,
                strict=strict,
            )
        except RuntimeError as e:  # load_state_dict: missing / unexpected keys, shapes
            raise CheckpointError(f"{name}: does not fit the rebuilt model ({e})") from None
    model.pretrained_cfg = {**model.pretrained_cfg, **{k: cfg[k] for k in ("source", "file", "hf_hub_id") if k in cfg}}
    _mark_hanified(model, han_base, han_recipe)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _torch_dtype(value: Any, source: str) -> torch.dtype | None:
    """``timm.create_model(..., dtype=...)``: a ``torch.dtype``, or its name (``"bfloat16"``, ``"torch.bfloat16"``)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{source}: dtype={value!r} is not a torch dtype (e.g. torch.bfloat16)")
    return dtype


def _base_filter_fn(arch: str) -> Callable[[dict, nn.Module], dict] | None:
    """The ``checkpoint_filter_fn`` of the timm module that defines ``arch``, which timm's builder gives its
    loader: it adapts a checkpoint to the model's arguments (a ViT's ``pos_embed`` to another ``img_size``)."""
    module = sys.modules.get(getattr(timm.models.model_entrypoint(arch), "__module__", ""), None)
    adapt = getattr(module, "checkpoint_filter_fn", None)
    return adapt if callable(adapt) else None


def _mark_hanified(model: nn.Module, base: str, recipe: dict[str, Any]) -> None:
    """Name the ``"hanified"`` entry point in ``model.pretrained_cfg`` and the base and recipe in its
    ``model_args``: timm's ``save_for_hf`` / ``push_to_hf_hub`` then write a folder that loads back hanified."""
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": TIMM_HANIFIED_ARCH}
    model.default_cfg = model.pretrained_cfg
    model._model_args = {**getattr(model, "_model_args", {}), TIMM_BASE_ARG: base, TIMM_RECIPE_ARG: recipe}


def _is_timm_model(module: nn.Module) -> bool:
    """Built by timm's factory: it has a ``pretrained_cfg`` naming its architecture."""
    cfg = getattr(module, "pretrained_cfg", None)
    return isinstance(cfg, dict) and bool(cfg.get("architecture"))


@register_hanify_hook
def _mark_hanified_timm_model(model: nn.Module) -> None:
    """After ``hanify``: a timm model is marked as :func:`_mark_hanified` says, with its recipe so far.

    So is each outermost timm model *inside* ``model`` that the step rewrote (a backbone in a user's module),
    with the step recorded on it too, relative to it (:meth:`~han_surgery.surgery.recipe.RecipeStep.under`),
    for ``save_for_hf(model.backbone)``."""
    for part in [model] if _is_timm_model(model) else record_last_step_on_parts(model, _is_timm_model):
        # float32, not the dtype now: the model may be cast before save_for_hf, which loads it as timm loads any
        # save_for_hf folder, in float32 (lossless for float16 / bfloat16 weights: hanified() keeps a tensor in the
        # file's dtype only where float32 would round it)
        recipe = dataclasses.replace(recipe_for(part), dtype="float32")
        _mark_hanified(part, recipe.base.name, recipe.to_dict())
