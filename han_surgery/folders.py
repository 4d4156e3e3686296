"""What a model folder holds: the one place that decides it.

``han-surgery inspect``/``hanify``, ``finetune --model`` and :func:`han_surgery.from_pretrained`
all call :func:`inspect_model_folder`, which reads only JSON (never a pickle) and answers:

=================  =====================================================================
kind               the folder holds
=================  =====================================================================
``"hanified"``     ``han_config.json`` (written by :func:`han_surgery.save_pretrained`), or a
                   timm ``config.json`` naming :data:`TIMM_HANIFIED_ARCH` with the recipe in
                   ``model_args`` (timm's ``save_for_hf`` of a hanified model): a base model
                   plus the recipe that rewrote it; ``base_library`` says whose. Where both
                   record a recipe and they differ (a folder saved twice), a ``CheckpointError``
``"timm"``         a timm ``config.json`` with ``architecture`` (``save_for_hf``)
``"transformers"`` a transformers ``config.json`` with ``model_type`` (``save_pretrained``)
``"tabular"``      a ``config.json`` with ``han_surgery_tabular`` (the fine-tune command's
                   small tabular networks, :class:`han_surgery.models.TabularNet`)
=================  =====================================================================

A hanified timm model's ``config.json`` names the architecture :data:`TIMM_HANIFIED_ARCH` (a timm
entry point ``import han_surgery`` registers), its base in ``model_args["han_base"]`` and the recipe in
``model_args["han_recipe"]``, so ``timm.create_model("local-dir:<dir>", pretrained=True)`` rebuilds it.
A hanified transformers model's ``config.json`` has ``model_type`` :data:`HF_HANIFIED_MODEL_TYPE`
(registered with ``AutoConfig`` by ``import han_surgery``), the base model's config in
``base_config`` and the recipe in ``han_recipe``. ``model_args`` go to ``timm.create_model``; :func:`checked_timm_model_args` lets through only
constructor arguments with plain JSON values (never ``checkpoint_path`` and the other arguments
with which timm's loaders fetch or read files).

A folder whose weights are only pickles (``pytorch_model.bin``, ``*.pt``, ...) is refused
with :class:`~han_surgery.errors.UnsafeCheckpointError`; an unreadable or unrecognised one with
:class:`~han_surgery.errors.CheckpointError`, whose message names the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "TIMM_HANIFIED_ARCH",
    "TIMM_BASE_ARG",
    "TIMM_RECIPE_ARG",
    "HF_HANIFIED_MODEL_TYPE",
    "HF_BASE_CONFIG_KEY",
    "HF_RECIPE_KEY",
    "HF_REMOTE_CODE_MODULE",
    "transformers_auto_map",
    "transformers_remote_code",
    "checked_timm_model_args",
    "check_timm_wrapper",
    "checked_transformers_model_kwargs",
    "read_timm_config",
    "may_name_hub_repo",
    "WEIGHTS_NAME",
    "SHARDED_WEIGHTS_INDEX",
    "CONFIG_NAME",
    "GENERATION_CONFIG_NAME",
    "HAN_CONFIG_NAME",
    "CARD_NAME",
    "TABULAR_CONFIG_KEY",
    "PICKLE_SUFFIXES",
    "FolderKind",
    "ModelFolder",
    "inspect_model_folder",
    "recipe_in_config",
    "shard_files",
    "read_json_object",
    "refuse_pickles",
]

WEIGHTS_NAME = "model.safetensors"
SHARDED_WEIGHTS_INDEX = "model.safetensors.index.json"  # transformers' save_pretrained(max_shard_size=...)
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
HAN_CONFIG_NAME = "han_config.json"
CARD_NAME = "README.md"  # the model card (huggingface_hub's ModelCard), written last: a folder with one is complete
TABULAR_CONFIG_KEY = "han_surgery_tabular"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

TIMM_HANIFIED_ARCH = "hanified"
TIMM_BASE_ARG = "han_base"
TIMM_RECIPE_ARG = "han_recipe"
HF_HANIFIED_MODEL_TYPE = "han_surgery"
HF_BASE_CONFIG_KEY = "base_config"
HF_RECIPE_KEY = "han_recipe"
HF_REMOTE_CODE_MODULE = "han_surgery_auto"

FolderKind = Literal["hanified", "timm", "transformers", "tabular"]


def may_name_hub_repo(spec: str) -> bool:
    """Whether ``spec`` (no existing path) has the shape of a Hub repo id ``owner/name`` rather than of a local path:
    one ``/``, and not starting with ``.``, ``/`` or ``~``. Shape only: :func:`huggingface_hub.utils.validate_repo_id`
    has the Hub's own rules."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def read_json_object(path: str | Path) -> dict[str, Any]:
    """Parse ``path`` as a JSON object; any problem raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value


def refuse_pickles(directory: Path) -> None:
    """Raise :class:`UnsafeCheckpointError` if ``directory`` has pickle weights but no safetensors weights
    (``model.safetensors``, or the index of its shards)."""
    if (directory / WEIGHTS_NAME).is_file() or (directory / SHARDED_WEIGHTS_INDEX).is_file():
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(
            f"{directory} holds only pickle-based weights ({', '.join(pickles)}) and no {WEIGHTS_NAME}. "
            "han-surgery never unpickles files (loading a pickle can run arbitrary code). Convert them to "
            "safetensors in an environment you trust, e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')."
        )


def _timm_loader_parameters() -> frozenset[str]:
    """Every argument of timm's own loading machinery (where and how weights are fetched and read):
    read from the signatures of ``create_model`` and ``build_model_with_cfg`` (through which every
    keyword reaches the model's constructor), so an argument a later timm adds is covered too, plus
    the keys ``build_model_with_cfg`` pops."""
    import inspect

    from timm.models import build_model_with_cfg, create_model

    names = {"features_only", "feature_cls", "out_indices", "pruned", "device", "dtype"}
    for fn in (create_model, build_model_with_cfg):
        names.update(
            p.name for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD
        )
    return frozenset(names - {"model_name", "model_cls", "variant"})


def _auto_model_class_names() -> list[str]:
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    return [
        name
        for name in sorted(dir(modeling_auto))
        if name.startswith("AutoModel")
        and isinstance(getattr(modeling_auto, name), type)
        and issubclass(getattr(modeling_auto, name), _BaseAutoModelClass)
    ]


def transformers_auto_map() -> dict[str, str]:
    """``config.json``'s ``auto_map`` of a hanified transformers model: ``AutoConfig`` and every
    ``AutoModel*`` class -> ``han_surgery_auto.Hanified<AutoClass>`` (the classes
    :mod:`han_surgery.integrations.transformers` registers under the same names)."""
    names = ["AutoConfig", *_auto_model_class_names()]
    return {
        name: f"{HF_REMOTE_CODE_MODULE}.{'HanifiedConfig' if name == 'AutoConfig' else 'Hanified' + name}"
        for name in names
    }


def transformers_remote_code(version: str) -> str:
    """The text of ``han_surgery_auto.py``, written next to a hanified transformers model's ``config.json``.

    It only re-exports the classes of the installed han-surgery (generated here, never copied), for
    the Hub's custom-code convention: ``AutoModel.from_pretrained(dir, trust_remote_code=True)``
    then works without ``import han_surgery``, and without han-surgery installed transformers stops
    with ``ImportError: ... requires ... han_surgery. Run `pip install han_surgery```.

    The classes are looked up by name, so the file imports where the installed han-surgery (or transformers) lacks
    one of the ``AutoModel*`` classes of the saving one: only that class is then missing.
    """
    classes = sorted({ref.split(".", 1)[1] for ref in transformers_auto_map().values()})
    lines = [
        f"# Generated by han-surgery {version}; do not edit. Loading this model needs the han-surgery package:",
        "#     pip install han-surgery",
        "# then `import han_surgery` and load it with trust_remote_code=False (no code from this folder runs),",
        "# or pass trust_remote_code=True to let transformers import han-surgery through this file.",
        "from han_surgery.integrations import transformers as _han_surgery",
        "",
        f"_NAMES = {classes!r}",
        "globals().update({name: getattr(_han_surgery, name) for name in _NAMES if hasattr(_han_surgery, name)})",
    ]
    return "\n".join(lines) + "\n"


def _plain_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json(v) for k, v in value.items())
    return False


#: Loading arguments that timm's ``create_model`` keeps in ``model._model_args`` and ``save_for_hf`` then writes
#: into ``model_args`` (a model loaded with ``pretrained_strict=True``): allowed with these values, which are
#: timm's defaults (a folder that says ``pretrained_strict: false`` would load with weights missing, unsaid).
TIMM_SAVED_LOAD_ARGS: dict[str, tuple[Any, ...]] = {"pretrained_strict": (True,), "features_only": (False,)}


def checked_timm_model_args(
    model_args: Any, source: str, *, keep: tuple[str, ...] = (), name: str = "model_args"
) -> dict[str, Any]:
    """The ``model_args`` of a timm ``config.json`` that may go to ``timm.create_model``.

    ``create_model(name, **model_args)`` hands every key either to timm's loaders (``pretrained``,
    ``pretrained_cfg``, ``checkpoint_path``, ``cache_dir``, ... -- they read or download files) or
    to the model's constructor. Only the latter are allowed: a key that names an argument of
    timm's loading functions, a key that is not an identifier, or a value that is not plain JSON
    data raises :class:`CheckpointError` naming ``source``. ``keep`` names han-surgery's own keys,
    returned untouched (``han_base``, ``han_recipe``). ``name`` is what the messages call ``model_args``
    (``finetune --model-kwargs`` goes through the same check).

    Raises:
        CheckpointError: ``model_args`` is not an object, or holds a key that is not allowed.
    """
    if not isinstance(model_args, dict):
        raise CheckpointError(f"{source}: '{name}' must be a JSON object, found a {type(model_args).__name__}")
    loader = _timm_loader_parameters()
    for key, value in model_args.items():
        if key in keep or (
            key in TIMM_SAVED_LOAD_ARGS and isinstance(value, bool) and value in TIMM_SAVED_LOAD_ARGS[key]
        ):
            continue
        if not (isinstance(key, str) and key.isidentifier()) or key in loader:
            raise CheckpointError(
                f"{source}: {name}[{key!r}] is not a model constructor argument (timm would use it to locate "
                f"or load weights); han-surgery only passes constructor arguments to timm.create_model. Remove it."
            )
        if not _plain_json(value):
            raise CheckpointError(f"{source}: {name}[{key!r}] is not plain JSON data: {value!r:.80}")
    return dict(model_args)


#: Keys of a transformers ``config.json`` that describe the file, not the model: never model keyword arguments.
_TRANSFORMERS_META_KEYS = frozenset(
    {"architectures", "auto_map", "model_type", "transformers_version", "_name_or_path"}
)


#: Keys ``from_pretrained`` takes as loading arguments (dtype, attention kernel, quantization), or that change
#: what the model returns (tuples instead of outputs, extra states): never ``--model-kwargs``, even where a
#: config.json holds them.
_TRANSFORMERS_LOADING_KEYS = frozenset(
    {"dtype", "torch_dtype", "attn_implementation", "_attn_implementation", "quantization_config", "return_dict",
     "output_hidden_states", "output_attentions", "torchscript", "device_map"}
)  # fmt: skip


def _config_class_settings(model_type: Any) -> set[str]:
    """The settings particular to transformers' config class for ``model_type`` (``classifier_dropout`` of a
    ``BertConfig``), not those every ``PretrainedConfig`` has; none for a type it does not know."""
    if not isinstance(model_type, str):
        return set()
    from transformers import AutoConfig, PretrainedConfig

    try:
        return set(AutoConfig.for_model(model_type).to_dict()) - set(PretrainedConfig().to_dict())
    except Exception:  # noqa: BLE001 (an unknown type, or a config class that needs arguments: none known)
        return set()


def checked_transformers_model_kwargs(
    model_kwargs: dict[str, Any], config: dict[str, Any], source: str
) -> dict[str, Any]:
    """The keyword arguments ``finetune --model-kwargs`` may pass to ``from_pretrained`` of a transformers folder.

    ``from_pretrained(dir, **kwargs)`` gives a key that is a config attribute to the config and every other
    key to its own loading machinery (``cache_dir``, ``revision``, ``from_tf``, ``state_dict``,
    ``trust_remote_code``, ...) or the model's constructor. Only config overrides are allowed: keys of the
    folder's ``config.json`` (of its ``base_config`` for a hanified folder) or settings its ``model_type``'s
    config class has (``classifier_dropout`` of a ``BertConfig``, which ``save_pretrained`` leaves out of the
    file at its default), with plain JSON values.

    Raises:
        CheckpointError: a key that is not a config attribute, or a value that is not plain JSON data.
    """
    base = config.get(HF_BASE_CONFIG_KEY)
    saved = base if isinstance(base, dict) else config
    allowed = set(saved) | _config_class_settings(saved.get("model_type"))
    allowed -= _TRANSFORMERS_META_KEYS | _TRANSFORMERS_LOADING_KEYS
    for key, value in model_kwargs.items():
        if key in _TRANSFORMERS_LOADING_KEYS:
            raise CheckpointError(
                f"{source}: --model-kwargs[{key!r}] is one of from_pretrained's loading or output arguments (dtype, "
                "attention kernel, quantization, what the model returns), not a setting of the model. Remove it."
            )
        if key not in allowed:
            raise CheckpointError(
                f"{source}: --model-kwargs[{key!r}] is not a setting of the model's config.json; for a transformers "
                f"folder han-surgery only passes config overrides (such as hidden_dropout_prob) to from_pretrained. "
                "Remove it."
            )
        if not _plain_json(value):
            raise CheckpointError(f"{source}: --model-kwargs[{key!r}] is not plain JSON data: {value!r:.80}")
    return dict(model_kwargs)


def read_timm_config(directory: str | Path) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """``(pretrained_cfg, architecture, model_args)`` of a timm ``config.json``, as timm's
    ``load_model_config_from_path`` reads it, with ``model_args`` checked by
    :func:`checked_timm_model_args` (han-surgery's ``han_base`` / ``han_recipe`` kept as they are).

    Raises:
        CheckpointError: the file is missing or malformed, its architecture is not a registered timm model name
            (``local-dir:<elsewhere>`` or ``hf-hub:<repo>`` would make timm read another folder or the Hub), or
            ``model_args`` holds a key that is not allowed.
    """
    from timm.models._hub import _parse_model_cfg

    path = Path(directory) / CONFIG_NAME
    config = read_json_object(path)
    name = config.get("architecture")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{path}: no 'architecture' naming the timm model")
    try:
        pretrained_cfg, name, model_args = _parse_model_cfg(config, {"file": str(path.parent), "source": "local-dir"})
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a timm model config ({type(e).__name__}: {e})") from None
    if not _is_timm_name(name):
        raise CheckpointError(f"{path}: architecture {name!r} is not a timm model name")
    keep = (TIMM_BASE_ARG, TIMM_RECIPE_ARG) if name == TIMM_HANIFIED_ARCH else ()
    return pretrained_cfg, name, checked_timm_model_args(model_args, str(path), keep=keep)


@dataclass(frozen=True)
class ModelFolder:
    """A model folder, as :func:`inspect_model_folder` found it.

    Attributes:
        path: the folder.
        kind: see the module docstring.
        config: the parsed ``config.json`` (``{}`` if a hanified folder of a custom model has none).
        han_config: the recipe (hanified folders only): the parsed ``han_config.json``, or, in a folder
            timm's ``save_for_hf`` wrote of a hanified model, ``config.json``'s ``model_args["han_recipe"]`` (in a
            hanified transformers folder without ``han_config.json``, its ``"han_recipe"``).
        base_library: hanified folders: ``"timm"``, ``"transformers"``, ``"tabular"`` or ``None``
            (a custom ``nn.Module``); otherwise equal to ``kind``.
    """

    path: Path
    kind: FolderKind
    config: dict[str, Any] = field(default_factory=dict)
    han_config: dict[str, Any] | None = None
    base_library: str | None = None


def _config_kind(config: dict[str, Any]) -> str | None:
    if TABULAR_CONFIG_KEY in config:
        return "tabular"
    if "architecture" in config:
        return "timm"
    if "model_type" in config:
        return "transformers"
    return None


def shard_files(directory: Path) -> list[Path]:
    """The shards that ``directory``'s ``model.safetensors.index.json`` lists, sorted (file names in the folder only).

    Raises:
        CheckpointError: the index is unreadable, names no shard, or names something other than a file name.
    """
    index = directory / SHARDED_WEIGHTS_INDEX
    weight_map = read_json_object(index).get("weight_map")
    names = set(weight_map.values()) if isinstance(weight_map, dict) else set()
    if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files in this folder")
    return [directory / name for name in sorted(names)]


def recipe_in_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe a hanified ``config.json`` carries: timm's (``model_args["han_recipe"]``) or transformers'
    (``"han_recipe"`` beside ``model_type = "han_surgery"``); ``None`` for any other config."""
    if config.get("architecture") == TIMM_HANIFIED_ARCH and isinstance(config.get("model_args"), dict):
        recipe = config["model_args"].get(TIMM_RECIPE_ARG)
    elif config.get("model_type") == HF_HANIFIED_MODEL_TYPE:
        recipe = config.get(HF_RECIPE_KEY)
    else:
        return None
    return recipe if isinstance(recipe, dict) else None


def _is_timm_name(name: Any) -> bool:
    """Whether ``name`` is a registered timm model name: not ``hf-hub:...`` / ``local-dir:...``, which would make
    timm read another folder or the Hub."""
    import timm

    return isinstance(name, str) and ":" not in name and timm.is_model(name)


def check_timm_wrapper(config: Any, source: str) -> None:
    """transformers' ``timm_wrapper`` config hands its ``architecture`` and ``model_args`` to ``timm.create_model``
    when the model is built: the same checks as a timm folder's (no ``checkpoint_path`` for timm to load, no
    ``local-dir:`` / ``hf-hub:`` name)."""
    if not isinstance(config, dict) or config.get("model_type") != "timm_wrapper":
        return
    name = config.get("architecture")
    if not _is_timm_name(name):
        raise CheckpointError(f"{source}: timm_wrapper architecture {name!r} is not a timm model name")
    checked_timm_model_args(config.get("model_args") or {}, source)


def inspect_model_folder(path: str | Path) -> ModelFolder:
    """Decide what the folder ``path`` holds (see the module docstring); reads JSON files only.

    Raises:
        CheckpointError: not a folder, unreadable JSON, or a folder no loader recognises.
        UnsafeCheckpointError: only pickle weights.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a folder")
    refuse_pickles(directory)
    config_file = directory / CONFIG_NAME
    config = read_json_object(config_file) if config_file.is_file() else {}
    for transformers_config in (config, config.get(HF_BASE_CONFIG_KEY)):
        check_timm_wrapper(transformers_config, str(config_file))
    han_file = directory / HAN_CONFIG_NAME
    if han_file.is_file():
        han_config = read_json_object(han_file)
        embedded = recipe_in_config(config)
        if embedded is not None and any(han_config.get(k) != embedded.get(k) for k in ("base", "recipe")):
            raise CheckpointError(
                f"{han_file}: its recipe is not the one in {config_file}, which timm's and transformers' loaders "
                f"read: the folder was saved twice (timm's save_for_hf and push_to_hf_hub leave {HAN_CONFIG_NAME} "
                f"as it was). Delete {HAN_CONFIG_NAME} if {CONFIG_NAME} and the weights are the later save"
            )
        base = han_config.get("base")
        library = base.get("library") if isinstance(base, dict) else None
        if _config_kind(config) == "tabular":
            library = "tabular"
        return ModelFolder(directory, "hanified", config, han_config, library)
    recipe = recipe_in_config(config)
    if recipe is not None:  # timm's save_for_hf of a hanified model, or a transformers one without han_config.json
        library = "timm" if config.get("architecture") == TIMM_HANIFIED_ARCH else "transformers"
        return ModelFolder(directory, "hanified", config, recipe, library)
    if not config_file.is_file():
        raise CheckpointError(
            f"{directory}: no {CONFIG_NAME} and no {HAN_CONFIG_NAME}: expected a folder written by "
            "han_surgery.save_pretrained, timm's save_for_hf or transformers' save_pretrained"
        )
    kind = _config_kind(config)
    if kind is None:
        raise CheckpointError(
            f"{config_file}: neither a timm config ('architecture'), a transformers config ('model_type') nor a "
            f"han-surgery tabular config ('{TABULAR_CONFIG_KEY}'); which library wrote this folder?"
        )
    return ModelFolder(directory, kind, config, None, kind)  # type: ignore[arg-type]
