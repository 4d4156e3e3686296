"""Save a hanified model and rebuild it exactly: ``save_pretrained`` / ``from_pretrained``.

A saved directory holds

* ``model.safetensors`` -- every tensor of the hanified model (never a pickle);
* ``han_config.json`` -- the :class:`~han_surgery.surgery.recipe.Recipe`: each :func:`hanify`
  call applied (its :class:`HanConfig` and the rewrites), plus which base model to build;
* ``generation_config.json`` -- transformers models that can ``generate()``: their
  ``GenerationConfig`` (beam count, start / end / padding tokens, ...), as transformers'
  ``save_pretrained`` writes it;
* ``config.json`` -- what the model's own library needs to load the folder natively, once
  ``han_surgery`` is imported:

  - timm: the file ``save_for_hf`` writes (``pretrained_cfg``, ``num_classes``, ...), with
    ``architecture`` = ``"hanified"`` (the timm entry point of :mod:`han_surgery.models.hanified`)
    and the base architecture and the recipe in ``model_args`` (``han_base``, ``han_recipe``):
    ``timm.create_model("local-dir:<dir>", pretrained=True)`` and ``"hf-hub:<repo>"`` load it;
  - transformers: ``model_type`` = ``"han_surgery"`` (registered with ``AutoConfig`` by
    :mod:`han_surgery.integrations.transformers`), the base model's config in ``base_config``,
    the recipe in ``han_recipe``: ``AutoModel*.from_pretrained(dir)`` and ``pipeline(...)`` load it.

``from_pretrained`` builds the base model from ``config.json`` (no download; a transformers model with its
parameters on the meta device, a timm model with random weights), replays the recipe (:func:`replay_recipe`), gives
the parameters still on meta memory, then loads ``model.safetensors`` with ``strict=True``, each tensor in the dtype
the file holds it in (T5 saved in float16 keeps its float32 ``wo``), and ``generation_config.json`` (if any): the
result computes bit for bit (and generates) what the saved model did. Of tied weights (GPT-2's ``lm_head.weight`` /
``transformer.wte.weight``) the file holds the name transformers' ``save_pretrained`` keeps, so a base model or another
head loads them too (both names when a ``state_dict=`` held them as separate copies, as transformers writes them then;
the loaders take the source of the tie). It also reads the folders earlier versions wrote (``config.json`` = the base
model's own config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import CheckpointError, ConfigError, HanSurgeryError, UnsafeCheckpointError, first_line
from ..folders import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    HAN_CONFIG_NAME,
    HF_BASE_CONFIG_KEY,
    HF_HANIFIED_MODEL_TYPE,
    HF_RECIPE_KEY,
    HF_REMOTE_CODE_MODULE,
    SHARDED_WEIGHTS_INDEX,
    TIMM_BASE_ARG,
    TIMM_HANIFIED_ARCH,
    TIMM_RECIPE_ARG,
    TIMM_SAVED_LOAD_ARGS,
    WEIGHTS_NAME,
    ModelFolder,
    inspect_model_folder,
    may_name_hub_repo,
    read_timm_config,
    recipe_in_config,
    shard_files,
    transformers_auto_map,
    transformers_remote_code,
)
from ..utils import is_han_timm_architecture, is_transformers_model, replace_parameters
from ..version import __version__
from .engine import _set_module, hanify, unwrap_model
from .recipe import BaseModelSpec, Recipe, RecipeStep, recipe_of, replace_last_step
from .registry import list_rules
from .report import HanifyReport

__all__ = [
    "save_pretrained",
    "from_pretrained",
    "replay_recipe",
    "replay_remaining_steps",
    "hanified_timm_config",
    "hanified_transformers_config",
    "transformers_base_config",
    "WEIGHTS_NAME",
    "HAN_CONFIG_NAME",
    "UnsafeCheckpointError",
]


def _dtype_name(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def recipe_for(model: nn.Module) -> Recipe:
    """The :class:`Recipe` of a hanified ``model`` as it is now: its base, its steps, its dtype."""
    return Recipe(base=BaseModelSpec.of(model), steps=tuple(recipe_of(model)), dtype=_dtype_name(model))


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    *,
    model_args: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a hanified model to ``directory`` (``model.safetensors``, ``han_config.json``, ``config.json``;
    ``generation_config.json`` for a transformers model that can ``generate()``).

    Args:
        model: a model :func:`hanify` has rewritten (timm, transformers, or any
            ``nn.Module``; the latter needs ``from_pretrained(..., model=...)``); a
            ``torch.compile`` / ``DataParallel`` / ``DistributedDataParallel`` wrapper is looked through.
        directory: created if missing; existing files of the same name are overwritten.
        model_args: timm only -- constructor kwargs to record, for the rare
            arguments timm's factory does not record itself (as in ``save_for_hf``).
        data_config: timm only -- the preprocessing the model now expects
            (``input_size``, ``mean``, ``std``, ...), written into ``pretrained_cfg``
            as ``save_for_hf(data_config=...)`` does.
        model_config: timm only -- what ``save_for_hf(model_config=...)`` takes, e.g. ``{"label_names":
            [...]}`` (one name per class, in ``config.json``; ``pretrained_cfg["label_names"]`` once loaded).
        state_dict: the weights to write (default ``model.state_dict()``), e.g. gathered by accelerate's
            ``get_state_dict``, as transformers' ``save_pretrained(state_dict=...)``.

    Returns:
        The directory, as a ``Path``.
    """
    model = unwrap_model(model)
    steps = recipe_of(model)
    unrecorded = _hanified_on_their_own(model)
    if not steps:
        raise ValueError(
            f"save_pretrained: {type(model).__name__} has not been hanified (no recipe found); "
            + (
                f"only its sub-module(s) {', '.join(unrecorded)} were, by a hanify call of their own: save that "
                "sub-module, or hanify the whole model (HanConfig(include=...) picks the blocks)"
                if unrecorded
                else "call han_surgery.hanify(model) first, or use the library's own save_pretrained / save_for_hf"
            )
        )
    recipe = recipe_for(model)
    _check_saveable(model, recipe, unrecorded)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if _can_generate(model):  # as transformers' save_pretrained; first: an invalid one is refused before other writes
        model.generation_config.save_pretrained(directory)
    config = None
    if recipe.base.library == "transformers":
        config = hanified_transformers_config(model, recipe)
        code = transformers_remote_code(__version__)
        (directory / f"{HF_REMOTE_CODE_MODULE}.py").write_text(code, encoding="utf-8")
    elif recipe.base.library == "timm":
        config = hanified_timm_config(
            model, recipe, model_args=model_args, data_config=data_config, model_config=model_config
        )
    if config is not None:
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _drop_stale_shards(directory)
    _save_weights(model, directory / WEIGHTS_NAME, state_dict)
    recipe.write(directory)
    return directory


def _hanified_on_their_own(model: nn.Module) -> list[str]:
    """The paths of ``model``'s sub-modules whose recipe holds steps that ``model``'s own recipe does not: those
    a ``hanify`` call was given directly (``hanify(model.encoder)``). A step of ``model``'s that rewrote inside a
    library model it holds is recorded on that part too (:func:`~.recipe.record_last_step_on_parts`), relative to
    it: those match. Outermost paths only."""
    steps, found = recipe_of(model), []
    for prefix, sub in model.named_modules():
        own = recipe_of(sub)
        if not prefix or not own or any(prefix.startswith(p + ".") for p in found):
            continue
        if own != [inside for step in steps if (inside := step.under(prefix)) is not None]:
            found.append(prefix)
    return found


def _check_saveable(model: nn.Module, recipe: Recipe, unrecorded: list[str]) -> None:
    """Refuse, before anything is written, a timm or transformers model whose folder would not load back: the
    loaders rebuild the base model and replay the model's recipe, so a sub-module hanified by a call of its own
    would come back as the base had it (a size mismatch, or random FFNs), and timm's config of a ``features_only``
    wrapper cannot be written."""
    if recipe.base.library is None:  # the user hands from_pretrained the model to replay on, as it is now
        return
    if unrecorded:
        raise ConfigError(
            f"save_pretrained: {', '.join(unrecorded)} of this {type(model).__name__} was hanified by a call of its "
            "own, which the model's recipe does not hold, so the saved folder would not rebuild it; hanify the whole "
            "model instead (HanConfig(include=...) / exclude=... pick the blocks)"
        )
    if recipe.base.library == "timm" and getattr(model, "num_classes", None) is None:
        raise ConfigError(
            f"save_pretrained: a features_only timm model ({type(model).__name__}) cannot be saved as a hanified "
            "folder (timm's config.json describes the whole model); hanify and save the model built without "
            "features_only, and take features with model.forward_intermediates(x, indices=...)"
        )


def _drop_stale_shards(directory: Path) -> None:
    """Remove the sharded weights an earlier save left in ``directory`` (the index and the shards it lists, file
    names only), as transformers' ``save_pretrained`` does: a loader that reads the index first, and an upload of
    the folder, would take them."""
    index = directory / SHARDED_WEIGHTS_INDEX
    if not index.is_file():
        return
    try:
        shards = shard_files(directory)
    except CheckpointError:  # an index that names something else than file names here: only the index goes
        shards = []
    for shard in shards:
        if shard.name != WEIGHTS_NAME:
            shard.unlink(missing_ok=True)
    index.unlink()


def _can_generate(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model with ``generate()`` (and so a ``generation_config``)."""
    can_generate = getattr(model, "can_generate", None)
    return callable(can_generate) and bool(can_generate()) and getattr(model, "generation_config", None) is not None


def _load_generation_config(model: nn.Module, directory: Path) -> None:
    """Give a model that can generate the ``generation_config.json`` saved with it, as transformers'
    ``from_pretrained`` does (folders written before it was saved keep the one built from the config)."""
    path = directory / GENERATION_CONFIG_NAME
    if not (path.is_file() and _can_generate(model)):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as e:  # transformers says "not a valid JSON file" with an OSError
        raise CheckpointError(f"{path}: not a valid generation config ({e})") from None


def _save_weights(model: nn.Module, path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``safetensors.torch.save_model``, keeping of each group of tied tensors the name transformers keeps.

    safetensors cannot store one tensor under several names, and ``save_model`` keeps the
    alphabetically first (GPT-2: ``lm_head.weight``), so a base model (``transformer.wte.weight``) or
    another head would load without its embeddings. transformers' ``save_pretrained`` keeps the
    source of each tie and drops the names tied to it (``all_tied_weights_keys``: tied name ->
    source; GPT-2 ``lm_head.weight`` -> ``transformer.wte.weight``; T5 ``shared.weight``, BART
    ``model.shared.weight``), and so does this. As ``save_model`` does, each dropped name is recorded in the metadata with the
    name kept; shared tensors transformers does not declare keep safetensors' choice. Tied names whose tensors in
    ``state_dict`` are separate copies (a cast or gathered state dict) are all written, as transformers writes them;
    :func:`from_pretrained` loads the source of the tie (see :func:`_load_weights`).
    """
    state_dict = dict(model.state_dict() if state_dict is None else state_dict)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    sources = [name for name in tied.values() if name not in tied]
    dropped = safetensors.torch._remove_duplicate_names(state_dict, preferred_names=sources, discard_names=list(tied))
    metadata = {"format": "pt"}
    for kept, names in dropped.items():
        for name in names:
            metadata[name] = kept
            del state_dict[name]
    safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata=metadata)


def hanified_timm_config(
    model: nn.Module,
    recipe: Recipe,
    *,
    model_args: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of a hanified timm model: timm's own (``save_config_for_hf``) with
    ``architecture = "hanified"`` and the base and the recipe in ``model_args``."""
    import tempfile

    from timm.models._hub import save_config_for_hf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_NAME
        save_config_for_hf(model, str(path), model_config=model_config, model_args=model_args, data_config=data_config)
        config = json.loads(path.read_text(encoding="utf-8"))
    args = {  # the base's constructor arguments: not how this model was loaded (timm keeps pretrained_strict)
        k: v
        for k, v in config.get("model_args", {}).items()
        if k not in (TIMM_BASE_ARG, TIMM_RECIPE_ARG) and k not in TIMM_SAVED_LOAD_ARGS
    }
    config["architecture"] = TIMM_HANIFIED_ARCH
    config["model_args"] = {**args, TIMM_BASE_ARG: recipe.base.name, TIMM_RECIPE_ARG: recipe.to_dict()}
    return config


def hanified_transformers_config(model: nn.Module, recipe: Recipe) -> dict[str, Any]:
    """The ``config.json`` of a hanified transformers model: ``model_type = "han_surgery"``, the base
    model's config (with ``architectures``) in ``base_config``, the recipe in ``han_recipe``, and an
    ``auto_map`` naming ``han_surgery_auto.py`` (see :func:`~han_surgery.folders.transformers_remote_code`)."""
    base_config = model.config.to_dict()
    base_config.pop(HF_RECIPE_KEY, None)  # a natively loaded model's config carries the recipe it was built with
    base_config["architectures"] = [recipe.base.name]
    base_config["dtype"] = recipe.dtype  # the weights' dtype, as transformers' save_pretrained records it
    tokenizer = _tokenizer_class(base_config)
    return {
        "model_type": HF_HANIFIED_MODEL_TYPE,
        "architectures": [recipe.base.name],
        "dtype": recipe.dtype,
        # AutoTokenizer, given a tokenizer_config.json without a class, asks config.json: not for "han_surgery"
        **({"tokenizer_class": tokenizer} if tokenizer else {}),
        HF_BASE_CONFIG_KEY: base_config,
        HF_RECIPE_KEY: recipe.to_dict(),
        "auto_map": transformers_auto_map(),
        "transformers_version": base_config.get("transformers_version"),
    }


def _tokenizer_class(base_config: dict[str, Any]) -> str | None:
    """The tokenizer class transformers' AutoTokenizer would pick for the base model's config, by name, or ``None``:
    the config's own ``tokenizer_class``, else the model type's in transformers' tokenizer mapping."""
    if isinstance(base_config.get("tokenizer_class"), str):
        return base_config["tokenizer_class"]
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    names = TOKENIZER_MAPPING_NAMES.get(base_config.get("model_type"))
    for name in names if isinstance(names, tuple) else (names,):  # (slow, fast) in earlier transformers
        if isinstance(name, str):
            return name
    return None


def transformers_base_config(config: dict[str, Any], source: str, overrides: dict[str, Any] | None = None) -> Any:
    """The base model's ``PretrainedConfig`` from a ``config.json`` dict: ``base_config`` of a hanified
    one, or the dict itself (folders of earlier versions).

    ``overrides``: keyword arguments of a ``from_pretrained`` call. Those that name a config attribute
    (``num_labels``, ``output_hidden_states``, ``attn_implementation``, ...) are set on the config and
    removed from the dict, by transformers' own rule (``PretrainedConfig.from_dict``), as
    ``from_pretrained`` does with a config it reads itself; the rest stay for the model.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if config.get("model_type") == HF_HANIFIED_MODEL_TYPE:
        config = config.get(HF_BASE_CONFIG_KEY)
        if not isinstance(config, dict):
            raise CheckpointError(f"{source}: '{HF_BASE_CONFIG_KEY}' must be the base model's config (an object)")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING or model_type == HF_HANIFIED_MODEL_TYPE:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not a transformers model type "
            f"(transformers {transformers.__version__})"
        )
    with config_build_errors(source, f"a {model_type} config"):  # e.g. transformers' strict field validation
        if not overrides:
            return CONFIG_MAPPING[model_type].from_dict(config)
        result, unused = CONFIG_MAPPING[model_type].from_dict(dict(config), return_unused_kwargs=True, **overrides)
        for key in set(overrides) - set(unused):
            del overrides[key]
        return result


def _to_saved_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype)``, except that a transformers model's buffers outside its state dict keep the dtype they
    were built in: a rotary embedding's ``inv_freq`` stays float32, as transformers' ``from_pretrained(dtype=...)``
    leaves it (cast to bfloat16, it moved a bf16 Llama's logits by up to 4e-3 from the saved model's). Gemma's
    ``embed_scale`` stays float32 too, where transformers has it in the model's dtype; its forward casts it."""
    keep = []
    if is_transformers_model(model):
        persistent = set(model.state_dict())
        keep = [(n, b) for n, b in model.named_buffers(remove_duplicate=False) if n not in persistent]
    model.to(dtype=dtype)
    for name, buffer in keep:
        _put_buffer(model, name, buffer)


def _put_buffer(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make ``tensor`` the buffer at the qualified ``name`` (its persistence unchanged)."""
    owner, _, leaf = name.rpartition(".")
    model.get_submodule(owner)._buffers[leaf] = tensor


def _load_weights(model: nn.Module, path: Path) -> None:
    """``safetensors.torch.load_model(model, path, strict=True)``, except that

    * each floating parameter and buffer first takes the dtype its tensor has in the file: a model saved in
      float16 can hold some weights in float32 (T5's ``wo``, which transformers' ``_keep_in_fp32_modules`` keeps
      so, and its ``from_pretrained`` loads so), and those must not be rounded to the one dtype
      ``han_config.json`` records;
    * a file holding several names of one tensor of the model (tied weights saved as separate copies, from a cast
      or gathered ``save_pretrained(state_dict=...)``: GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``,
      both written as transformers' ``save_pretrained`` writes them) loads one, the source of the tie, as
      transformers' ``from_pretrained`` does: the model ties them, so the others are aliases of it, not unexpected
      keys.

    Raises:
        SafetensorError: not a readable safetensors file.
        RuntimeError: missing or unexpected keys, or shapes that differ, as ``load_model`` says them.
    """
    state = safetensors.torch.load_file(str(path))
    own = model.state_dict()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for names in _aliases(own):
        present = sorted(n for n in names if n in state)
        keep = next((n for n in present if n not in tied), present[0]) if present else None
        for name in present:
            if name != keep:
                del state[name]
    # as load_model: a name of the model that shares its memory with one the file holds is loaded with it
    shared = safetensors.torch._remove_duplicate_names(own, preferred_names=list(state))
    loaded_with_another = {name for names in shared.values() for name in names}
    to_file_dtypes(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [n for n in missing if n not in loaded_with_another]
    if missing or unexpected:
        error = f"Error(s) in loading state_dict for {type(model).__name__}:"
        if missing:
            error += "\n    Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(missing))
        if unexpected:
            error += "\n    Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(unexpected))
        raise RuntimeError(error)


def _aliases(state_dict: dict[str, torch.Tensor]) -> list[set[str]]:
    """The groups of names under which ``state_dict`` holds one tensor (the same memory, shape and strides: tied
    weights), not those of tensors that merely share a storage."""
    groups: dict[tuple, set[str]] = {}
    for name, tensor in state_dict.items():
        if tensor.device.type != "meta" and tensor.numel():
            key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            groups.setdefault(key, set()).add(name)
    return [names for names in groups.values() if len(names) > 1]


def to_file_dtypes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each floating parameter and buffer of ``model`` the dtype of its (floating) tensor in ``state``, under
    any of its names, in place: a parameter stays the same ``Parameter`` (what is tied to it stays tied), a buffer
    that several modules hold is replaced by one tensor in all of them."""
    for kind in ("parameters", "buffers"):
        names: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for name, tensor in getattr(model, f"named_{kind}")(remove_duplicate=False):
            names.setdefault(id(tensor), []).append(name)
            tensors[id(tensor)] = tensor
        for key, tensor in tensors.items():
            value = next((state[n] for n in names[key] if n in state), None)
            floating = value is not None and tensor.is_floating_point() and value.is_floating_point()
            if not floating or tensor.dtype == value.dtype:
                continue
            if kind == "parameters":
                tensor.data = tensor.data.to(value.dtype)
                continue
            cast = tensor.to(value.dtype)
            for name in names[key]:
                _put_buffer(model, name, cast)


def _build_base(folder: ModelFolder, base: BaseModelSpec, *, empty: bool = False) -> nn.Module:
    """The base model, built from the folder's config. ``empty``: a transformers model's parameters are left on
    the meta device (accelerate's ``init_empty_weights``; buffers are built for real), as transformers' own
    ``from_pretrained`` builds it, so neither the dense weights nor their random init are ever computed. A timm
    model is always built with random init, as timm's own ``create_model(pretrained=True)`` builds it."""
    config_file = folder.path / CONFIG_NAME
    if base.library in ("timm", "transformers") and not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (the {base.library} base model's config)")
    if base.library == "transformers":
        import transformers

        config = transformers_base_config(folder.config, str(config_file))
        cls = getattr(transformers, base.name, None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise CheckpointError(f"{folder.path / HAN_CONFIG_NAME}: transformers has no model class {base.name!r}")
        with config_build_errors(config_file, base.name), empty_parameters() if empty else contextlib.nullcontext():
            model = cls(config)
        if empty:
            model.tie_weights()  # the constructor does not tie meta parameters
        return model
    if base.library == "timm":
        import timm

        pretrained_cfg, name, model_args = read_timm_config(folder.path)
        if name == TIMM_HANIFIED_ARCH:
            name = model_args.pop(TIMM_BASE_ARG, None)
            model_args.pop(TIMM_RECIPE_ARG, None)
            if name != base.name:
                raise CheckpointError(
                    f"{config_file}: model_args[{TIMM_BASE_ARG!r}] = {name!r}, but {HAN_CONFIG_NAME} "
                    f"was saved from {base.name!r}"
                )
        elif name != base.name:
            raise CheckpointError(
                f"{config_file}: architecture {name!r}, but {HAN_CONFIG_NAME} was saved from {base.name!r}"
            )
        pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if k not in ("file", "source")}
        with config_build_errors(config_file, name):
            return timm.create_model(name, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    raise CheckpointError(
        f"{folder.path} was saved from a {base.name} (neither timm nor transformers): "
        "build the base model yourself and pass it: from_pretrained(directory, model=MyModel(...))"
    )


@contextlib.contextmanager
def config_build_errors(config_file: str | Path, name: str) -> Iterator[None]:
    """A model's constructor failing on what ``config_file`` holds is a :class:`CheckpointError` naming the file,
    whatever it raises: a value of the wrong type (``TypeError``), heads that do not divide the width
    (``ValueError``, ``AssertionError``, ``ZeroDivisionError``), a negative size (``RuntimeError``), a mapping that
    is a string (``AttributeError``), a field transformers' strict config refuses, a :class:`ConfigError` of a
    han-surgery model. The exception is kept as the error's ``__cause__``. Running out of memory is not the
    file's fault and propagates, as does a :class:`CheckpointError` (it names its own file). A model class that
    needs a package that is not installed (LayoutLMv2: detectron2) is not the file's fault either: its
    ``ImportError`` becomes a :class:`CheckpointError` naming the folder and ``name``, with the whole message, its install hint
    included, on one line."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, CheckpointError):
        raise
    except ImportError as e:
        raise CheckpointError(
            f"{Path(config_file).parent}: {name} needs a package that is not installed: {' '.join(str(e).split())}"
        ) from e
    except Exception as e:
        detail = first_line(e) if isinstance(e, HanSurgeryError) else f"{type(e).__name__}: {first_line(e)}"
        raise CheckpointError(f"{config_file}: cannot build {name} from it ({detail})") from e


def empty_parameters() -> contextlib.AbstractContextManager:
    """Parameters registered inside are on the meta device; buffers are built for real."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def _rebuild_empty(folder: ModelFolder, recipe: Recipe, source: str) -> nn.Module | None:
    """The transformers base built with its parameters on the meta device and the recipe replayed on it (the rules'
    new parameters on meta too), the parameters then given uninitialised memory: the model ``from_pretrained``
    loads the weights into, without ever allocating the dense one. ``None`` when the replay does not work without
    the base's weights (a custom rule that reads their values, or computes a buffer from them): the caller then
    builds the base for real."""
    model = _build_base(folder, recipe.base, empty=True)
    _to_saved_dtype(model, getattr(torch, recipe.dtype))
    try:
        with empty_parameters():
            replay_remaining_steps(model, recipe.steps, source)
    except CheckpointError:
        raise
    except Exception:  # noqa: BLE001 (the same replay on the real base raises what is wrong, if anything is)
        return None
    if any(b.is_meta for b in model.buffers()):
        return None
    replace_parameters(model, lambda p: p.is_meta, lambda p: torch.empty_like(p, device="cpu"))
    return model


def replay_recipe(
    model: nn.Module,
    steps: Sequence[RecipeStep],
    source: str,
    *,
    path_map: Callable[[str], str | None] | None = None,
) -> nn.Module:
    """Apply the recorded ``hanify`` steps to a freshly built base model, rewriting exactly the recorded blocks.

    Args:
        model: the base model (built from its config, weights not loaded yet).
        steps: the recipe's steps (:attr:`Recipe.steps`), in order.
        source: what to name in errors (the file the recipe came from).
        path_map: maps a recorded path to the path in ``model`` (``None``: not in this model),
            e.g. to load a ``BertForSequenceClassification`` recipe into a ``BertModel``; the
            steps' include/exclude patterns are then not applied (the paths already say what they chose).

    Raises:
        CheckpointError: a step does not reproduce its rewrites (a rule renamed or not registered,
            another base model).
    """
    registered = {rule.name for rule in list_rules()}
    unknown = sorted({r.rule for step in steps for r in step.rewrites} - registered)
    if unknown:
        raise CheckpointError(
            f"{source}: the model was rewritten by rule(s) {unknown}, which are not registered in this process: "
            "import the code that registers them (register_rule) before loading"
        )
    for i, step in enumerate(steps):
        wanted = [(r.path if path_map is None else path_map(r.path), r.rule) for r in step.rewrites]
        wanted = [(p, rule) for p, rule in wanted if p is not None]
        if not wanted:
            continue
        paths = {p for p, _ in wanted}
        config = step.config if path_map is None else dataclasses.replace(step.config, include=(), exclude=())
        before = dict(model.named_modules())
        recorded = {id(m): len(recipe_of(m)) for m in before.values()}  # ``before`` keeps them (and their ids)
        report = hanify(model, config, filter_fn=lambda _m, p, paths=paths: p in paths)
        got = [(r.path, r.rule) for r in report.rewrites]
        if got != wanted:
            missing = sorted(set(wanted) - set(got))
            raise CheckpointError(
                f"{source}: step {i} of the recipe does not replay on the rebuilt {type(model).__name__}; "
                f"not reproduced: {missing[:5]}. (Is a custom rule not registered, or a different base model?)"
            )
        if step.calibration is not None:
            _keep_calibration_record(model, recorded, step.calibration)
        _share_again(model, step, report, before, source, path_map)
    return model


def _keep_calibration_record(model: nn.Module, recorded: dict[int, int], calibration: dict[str, Any]) -> None:
    """Give the step the replay just recorded the saved step's ``calibration`` record: the replaying ``hanify`` call
    ran without calibration and recorded none, so a calibrated model loaded and saved again lost it. On ``model``,
    and on each part inside that the step was recorded on too (a transformers model in a user's module): each module
    whose recipe is longer than ``recorded`` (``id(module)`` -> its number of steps before the replay) says."""
    for module in model.modules():
        steps = recipe_of(module)
        if len(steps) > recorded.get(id(module), 0):
            replace_last_step(module, dataclasses.replace(steps[-1], calibration=dict(calibration)))


def _share_again(
    model: nn.Module,
    step: RecipeStep,
    report: HanifyReport,
    before: dict[str, nn.Module],
    source: str,
    path_map: Callable[[str], str | None] | None,
) -> None:
    """A module that was shared under several paths when it was rewritten (its other paths are in the
    recorded ``swapped``) is shared again: a base rebuilt from its config holds a separate module at each
    other path, which the replay, rewriting the recorded paths only, left as it was. Each such path takes
    the replacement of the swapped path whose module had the same class (BERT's ``intermediate`` and
    ``output`` alike); none or several is a ``CheckpointError``."""
    replayed = {r.path: list(r.swapped) for r in report.rewrites}
    for entry in step.rewrites:
        path = entry.path if path_map is None else path_map(entry.path)
        if path is None:
            continue
        for recorded in entry.swapped:
            alias = recorded if path_map is None else path_map(recorded)
            if alias is None or alias in replayed[path]:
                continue
            there = before.get(alias)
            like = [p for p in replayed[path] if there is not None and type(before.get(p)) is type(there)]
            if len(like) != 1:
                found = "no module" if there is None else f"a {type(there).__name__}"
                raise CheckpointError(
                    f"{source}: {recorded} shared a module rewritten with {entry.path} when the model was saved, but "
                    f"the rebuilt {type(model).__name__} has {found} there: pass the model built as it was with model=..."
                )
            _set_module(model, alias, model.get_submodule(like[0]))


def replay_remaining_steps(model: nn.Module, steps: Sequence[RecipeStep], source: str) -> nn.Module:
    """:func:`replay_recipe` for the steps the freshly built ``model`` does not carry yet.

    A base whose constructor already hanifies (e.g. ``han_mobilevit_xxs``, registered with timm)
    carries the recipe's first steps: those are skipped, the rest replayed.

    Raises:
        CheckpointError: the steps ``model`` carries are not the first steps of ``steps``, or a
            remaining step does not replay.
    """
    done = [s.to_dict() for s in recipe_of(model)]
    if [s.to_dict() for s in steps[: len(done)]] != done:
        raise CheckpointError(
            f"{source}: the rebuilt base model {type(model).__name__} already carries a hanify recipe "
            "that is not a prefix of the saved one; pass the plain base model with model=..."
        )
    return replay_recipe(model, steps[len(done) :], source)


def _resolve_directory(source: str | Path, revision: str | None) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or not may_name_hub_repo(text):
        raise CheckpointError(f"from_pretrained: {source} is not a directory (nor a Hub repo id 'owner/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:  # JSON and safetensors only: a pickle is never even downloaded.
        return Path(snapshot_download(text, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.md"]))
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError) as e:
        at = f"@{revision}" if revision else ""
        raise CheckpointError(f"from_pretrained: {text}{at}: {first_line(e)}") from None


ModelT = TypeVar("ModelT", bound=nn.Module)


@overload
def from_pretrained(directory: str | Path, *, model: ModelT, revision: str | None = None) -> ModelT: ...


@overload
def from_pretrained(directory: str | Path, *, model: None = None, revision: str | None = None) -> nn.Module: ...


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
        The hanified model in ``eval()`` mode, on CPU, each tensor in the dtype ``model.safetensors`` holds it in:
        ``model`` itself when it is given.

    Raises:
        UnsafeCheckpointError: the directory only holds ``.bin``/``.pt`` files.
        CheckpointError: not a han-surgery directory, an unreadable file, or a recipe
            that does not replay (rules renamed, a custom rule not registered, another base model).
    """
    directory = _resolve_directory(directory, revision)
    folder = inspect_model_folder(directory)
    if folder.kind != "hanified":
        if folder.kind == "tabular":
            how = "han_surgery.load_model(folder) loads it (a network han-surgery finetune trained)"
        elif folder.kind == "timm" and is_han_timm_architecture(folder.config.get("architecture")):
            how = (
                f"its model, {folder.config['architecture']}, is built of Han-blocks already: load it with "
                f"timm.create_model('local-dir:{directory}', pretrained=True) or han_surgery.load_model(folder)"
            )
        else:
            how = "load it with its library, then call hanify"
        raise CheckpointError(
            f"{directory} has no {HAN_CONFIG_NAME}: it was not written by han_surgery.save_pretrained "
            f"(it is a plain {folder.kind} folder: {how})"
        )
    han_file = directory / HAN_CONFIG_NAME
    if not han_file.is_file():  # the recipe is in config.json (timm's save_for_hf of a hanified model)
        key = f"model_args[{TIMM_RECIPE_ARG!r}]" if folder.base_library == "timm" else repr(HF_RECIPE_KEY)
        han_file = f"{directory / CONFIG_NAME} ({key})"
    recipe = Recipe.from_dict(folder.han_config, str(han_file))
    if not (directory / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{directory / WEIGHTS_NAME}: missing")
    built = (
        _rebuild_empty(folder, recipe, str(han_file))
        if model is None and recipe.base.library == "transformers"
        else None
    )
    if built is not None:
        model = built
    else:
        if model is None:
            model = _build_base(folder, recipe.base)
        _to_saved_dtype(model, getattr(torch, recipe.dtype))
        replay_remaining_steps(model, recipe.steps, str(han_file))
    try:
        _load_weights(model, directory / WEIGHTS_NAME)
    except SafetensorError as e:
        raise CheckpointError(f"{directory / WEIGHTS_NAME}: not a readable safetensors file ({e})") from None
    except RuntimeError as e:  # missing / unexpected keys, shape mismatches
        stale = folder.config and recipe_in_config(folder.config) is None and (directory / HAN_CONFIG_NAME).is_file()
        hint = (
            f". {CONFIG_NAME} is a plain config: if the library's own save_pretrained / save_for_hf wrote it and the "
            f"weights again, {HAN_CONFIG_NAME} is left from an earlier save; delete it and load the folder with "
            "that library"
            if stale
            else ""
        )
        raise CheckpointError(f"{directory / WEIGHTS_NAME}: does not fit the rebuilt model ({e}){hint}") from None
    _load_generation_config(model, directory)
    return model.eval()
