"""``load_model``: any model han-surgery works with, from a name or a folder, without unpickling anything.

The source is one of

* a timm model name (``"vit_small_patch16_224"``, or a Han model such as ``"han_mobilevit_xxs"``):
  built with ``pretrained=False`` (random weights, no download) unless ``pretrained=True``;
* ``local-dir:<folder>`` or a folder: whatever :func:`~han_surgery.folders.inspect_model_folder`
  finds there -- a hanified folder (:func:`~han_surgery.from_pretrained`), a timm ``save_for_hf``
  folder, a transformers ``save_pretrained`` folder (the class named in ``architectures``,
  safetensors only, no code from the folder), or a fine-tuned tabular network.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import nn

from .errors import CheckpointError, ConfigError
from .folders import TABULAR_CONFIG_KEY, WEIGHTS_NAME, ModelFolder, inspect_model_folder, read_timm_config
from .pretrained import create_timm_model
from .surgery.serialization import from_pretrained

__all__ = ["load_model", "load_folder"]


def load_folder(folder: ModelFolder, *, num_classes: int | None = None) -> nn.Module:
    """Load the model of an inspected folder (see the module docstring).

    Args:
        folder: from :func:`~han_surgery.folders.inspect_model_folder`.
        num_classes: timm folders only: a new classifier size (timm re-initialises the head).
    """
    if folder.kind == "hanified":
        base = None
        if folder.base_library == "tabular":  # our own small network: build it from its config.json
            from .models.tabular import TabularNet

            base = TabularNet(**folder.config[TABULAR_CONFIG_KEY])
        return from_pretrained(folder.path, model=base)
    if not (folder.path / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder.path / WEIGHTS_NAME}: missing")
    if folder.kind == "timm":
        import timm

        pretrained_cfg, name, model_args = read_timm_config(folder.path)  # model_args allow-listed
        # pretrained_cfg now points at the folder ("local-dir"): timm loads its safetensors.
        if num_classes is not None:
            model_args["num_classes"] = num_classes
        return timm.create_model(name, pretrained=True, pretrained_cfg=pretrained_cfg, **model_args)
    if folder.kind == "tabular":
        from safetensors.torch import load_model as load_safetensors

        from .models.tabular import TabularNet

        model = TabularNet(**folder.config[TABULAR_CONFIG_KEY])
        load_safetensors(model, str(folder.path / WEIGHTS_NAME))
        return model
    import transformers

    name = (folder.config.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"{folder.path / 'config.json'}: architectures={folder.config.get('architectures')} names no "
            "transformers model class"
        )
    try:
        return cls.from_pretrained(str(folder.path), use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder.path}: transformers cannot load it: {first}") from None


def load_model(source: str | Path, *, pretrained: bool = False, num_classes: int | None = None) -> nn.Module:
    """Build the model named by ``source`` (see the module docstring).

    Args:
        source: a timm model name, ``local-dir:<folder>``, or a folder.
        pretrained: timm names only: load timm's pretrained weights (needs the Hub or its cache).
        num_classes: timm only: the classifier size.

    Raises:
        ConfigError: ``source`` is neither a folder nor a timm model name (the message lists near names).
        CheckpointError: the folder cannot be loaded (the message names the file).
    """
    text = str(source)
    spec = text.removeprefix("local-dir:")
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_folder(inspect_model_folder(path), num_classes=num_classes)
    if text.startswith("local-dir:") or path.exists():
        raise CheckpointError(f"{spec}: not a folder")
    import timm

    if not timm.is_model(text):
        near = difflib.get_close_matches(text, timm.list_models(), n=5, cutoff=0.5)
        raise ConfigError(
            f"{text!r} is neither a folder nor a timm model name"
            + (f"; near timm names: {', '.join(near)}" if near else "")
        )
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return create_timm_model(text, pretrained=pretrained, **kwargs)
