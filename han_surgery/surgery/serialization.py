"""Save a hanified model and rebuild it exactly: ``save_pretrained`` / ``from_pretrained``.

A saved directory holds

* ``model.safetensors`` -- every tensor of the hanified model (never a pickle);
* ``han_config.json`` -- the recipe: each :func:`hanify` call applied, as its
  :class:`HanConfig` and the list of rewrites (path, rule, modules swapped,
  what happened to the norm and the residual), plus which base model to build;
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
import json
import sys
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .config import HanConfig
from .engine import RECIPE_ATTR, hanify

__all__ = ["save_pretrained", "from_pretrained", "WEIGHTS_NAME", "HAN_CONFIG_NAME", "UnsafeCheckpointError"]

WEIGHTS_NAME = "model.safetensors"
HAN_CONFIG_NAME = "han_config.json"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class UnsafeCheckpointError(ValueError):
    """The directory only holds pickle-based weights, which han-surgery never loads."""


def _is_transformers_model(model: nn.Module) -> bool:
    # Only a model built by an already-imported transformers can be one: don't pay its import for timm models.
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _is_timm_model(model: nn.Module) -> bool:
    cfg = getattr(model, "pretrained_cfg", None)
    return isinstance(cfg, dict) and bool(cfg.get("architecture"))


def _dtype_name(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def save_pretrained(
    model: nn.Module, directory: str | Path, *, model_args: dict | None = None, data_config: dict | None = None
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
    recipe = getattr(model, RECIPE_ATTR, None)
    if not recipe:
        raise ValueError(
            f"save_pretrained: {type(model).__name__} has not been hanified (no recipe found); "
            "call han_surgery.hanify(model) first, or use the library's own save_pretrained / save_for_hf"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if _is_transformers_model(model):
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(directory)
        base = {"library": "transformers", "class": type(model).__name__}
    elif _is_timm_model(model):
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, str(directory / CONFIG_NAME), model_args=model_args, data_config=data_config)
        base = {"library": "timm", "architecture": model.pretrained_cfg["architecture"]}
    else:
        base = {"library": None, "class": f"{type(model).__module__}.{type(model).__qualname__}"}
    safetensors.torch.save_model(model, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    from .. import __version__

    payload = {
        "format_version": FORMAT_VERSION,
        "han_surgery_version": __version__,
        "base": base,
        "dtype": _dtype_name(model),
        "recipe": recipe,
    }
    (directory / HAN_CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    return directory


def _refuse_pickles(directory: Path) -> None:
    if (directory / WEIGHTS_NAME).is_file():
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(
            f"{directory} holds only pickle-based weights ({', '.join(pickles)}) and no {WEIGHTS_NAME}. "
            "han-surgery never unpickles files (loading a pickle can run arbitrary code). "
            "Convert them to safetensors in an environment you trust (e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors'))."
        )
    raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}")


def _build_base(directory: Path, base: dict) -> nn.Module:
    library = base.get("library")
    if library == "transformers":
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(directory))
        name = base.get("class") or (config.architectures or [None])[0]
        cls = getattr(transformers, name, None) if name else None
        if cls is None:
            raise ValueError(
                f"{directory}: transformers has no model class {name!r} (from {CONFIG_NAME} / {HAN_CONFIG_NAME})"
            )
        return cls(config)
    if library == "timm":
        import timm
        from timm.models._hub import load_model_config_from_path

        pretrained_cfg, name, model_args = load_model_config_from_path(directory)
        return timm.create_model(name, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    raise ValueError(
        f"{directory} was saved from a {base.get('class')} (neither timm nor transformers): "
        "build the base model yourself and pass it: from_pretrained(directory, model=MyModel(...))"
    )


def _resolve_directory(source: str | Path, revision: str | None) -> Path:
    path = Path(source)
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"from_pretrained: {source} is not a directory (nor a Hub repo id 'owner/name')")
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
        ValueError: not a han-surgery directory, or the recipe does not replay
            (rules renamed, a custom rule not registered, another base model).
    """
    directory = _resolve_directory(directory, revision)
    _refuse_pickles(directory)
    han_file = directory / HAN_CONFIG_NAME
    if not han_file.is_file():
        raise ValueError(
            f"{directory} has no {HAN_CONFIG_NAME}: it was not written by han_surgery.save_pretrained "
            "(load a plain checkpoint with its library, then call hanify)"
        )
    payload = json.loads(han_file.read_text())
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{han_file} has format_version {payload['format_version']}; this han-surgery reads <= {FORMAT_VERSION}"
        )
    if model is None:
        model = _build_base(directory, payload.get("base", {}))
    model.to(dtype=getattr(torch, payload.get("dtype", "float32")))
    recipe = payload["recipe"]
    # A base whose constructor already hanifies (e.g. timm-registered Han models) carries the first steps.
    done = json.loads(json.dumps(getattr(model, RECIPE_ATTR, [])))
    if recipe[: len(done)] != done:
        raise ValueError(
            f"{han_file}: the rebuilt base model {type(model).__name__} already carries a hanify recipe "
            "that is not a prefix of the saved one; pass the plain base model with model=..."
        )
    for i, step in enumerate(recipe[len(done) :], start=len(done)):
        config = HanConfig.from_dict(step["config"])
        wanted = [(r["path"], r["rule"]) for r in step["rewrites"]]
        paths = {p for p, _ in wanted}
        report = hanify(model, config, filter_fn=lambda _m, p, paths=paths: p in paths)
        got = [(r.path, r.rule) for r in report.rewrites]
        if got != wanted:
            missing = sorted(set(wanted) - set(got))
            raise ValueError(
                f"{han_file}: step {i} of the recipe does not replay on the rebuilt model; "
                f"not reproduced: {missing[:5]}. (Is a custom rule not registered, or a different base model?)"
            )
    safetensors.torch.load_model(model, str(directory / WEIGHTS_NAME), strict=True)
    return model.eval()
