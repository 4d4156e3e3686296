"""The model step of a run: resolve ``--model`` into a module sized for the data, and save it back.

``--model`` may be

* a timm model name (``resnet18``, ``test_vit``; the Han models ``han_mobilevit_xxs``, ... are timm
  names once ``han_surgery`` is imported) -- built with ``timm.create_model`` for the data's classes
  and channels (``--pretrained`` loads the timm weights, which needs the Hub or its cache);
* ``local-dir:<folder>`` or a folder: whatever :func:`han_surgery.folders.inspect_model_folder`
  finds -- a hanified folder, a timm ``save_for_hf`` folder, a transformers folder (loaded with
  ``AutoModelForSequenceClassification`` for text data, safetensors only), or a tabular network
  this command trained;
* ``mlp`` / ``mlp:<width>x<depth>`` or ``hannet`` / ``hannet:<width>x<depth>``: small built-in
  models for tabular data (``hannet`` is the paper's Householder network; ``mlp:<width>x0`` is a linear
  model), built from random weights: ``--model-kwargs`` and ``--pretrained`` do not apply to them.

:func:`save_model` writes ``model.safetensors`` and ``config.json`` as the model's library expects
(timm ``save_for_hf``, transformers ``save_pretrained``, :func:`han_surgery.save_pretrained` for
hanified models); :func:`han_surgery.load_model` reads any of them back.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, HanSurgeryError, first_line
from ..folders import (
    CONFIG_NAME,
    TABULAR_CONFIG_KEY,
    WEIGHTS_NAME,
    checked_timm_model_args,
    checked_transformers_model_kwargs,
    inspect_model_folder,
    read_json_object,
)
from ..loading import hub_repo_hint, load_folder, weight_files
from ..models.tabular import TabularNet
from ..pretrained import create_timm_model
from ..surgery.serialization import save_pretrained
from .data import DataBundle

__all__ = ["ModelError", "BuiltModel", "build_model", "load_tokenizer", "save_model"]

Family = Literal["timm", "transformers", "tabular"]


class ModelError(HanSurgeryError, ValueError):
    """``--model`` (or ``--distill-from``) cannot be resolved; the message says what was tried."""


@dataclass
class BuiltModel:
    """A model ready to train, with what is needed to save it and describe it.

    Attributes:
        model: the module.
        family: the library format the output folder uses.
        source: the ``--model`` spec it came from.
        tokenizer: text models: the tokenizer saved beside the weights.
        hanified: whether ``han_config.json`` describes surgery applied to it (before or in this run).
        loaded_hanified: it was already hanified when loaded (no surgery in this run).
        random_weights: which weights start random: ``"none"`` (all loaded), ``"head"`` (the classifier, new
            for this data's labels: timm's ``reset_classifier``, or the weights transformers initialised), or
            ``"all"`` (a timm name without ``pretrained``, a tabular network).
    """

    model: nn.Module
    family: Family
    source: str
    tokenizer: Any = None
    hanified: bool = False
    loaded_hanified: bool = False
    random_weights: Literal["none", "head", "all"] = "none"


_TABULAR_RE = re.compile(r"^(mlp|hannet)(?::(\d+)x(\d+))?$")


def _timm_create(name: str, data: DataBundle | None, pretrained: bool, extra: dict[str, Any]) -> nn.Module:
    kwargs: dict[str, Any] = checked_timm_model_args(extra, f"--model {name}", name="--model-kwargs")
    if data is not None:
        kwargs.setdefault("num_classes", data.num_outputs)
        if data.in_chans is not None:
            kwargs.setdefault("in_chans", data.in_chans)
    attempts = [kwargs]
    if data is not None and data.image_size is not None and "img_size" not in kwargs:
        attempts.insert(0, {**kwargs, "img_size": data.image_size})  # ViT-like models take the size; convnets do not
    for i, attempt in enumerate(attempts):
        try:
            return create_timm_model(name, pretrained=pretrained, **attempt)
        except (TypeError, ValueError, KeyError, AssertionError, IndexError, RuntimeError) as e:
            if i + 1 < len(attempts):
                continue
            if not extra:
                raise
            # timm's own checks are asserts (embed_dim=33 with 2 heads), unknown layer names KeyErrors, a negative
            # depth torch's RuntimeError: every one the user's --model-kwargs
            raise ModelError(
                f"--model {name}: the model's constructor rejected --model-kwargs {json.dumps(extra)} "
                f"({type(e).__name__}: {first_line(e)})"
            ) from None
    raise AssertionError("unreachable")


def class_names_in(config_file: Path) -> list[str] | None:
    """The class names a model folder's ``config.json`` records, in order (``None``: none, or transformers' default
    ``LABEL_<i>`` names)."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return class_names_of(config)


def class_names_of(config: Any) -> list[str] | None:
    """:func:`class_names_in` of a parsed ``config.json`` (a model folder's ``ModelFolder.config``)."""
    if not isinstance(config, dict):
        return None
    names = config.get("label_names")  # timm's save_for_hf(model_config={"label_names": ...})
    if names is None:
        base = config.get("base_config") if isinstance(config.get("base_config"), dict) else config  # hanified
        id2label = base.get("id2label")
        if isinstance(id2label, dict) and all(isinstance(k, str) and k.isdigit() for k in id2label):
            names = [id2label[k] for k in sorted(id2label, key=int)]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        return None
    return None if all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names


def _other_classes(config: dict[str, Any], data: DataBundle | None) -> list[str] | None:
    """The class names a model folder's parsed ``config.json`` records where ``data`` names other ones (``None`` if
    either names none, or they are the same): its classifier's rows are another task's classes, not these."""
    if data is None or not data.class_names:
        return None
    names = class_names_of(config)
    return names if names is not None and names != list(data.class_names) else None


def _fit_head(model: nn.Module, data: DataBundle | None, other_classes: list[str] | None = None) -> bool:
    """A new classifier for ``data``'s labels where the model's has another size, or was trained on
    ``other_classes`` (a head of ``a_dog, b_cat`` would start ``b_cat, c_fox`` from the dog's row); ``True`` if it
    made one."""
    if (
        data is not None
        and hasattr(model, "reset_classifier")
        and (getattr(model, "num_classes", None) != data.num_outputs or other_classes is not None)
    ):
        model.reset_classifier(data.num_outputs)
        return True
    return False


def _reset_transformers_head(model: nn.Module) -> None:
    """Initialise the weights outside ``model``'s base model (its classifier head) as transformers initialises a
    new head: a normal of std ``config.initializer_range`` for Linear weights, zeros for biases, a norm at 1 / 0."""
    body = model.base_model_prefix
    std = getattr(model.config, "initializer_range", 0.02)
    for name, module in model.named_modules():
        if not name or name == body or name.startswith(f"{body}."):
            continue
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _timm_random_weights(model: nn.Module, pretrained: bool) -> Literal["none", "head", "all"]:
    """What a timm model built with ``pretrained`` holds at random: timm loads no classifier of another size."""
    if not pretrained:
        return "all"
    trained = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    return "head" if trained is not None and trained != getattr(model, "num_classes", trained) else "none"


def build_model(
    spec: str,
    data: DataBundle | None = None,
    *,
    pretrained: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> BuiltModel:
    """Build ``spec`` (see the module docstring) for ``data`` (or keep the model's own head when ``data`` is None).

    ``trust_remote_code`` lets transformers run Python code shipped in a model folder (``auto_map``);
    it is off unless the user opts in.

    Raises:
        ModelError: unknown name or unusable folder, with close timm names when it looks like a typo.
        CheckpointError: the folder is unreadable, holds only pickles, or is not a model folder.
    """
    import timm

    model_kwargs = dict(model_kwargs or {})
    m = _TABULAR_RE.match(spec)
    if m:
        kind = m.group(1)
        if data is None or data.kind != "tabular":
            raise ModelError(f"--model {spec}: the built-in '{kind}' model is for tabular CSV data.")
        if model_kwargs:
            raise ModelError(
                f"--model {spec}: --model-kwargs applies to timm model names and transformers folders; the built-in "
                f"{kind} model takes its width and depth from --model {kind}:<width>x<depth>. Drop --model-kwargs."
            )
        if pretrained:
            raise ModelError(
                f"--model {spec}: --pretrained loads timm's weights for a timm model name; the built-in {kind} model "
                "has none. Drop --pretrained."
            )
        width, depth = int(m.group(2) or 128), int(m.group(3) or 2)
        try:
            model = TabularNet(data.num_features, data.num_outputs, width, depth, kind=kind)
        except ConfigError as e:  # no width, or a size no network has
            raise ModelError(f"--model {spec}: {e}") from None
        return BuiltModel(model, "tabular", spec, random_weights="all")

    path = Path(spec.removeprefix("local-dir:")).expanduser()
    if path.is_dir():
        folder = inspect_model_folder(path)
        family: Family = folder.base_library if folder.base_library in ("timm", "transformers", "tabular") else "timm"
        _check_data_kind(spec, family, data)
        if pretrained:
            raise ModelError(
                f"--model {spec}: --pretrained loads timm's weights for a timm model name; this folder's own weights "
                "are loaded. Drop --pretrained."
            )
        if model_kwargs and family != "transformers":
            raise ModelError(
                f"--model {spec}: --model-kwargs applies to timm model names and transformers folders; this folder "
                f"({folder.kind}) is rebuilt from its own config.json. Drop --model-kwargs."
            )
        if model_kwargs:
            checked_transformers_model_kwargs(model_kwargs, folder.config, f"--model {spec}")
        if folder.kind == "transformers" or (family == "transformers" and data is not None):
            # a hanified transformers folder gets a classification head too (the recipe replays on the base model)
            weight_files(folder)  # model.safetensors, or a sharded folder's index and shards: named if missing
            return _load_transformers(
                path,
                data,
                model_kwargs,
                trust_remote_code,
                hanified=folder.kind == "hanified",
                other_classes=_other_classes(folder.config, data),
            )
        model = load_folder(folder)
        if isinstance(model, TabularNet):  # trained on standardised rows here; exported with this data's statistics
            model = model.without_standardization()
        model.train()
        new_head = _fit_head(model, data, _other_classes(folder.config, data))
        tokenizer = load_tokenizer(path) if family == "transformers" else None
        hanified = folder.kind == "hanified"
        return BuiltModel(
            model,
            family,
            str(path),
            tokenizer,
            hanified=hanified,
            loaded_hanified=hanified,
            random_weights="head" if new_head else "none",
        )
    if spec.startswith("local-dir:") or ("/" in spec and not timm.is_model(spec)):
        raise ModelError(f"--model {spec}: no such folder.{hub_repo_hint(spec)}")
    if not timm.is_model(spec):
        close = difflib.get_close_matches(spec, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"--model {spec}: unknown model. Give a timm model name (timm.list_models()), a Han model name "
            f"(han_surgery registers han_*), a folder saved by han_surgery.save_pretrained / timm save_for_hf / "
            f"transformers save_pretrained, or mlp / hannet for tabular data.{hint}"
        )
    _check_data_kind(spec, "timm", data)
    model = _timm_create(spec, data, pretrained, model_kwargs)
    return BuiltModel(model, "timm", spec, random_weights=_timm_random_weights(model, pretrained))


#: The data each model family trains on.
FAMILY_DATA = {"timm": "image", "transformers": "text", "tabular": "tabular"}


def _check_data_kind(spec: str, family: str, data: DataBundle | None) -> None:
    if data is not None and data.kind != FAMILY_DATA[family]:
        hint = {"tabular": "use --model mlp or hannet for a numeric CSV", "text": "use a transformers model folder",
                "image": "use a timm model name or folder"}[data.kind]  # fmt: skip
        raise ModelError(f"--model {spec} is a {family} model for {FAMILY_DATA[family]} data, but --data holds "
                         f"{data.kind} data: {hint}.")  # fmt: skip


#: Files of which a folder with a tokenizer has at least one (``save_pretrained`` writes ``tokenizer_config.json``).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model")


#: The tokenizer files that hold a JSON object (transformers fails on another shape with an ``AttributeError``).
TOKENIZER_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """The transformers tokenizer saved in the folder ``path``, or ``None`` if it has none.

    (Without tokenizer files, ``AutoTokenizer.from_pretrained`` may build a tokenizer that knows only its
    special tokens: such a folder counts as having none.)

    Raises:
        CheckpointError: the folder has tokenizer files, but transformers cannot load them (a JSON file of the
            wrong shape, a missing library such as ``sentencepiece``); the message names the file or the folder.
    """
    from transformers import AutoTokenizer

    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return None
    for name in TOKENIZER_JSON_FILES:
        if (Path(path) / name).is_file():
            read_json_object(Path(path) / name)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, TypeError, KeyError, AttributeError) as e:
        cause = f"KeyError: {e}" if isinstance(e, KeyError) else first_line(e)  # a KeyError's message is the key
        raise CheckpointError(f"{path}: transformers cannot load its tokenizer ({cause})") from None


def _load_transformers(
    path: Path,
    data: DataBundle | None,
    model_kwargs: dict[str, Any],
    trust_remote_code: bool = False,
    *,
    hanified: bool = False,
    other_classes: list[str] | None = None,
) -> BuiltModel:
    """``path``'s transformers model for sequence classification on ``data``; its classifier starts afresh where it
    has another number of labels, or was trained on ``other_classes`` (:func:`_other_classes`)."""
    from transformers import AutoModelForSequenceClassification

    kwargs = dict(model_kwargs)
    if data is not None:
        kwargs["num_labels"] = data.num_outputs
        if data.class_names:
            kwargs["id2label"] = dict(enumerate(data.class_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(data.class_names)}
    try:  # a hanified folder's config applies these to its base model's config, as a plain one does
        # a classifier head of another size (a folder fine-tuned on another task) starts afresh, as timm's does for
        # num_classes; transformers names the weights it re-initialised
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        hint = " (its own code runs only with --trust-remote-code)" if "trust_remote_code" in str(e) else ""
        raise CheckpointError(f"{path}: transformers cannot load it: {first_line(e)}{hint}") from None
    except (KeyError, AssertionError, TypeError, IndexError, RuntimeError) as e:
        if not model_kwargs:  # a folder that builds without them: not the user's input
            raise
        raise ModelError(  # hidden_act="nope" is a KeyError, a pad_token_id beyond the vocabulary an AssertionError
            f"--model {path}: the model's constructor rejected --model-kwargs {json.dumps(model_kwargs)} "
            f"({type(e).__name__}: {first_line(e)})"
        ) from None
    num_labels = model.config.num_labels
    body = f"{model.base_model_prefix}." if model.base_model_prefix else None
    other = sorted(  # a body table of num_labels rows (type_vocab_size=3 on 3 labels) is not the head either
        name
        for name, _, shape in info.get("mismatched_keys", ())
        if not shape or shape[0] != num_labels or (body and name.startswith(body))
    )
    if other:  # only the weights of the label dimension may start afresh, never the encoder's
        raise CheckpointError(
            f"{path}: its weights do not fit the model its config (and --model-kwargs) builds: {', '.join(other[:4])}"
            f"{' ...' if len(other) > 4 else ''} (only a classifier head of another number of labels starts afresh)"
        )
    # weights of the body the folder does not hold (--model-kwargs num_hidden_layers above its own) would start at
    # random too; a pooler may (a folder saved without one: BertModel(add_pooling_layer=False))
    missing_body = sorted(
        k for k in info.get("missing_keys", ()) if body and k.startswith(body) and ".pooler." not in k
    )
    if missing_body:
        raise CheckpointError(
            f"{path}: the model its config (and --model-kwargs) builds has weights the folder does not have: "
            f"{', '.join(missing_body[:4])}{' ...' if len(missing_body) > 4 else ''} (only a classifier head starts "
            "afresh: give --model-kwargs that keep the architecture)"
        )
    tokenizer = load_tokenizer(path, trust_remote_code)
    fresh = info.get("missing_keys") or info.get("mismatched_keys")  # what transformers initialised: the head
    if not fresh and other_classes is not None:  # a head of as many labels, for other classes
        with torch.no_grad():
            _reset_transformers_head(model)
        fresh = True
    return BuiltModel(
        model,
        "transformers",
        str(path),
        tokenizer,
        hanified=hanified,
        loaded_hanified=hanified,
        random_weights="head" if fresh else "none",
    )


def save_model(
    built: BuiltModel,
    model: nn.Module,
    directory: str | Path,
    *,
    data_config: dict[str, Any] | None = None,
    standardization: dict[str, list[float]] | None = None,
    label_names: list[str] | None = None,
    max_length: int | None = None,
) -> None:
    """Write ``model`` into ``directory`` in its library's format (``model.safetensors`` + ``config.json``).

    Hanified models go through :func:`han_surgery.save_pretrained` (adds ``han_config.json``); plain
    timm models through ``timm.models.save_for_hf``. For timm models, hanified or not, ``data_config``
    (the preprocessing the model was trained with, e.g. ``{"input_size": (1, 28, 28), "mean": (0.5,),
    "std": (0.5,)}``) goes into ``config.json``'s ``pretrained_cfg``, and ``label_names`` (the class names, in
    class order) beside it, as timm's ``save_for_hf(model_config=...)`` writes them; ``max_length`` (text: the
    token limit the run cut texts to) becomes the saved tokenizer's ``model_max_length``; transformers models go through
    ``save_pretrained``, built-in tabular models as safetensors plus their constructor arguments in
    ``config.json``, with ``standardization`` (:meth:`DataBundle.standardization`) among them: the
    folder's network then takes raw rows (see :class:`~han_surgery.models.tabular.TabularNet`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    timm_model_config = {"label_names": list(label_names)} if label_names else None
    if built.hanified:
        if built.family == "timm":
            save_pretrained(model, directory, data_config=data_config, model_config=timm_model_config)
        else:
            save_pretrained(model, directory)
    elif built.family == "timm":
        from timm.models import save_for_hf

        save_for_hf(
            model, str(directory), safe_serialization=True, data_config=data_config, model_config=timm_model_config
        )
    elif built.family == "transformers":
        model.save_pretrained(str(directory), safe_serialization=True)
    else:
        from safetensors.torch import save_model as save_safetensors

        save_safetensors(model, str(directory / WEIGHTS_NAME))
    if built.family == "tabular":  # our own config: what TabularNet needs to be rebuilt
        tabular = {**model.config, **(standardization or {})}
        (directory / CONFIG_NAME).write_text(json.dumps({TABULAR_CONFIG_KEY: tabular}, indent=2) + "\n")
    if built.tokenizer is not None:
        if max_length is not None:  # so that tokenizer(texts, truncation=True) cuts texts where the run did
            built.tokenizer.model_max_length = max_length
        built.tokenizer.save_pretrained(str(directory))
