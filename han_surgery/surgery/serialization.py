"""Save a hanified model and rebuild it exactly: ``save_pretrained`` / ``from_pretrained``.

A saved directory holds

* ``model.safetensors`` -- every tensor of the hanified model (never a pickle);
* ``han_config.json`` -- the :class:`~han_surgery.surgery.recipe.Recipe`: each :func:`hanify`
  call applied (its :class:`HanConfig` and the rewrites), plus which base model to build;
* ``config.json`` -- the base model's own config, written by the library that
  owns it: transformers' ``PretrainedConfig.save_pretrained`` (with
  ``architectures`` set, as ``PreTrainedModel.save_pretrained`` does) or
  timm's ``save_config_for_hf`` (the same file ``timm``'s ``save_for_hf``
  writes: architecture, ``model_args``, ``pretrained_cfg``).

``from_pretrained`` builds the base model from ``config.json`` with random
weights (no download), replays the recipe, then loads ``model.safetensors``
with ``strict=True``: the result computes bit for bit what the saved model did.

transformers' own ``model.save_pretrained`` would write the same two files
minus the recipe, and its ``from_pretrained`` would then build the *original*
architecture and drop the Han weights as unexpected keys; timm's
``save_for_hf`` / ``create_model("hf-hub:...")`` likewise. Use these two
functions for hanified models (the ``config.json`` they write stays readable
by ``AutoConfig`` and timm).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import CheckpointError, UnsafeCheckpointError
from ..folders import CONFIG_NAME, HAN_CONFIG_NAME, WEIGHTS_NAME, ModelFolder, inspect_model_folder
from .engine import hanify
from .recipe import BaseModelSpec, Recipe, recipe_of

__all__ = ["save_pretrained", "from_pretrained", "WEIGHTS_NAME", "HAN_CONFIG_NAME", "UnsafeCheckpointError"]


def _dtype_name(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    *,
    model_args: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
) -> Path:
    """Write a hanified model to ``directory`` (``model.safetensors``, ``han_config.json``, ``config.json``).

    Args:
        model: a model :func:`hanify` has rewritten (timm, transformers, or any
            ``nn.Module``; the latter needs ``from_pretrained(..., model=...)``).
        directory: created if missing; existing files of the same name are overwritten.
        model_args: timm only -- constructor kwargs to record, for the rare
            arguments timm's factory does not record itself (as in ``save_for_hf``).
        data_config: timm only -- the preprocessing the model now expects
            (``input_size``, ``mean``, ``std``, ...), written into ``pretrained_cfg``
            as ``save_for_hf(data_config=...)`` does.

    Returns:
        The directory, as a ``Path``.
    """
    steps = recipe_of(model)
    if not steps:
        raise ValueError(
            f"save_pretrained: {type(model).__name__} has not been hanified (no recipe found); "
            "call han_surgery.hanify(model) first, or use the library's own save_pretrained / save_for_hf"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = BaseModelSpec.of(model)
    if base.library == "transformers":
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(directory)
    elif base.library == "timm":
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, str(directory / CONFIG_NAME), model_args=model_args, data_config=data_config)
    safetensors.torch.save_model(model, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    Recipe(base=base, steps=tuple(steps), dtype=_dtype_name(model)).write(directory)
    return directory


def _build_base(folder: ModelFolder, base: BaseModelSpec) -> nn.Module:
    if base.library == "transformers":
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(str(folder.path), trust_remote_code=False)
        except (OSError, ValueError) as e:  # no config.json, or one that needs code from the folder (never run)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{folder.path / CONFIG_NAME}: transformers cannot read it: {first}") from None
        cls = getattr(transformers, base.name, None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise CheckpointError(f"{folder.path / HAN_CONFIG_NAME}: transformers has no model class {base.name!r}")
        return cls(config)
    if base.library == "timm":
        import timm
        from timm.models._hub import load_model_config_from_path

        if not (folder.path / CONFIG_NAME).is_file():
            raise CheckpointError(f"{folder.path / CONFIG_NAME}: missing (the timm base model's config)")
        pretrained_cfg, name, model_args = load_model_config_from_path(folder.path)
        return timm.create_model(name, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    raise CheckpointError(
        f"{folder.path} was saved from a {base.name} (neither timm nor transformers): "
        "build the base model yourself and pass it: from_pretrained(directory, model=MyModel(...))"
    )


def _resolve_directory(source: str | Path, revision: str | None) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"from_pretrained: {source} is not a directory (nor a Hub repo id 'owner/name')")
    from huggingface_hub import snapshot_download

    # JSON and safetensors only: a pickle is never even downloaded.
    return Path(snapshot_download(text, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.md"]))


def from_pretrained(directory: str | Path, *, model: nn.Module | None = None, revision: str | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained`: base model, recipe replayed, weights loaded.

    Args:
        directory: the saved directory, or a Hub repo id (``"owner/name"``)
            holding one; from the Hub only ``*.json``, ``*.safetensors`` and
            ``*.md`` files are downloaded (``huggingface_hub.snapshot_download``).
            Never a pickle.
        revision: Hub revision (branch, tag or commit) for a repo id.
        model: the freshly built base model, required when the base is neither
            timm nor transformers (optional otherwise). If its constructor
            already applied the first recipe steps (a model class that calls
            ``hanify`` in ``__init__``), those steps are not replayed again.

    Returns:
        The hanified model in ``eval()`` mode, on CPU, in the saved dtype.

    Raises:
        UnsafeCheckpointError: the directory only holds ``.bin``/``.pt`` files.
        CheckpointError: not a han-surgery directory, an unreadable file, or a recipe
            that does not replay (rules renamed, a custom rule not registered, another base model).
    """
    directory = _resolve_directory(directory, revision)
    folder = inspect_model_folder(directory)
    if folder.kind != "hanified":
        raise CheckpointError(
            f"{directory} has no {HAN_CONFIG_NAME}: it was not written by han_surgery.save_pretrained "
            f"(it is a plain {folder.kind} folder: load it with its library, then call hanify)"
        )
    han_file = directory / HAN_CONFIG_NAME
    recipe = Recipe.read(directory)
    if not (directory / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{directory / WEIGHTS_NAME}: missing")
    if model is None:
        model = _build_base(folder, recipe.base)
    model.to(dtype=getattr(torch, recipe.dtype))
    # A base whose constructor already hanifies (e.g. timm-registered Han models) carries the first steps.
    done = [s.to_dict() for s in recipe_of(model)]
    if [s.to_dict() for s in recipe.steps[: len(done)]] != done:
        raise CheckpointError(
            f"{han_file}: the rebuilt base model {type(model).__name__} already carries a hanify recipe "
            "that is not a prefix of the saved one; pass the plain base model with model=..."
        )
    for i, step in enumerate(recipe.steps[len(done) :], start=len(done)):
        wanted = [(r.path, r.rule) for r in step.rewrites]
        paths = {p for p, _ in wanted}
        report = hanify(model, step.config, filter_fn=lambda _m, p, paths=paths: p in paths)
        got = [(r.path, r.rule) for r in report.rewrites]
        if got != wanted:
            missing = sorted(set(wanted) - set(got))
            raise CheckpointError(
                f"{han_file}: step {i} of the recipe does not replay on the rebuilt model; "
                f"not reproduced: {missing[:5]}. (Is a custom rule not registered, or a different base model?)"
            )
    try:
        safetensors.torch.load_model(model, str(directory / WEIGHTS_NAME), strict=True)
    except SafetensorError as e:
        raise CheckpointError(f"{directory / WEIGHTS_NAME}: not a readable safetensors file ({e})") from None
    except RuntimeError as e:  # missing / unexpected keys, shape mismatches
        raise CheckpointError(f"{directory / WEIGHTS_NAME}: does not fit the rebuilt model ({e})") from None
    return model.eval()
