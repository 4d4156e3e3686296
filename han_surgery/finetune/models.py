"""Resolve ``--model`` into a module, and save / load a fine-tuned model in its library's format.

``--model`` may be

* a timm model name (``resnet18``, ``test_vit``; the Han models ``han_mobilevit_xxs``, ... are timm
  names once ``han_surgery`` is imported) -- built with ``timm.create_model`` for the data's classes
  and channels (``--pretrained`` loads the timm weights, which needs the Hub or its cache);
* ``local-dir:<folder>`` or a folder with a timm ``config.json`` (as written by ``save_for_hf``);
* a folder written by ``han_surgery.save_pretrained`` (it holds ``han_config.json``);
* a transformers model folder (``config.json`` with ``model_type``), loaded with
  ``AutoModelForSequenceClassification`` for text data;
* ``mlp`` / ``mlp:<width>x<depth>`` or ``hannet`` / ``hannet:<width>x<depth>``: small built-in
  models for tabular data (``hannet`` is the paper's Householder network).

:func:`save_model` writes ``model.safetensors`` and ``config.json`` as the library expects
(timm ``save_for_hf``, transformers ``save_pretrained``, ``han_surgery.save_pretrained`` for
hanified models); :func:`load_model` reads any of them back.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["ModelError", "BuiltModel", "build_model", "save_model", "load_model", "TabularNet", "count_parameters"]

Family = Literal["timm", "transformers", "tabular"]
TABULAR_CONFIG_KEY = "han_surgery_tabular"


class ModelError(ValueError):
    """``--model`` (or ``--distill-from``) cannot be resolved; the message says what was tried."""


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class BuiltModel:
    """A model ready to train, with what is needed to save it and describe it.

    ``family`` is the library format the output folder uses; ``base_model`` the name or path it came from;
    ``hanified`` whether ``han_config.json`` describes surgery applied to it (before or in this run).
    """

    model: nn.Module
    family: Family
    base_model: str
    tokenizer: Any = None
    hanified: bool = False
    han_loaded: bool = False
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- tabular
class TabularNet(nn.Module):
    """A small network for tabular rows ``(B, F) -> (B, num_outputs)``.

    ``kind="mlp"``: ``[Linear(F|w, w), ReLU] x depth, Linear(w, out)``.
    ``kind="hannet"``: ``Linear(F, w), |.|, HanLayer(w) x depth, Linear(w, out)`` -- the paper's
    HanNet (each hidden layer ``|H x + b|`` has ``2w`` parameters).
    """

    def __init__(self, in_features: int, num_outputs: int, width: int = 128, depth: int = 2, kind: str = "mlp") -> None:
        super().__init__()
        from ..layers import Abs, HanLayer

        self.config = {
            "in_features": in_features,
            "num_outputs": num_outputs,
            "width": width,
            "depth": depth,
            "kind": kind,
        }
        if kind == "mlp":
            layers: list[nn.Module] = []
            for i in range(depth):
                layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
        elif kind == "hannet":
            layers = [nn.Linear(in_features, width), Abs()] + [HanLayer(width) for _ in range(depth)]
        else:
            raise ModelError(f"TabularNet kind must be 'mlp' or 'hannet', got {kind!r}.")
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


_TABULAR_RE = re.compile(r"^(mlp|hannet)(?::(\d+)x(\d+))?$")


# -------------------------------------------------------------------------------------- resolving
def _is_transformers_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    return "model_type" in json.loads(cfg.read_text())


def _timm_create(name: str, data: Any, pretrained: bool, extra: dict[str, Any]) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = dict(extra)
    if data is not None:
        kwargs.setdefault("num_classes", data.num_outputs)
        if data.in_chans is not None:
            kwargs.setdefault("in_chans", data.in_chans)
    if data is not None and data.image_size is not None and "img_size" not in kwargs:
        try:  # ViT-like models take the input size; convnets do not.
            return timm.create_model(name, pretrained=pretrained, img_size=data.image_size, **kwargs)
        except TypeError:
            pass
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def build_model(
    spec: str, data: Any = None, *, pretrained: bool = False, model_kwargs: dict[str, Any] | None = None
) -> BuiltModel:
    """Build ``spec`` (see the module docstring) for ``data`` (a :class:`~.data.DataBundle`, or None to keep the
    model's own head).

    Raises:
        ModelError: unknown name or unusable folder, with close timm names when it looks like a typo.
    """
    import timm

    import han_surgery  # noqa: F401  (registers the Han timm models, when present)

    model_kwargs = dict(model_kwargs or {})
    m = _TABULAR_RE.match(spec)
    if m:
        if data is None or data.kind != "tabular":
            raise ModelError(f"--model {spec}: the built-in '{m.group(1)}' model is for tabular CSV data.")
        width, depth = int(m.group(2) or 128), int(m.group(3) or 2)
        model = TabularNet(data.num_features, data.num_outputs, width, depth, kind=m.group(1))
        return BuiltModel(model, "tabular", spec)

    local = spec[len("local-dir:") :] if spec.startswith("local-dir:") else spec
    path = Path(local).expanduser()
    if path.is_dir():
        if (path / "han_config.json").is_file():
            return _load_han_dir(path, data)
        if _is_transformers_dir(path):
            return _load_transformers(path, data, model_kwargs)
        cfg = path / "config.json"
        if cfg.is_file():
            conf = json.loads(cfg.read_text())
            if TABULAR_CONFIG_KEY in conf:
                model = load_model(path)
                return BuiltModel(model, "tabular", str(path))
            if "architecture" in conf:
                model = _timm_create(f"local-dir:{path}", None, True, model_kwargs)
                if data is not None and model.num_classes != data.num_outputs:
                    model.reset_classifier(data.num_outputs)
                return BuiltModel(model, "timm", str(path))
        raise ModelError(
            f"--model {spec}: the folder has no han_config.json (han_surgery.save_pretrained), no timm "
            f"config.json with 'architecture' (timm save_for_hf), and no transformers config.json with 'model_type'."
        )
    if spec.startswith("local-dir:") or "/" in spec and not timm.is_model(spec):
        raise ModelError(f"--model {spec}: no such folder.")
    if not timm.is_model(spec):
        close = difflib.get_close_matches(spec, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"--model {spec}: unknown model. Give a timm model name (timm.list_models()), a Han model name "
            f"(han_surgery registers han_*), a folder saved by han_surgery.save_pretrained / timm save_for_hf / "
            f"transformers save_pretrained, or mlp / hannet for tabular data.{hint}"
        )
    try:
        model = _timm_create(spec, data, pretrained, model_kwargs)
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise ModelError(
            f"--model {spec} --pretrained: could not load timm's pretrained weights ({type(e).__name__}: {e}). They come "
            f"from the Hugging Face Hub: run once with network access (they are cached), or pass a local folder."
        ) from None
    return BuiltModel(model, "timm", spec)


def _load_han_dir(path: Path, data: Any) -> BuiltModel:
    model = load_model(path)
    family: Family = (
        "tabular"
        if isinstance(model, TabularNet)
        else "transformers"
        if hasattr(model, "save_pretrained") and hasattr(model, "config")
        else "timm"
    )
    model.train()
    if data is not None and hasattr(model, "num_classes") and model.num_classes != data.num_outputs:
        model.reset_classifier(data.num_outputs)
    tokenizer = None
    if family == "transformers":
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError):
            tokenizer = None
    return BuiltModel(model, family, str(path), tokenizer=tokenizer, hanified=True, han_loaded=True)


def _load_transformers(path: Path, data: Any, model_kwargs: dict[str, Any]) -> BuiltModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if data is not None and data.kind != "text":
        raise ModelError(
            f"--model {path}: a transformers model folder is fine-tuned on text data (.csv/.jsonl with text,label); got {data.kind} data."
        )
    kwargs = dict(model_kwargs)
    if data is not None:
        kwargs["num_labels"] = data.num_outputs
        if data.class_names:
            kwargs["id2label"] = dict(enumerate(data.class_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(data.class_names)}
    model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return BuiltModel(model, "transformers", str(path), tokenizer=tokenizer)


# ---------------------------------------------------------------------------------- save and load
def save_model(
    built: BuiltModel, model: nn.Module, directory: str | Path, *, data_config: dict[str, Any] | None = None
) -> None:
    """Write ``model`` into ``directory`` in its library's format (``model.safetensors`` + ``config.json``).

    Hanified models go through ``han_surgery.save_pretrained`` (adds ``han_config.json``); plain timm
    models through ``timm.models.save_for_hf``. For timm models, hanified or not, ``data_config`` (the
    preprocessing the model was trained with, e.g. ``{"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,)}``)
    goes into ``config.json``'s ``pretrained_cfg``; transformers models go through
    ``save_pretrained``, built-in tabular models as safetensors plus their constructor arguments in ``config.json``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if built.hanified:
        import han_surgery

        han_surgery.save_pretrained(model, str(directory), data_config=data_config if built.family == "timm" else None)
        if built.family == "tabular":  # save_pretrained records no config for custom modules: keep ours
            (directory / "config.json").write_text(json.dumps({TABULAR_CONFIG_KEY: model.config}, indent=2) + "\n")
    elif built.family == "timm":
        from timm.models import save_for_hf

        save_for_hf(model, str(directory), safe_serialization=True, data_config=data_config)
    elif built.family == "transformers":
        model.save_pretrained(str(directory), safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps({TABULAR_CONFIG_KEY: model.config}, indent=2) + "\n")
    if built.tokenizer is not None:
        built.tokenizer.save_pretrained(str(directory))


def load_model(directory: str | Path) -> nn.Module:
    """Load a folder written by :func:`save_model` (or by timm / transformers / han_surgery directly)."""
    directory = Path(directory)
    conf_file = directory / "config.json"
    conf = json.loads(conf_file.read_text()) if conf_file.is_file() else {}
    if (directory / "han_config.json").is_file():
        import han_surgery

        base = TabularNet(**conf[TABULAR_CONFIG_KEY]) if TABULAR_CONFIG_KEY in conf else None
        return han_surgery.from_pretrained(str(directory), model=base)
    if TABULAR_CONFIG_KEY in conf:
        from safetensors.torch import load_file

        model = TabularNet(**conf[TABULAR_CONFIG_KEY])
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model
    if "model_type" in conf:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(str(directory))
    import timm

    import han_surgery  # noqa: F401

    return timm.create_model(f"local-dir:{directory}", pretrained=True)
