"""Hanified transformers models load with transformers' own Auto classes once ``han_surgery`` is imported.

:func:`han_surgery.save_pretrained` writes a hanified transformers model's ``config.json`` with
``model_type = "han_surgery"``, the base model's config in ``base_config`` and the recipe in
``han_recipe``. Importing this module registers

* :class:`HanifiedConfig` with ``AutoConfig`` for that model type, and
* for every ``AutoModel*`` class (``AutoModel``, ``AutoModelForSequenceClassification``,
  ``AutoModelForCausalLM``, ...) a small dispatcher that picks the class that Auto class would pick
  for the *base* config (``BertModel``, ``BertForSequenceClassification``, ...) and loads
  ``Hanified<Class>``: that class, whose ``__init__`` replays the recipe after building the base
  layers, so transformers' ``from_pretrained`` (dtype, device map, head/base prefixes, tied
  weights, ...) loads ``model.safetensors`` into the Han modules.

So ``AutoModel.from_pretrained(dir)``, ``AutoModelForSequenceClassification.from_pretrained(dir)``
and ``pipeline("feature-extraction", model=dir)`` work with ``trust_remote_code=False``: no code
from the folder runs. A recipe recorded on a task model (paths ``bert.encoder...``) replays on
the base model (``encoder...``) and the other way round. ``save_pretrained`` of a ``Hanified*``
model writes the same folder again.

Dtypes are transformers' too: it loads a model in one dtype (the config's, or ``dtype=...``), as it loads any
folder, so a model saved with tensors of several dtypes (a bfloat16 body with a float32 classifier) comes back
with every tensor in that one dtype: the float32 ones rounded, unless ``dtype=torch.float32`` is passed.
:func:`han_surgery.from_pretrained` keeps each tensor in the dtype the file holds it in.
"""

from __future__ import annotations

import copy
import copyreg
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from safetensors import SafetensorError
from torch import nn
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto import configuration_auto, modeling_auto
from transformers.models.auto.auto_factory import _BaseAutoModelClass, _get_model_class

from ..errors import CheckpointError, ConfigError
from ..folders import (
    HF_BASE_CONFIG_KEY,
    HF_HANIFIED_MODEL_TYPE,
    HF_RECIPE_KEY,
    WEIGHTS_NAME,
    check_timm_wrapper,
    transformers_auto_map,
)
from ..surgery.engine import register_hanify_hook
from ..surgery.recipe import Recipe, record_last_step_on_parts
from ..surgery.serialization import replay_recipe, save_pretrained, transformers_base_config
from ..utils import is_transformers_model

if TYPE_CHECKING:  # importing transformers' PreTrainedModel also imports accelerate: not at `import han_surgery`
    from transformers import PreTrainedModel

__all__ = ["HanifiedConfig", "hanified_class", "AUTO_CLASSES", "DISPATCHERS"]


class HanifiedConfig(PreTrainedConfig):
    """The ``config.json`` of a hanified transformers model: the base model's config and the recipe.

    It reads and edits like the base model's config: a field only the base config has (``hidden_size``,
    ``hidden_dropout_prob``) reads from ``base_config`` and an assignment to it is written there; a field both
    have (``output_hidden_states``, ``return_dict``, ``id2label``, ...) reads as the base's, and an edit to it is
    applied to the base config when a model is built (:meth:`base_model_config`) and saved (:meth:`to_dict`).

    Attributes:
        base_config: the base model's config as a dict (``model_type``, ``architectures``, ...).
        han_recipe: the :class:`~han_surgery.surgery.recipe.Recipe` (the content of ``han_config.json``).
    """

    model_type = HF_HANIFIED_MODEL_TYPE
    base_config: dict | None = None
    han_recipe: dict | None = None

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """transformers' ``from_dict``, with the keyword arguments that name a config attribute
        (``num_labels``, ``id2label``, ``output_hidden_states``, ``hidden_dropout_prob``, ...) applied to the
        *base* model's config, by transformers' own rule: so ``AutoModelFor*.from_pretrained(dir, num_labels=5)``
        and ``AutoConfig.from_pretrained(dir, num_labels=5)`` do what they do on a plain folder.
        ``attn_implementation`` and the loading's own arguments (``dtype``, ...) are left to ``from_pretrained``."""
        return_unused = kwargs.pop("return_unused_kwargs", False)
        base = config_dict.get(HF_BASE_CONFIG_KEY)
        offered = {k: v for k, v in kwargs.items() if k not in _LOADING_KWARGS and k not in _PASSED_ON_KWARGS}
        chosen = None
        if isinstance(base, dict) and offered:
            unused = dict(offered)
            applied = transformers_base_config(base, "config.json", unused)
            if len(unused) < len(offered):
                config_dict = {**config_dict, HF_BASE_CONFIG_KEY: applied.to_dict()}
                # what output_attentions=True chose (eager): to_dict drops it, and it is this load's, never saved
                chosen = getattr(applied, "_attn_implementation_internal", None)
            kwargs = {k: v for k, v in kwargs.items() if k not in offered or k in unused}
        passed_on = {k: kwargs.pop(k) for k in _PASSED_ON_KWARGS if k in kwargs}
        config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
        if chosen is not None:
            config._base_attn_implementation = chosen
        return (config, {**unused, **passed_on}) if return_unused else config

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        base = self.base_config if isinstance(self.base_config, dict) else {}
        # the fields both configs have read as the base model's, and edits to them count
        shared = [key for key in base if key in vars(self) and key not in _OWN_FIELDS]
        for key in shared:
            setattr(self, key, copy.deepcopy(base[key]))
        self._mirrored = {key: copy.deepcopy(getattr(self, key)) for key in (*shared, *_EDITABLE_PROPERTIES)}

    def __getattr__(self, key: str) -> Any:
        """A field only the base config has reads from it, as the base config reads it: ``config.hidden_size``
        (GPT-2's ``n_embd``, through its ``attribute_map``), ``config.decoder`` (a sub-config, as a config)."""
        base = self.__dict__.get(HF_BASE_CONFIG_KEY)
        if not key.startswith("_") and isinstance(base, dict):
            built = self._built_base(base)
            if built is not None and hasattr(built, key):
                return getattr(built, key)
            if key in base:
                return base[key]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def _built_base(self, base: dict[str, Any]) -> PreTrainedConfig | None:
        """``base`` as its config class builds it (cached while ``base_config`` is unchanged); ``None`` if it does
        not build (an unknown model type)."""
        cached = self.__dict__.get("_base_built")
        if cached is not None and cached[0] == base:
            return cached[1]
        try:
            built = transformers_base_config(base, "config.json")
        except Exception:  # noqa: BLE001 (read the dict as it is)
            built = None
        self.__dict__["_base_built"] = (copy.deepcopy(base), built)
        return built

    def __setattr__(self, key: str, value: Any) -> None:
        """An assignment to a field only the base config has (``config.hidden_dropout_prob = 0.5``, GPT-2's
        ``config.hidden_size``, its ``n_embd``) goes there; one to a field both have is an edit, even to the value it
        holds (applied to the base config by :meth:`base_model_config` and :meth:`to_dict`)."""
        base = self.__dict__.get(HF_BASE_CONFIG_KEY)
        built = "_mirrored" in self.__dict__  # not while transformers' __init__ / __post_init__ set the fields
        if built and key in self.__dict__["_mirrored"]:
            self.__dict__.setdefault("_assigned", set()).add(key)
        if built and isinstance(base, dict) and key not in self.__dict__ and key not in _OWN_FIELDS:
            if not isinstance(getattr(type(self), key, None), property):
                built_base = self._built_base(base)
                name = built_base.attribute_map.get(key, key) if built_base is not None else key
                if name in base:
                    self.__dict__[HF_BASE_CONFIG_KEY] = {**base, name: value}
                    return
        super().__setattr__(key, value)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for private in ("_mirrored", "_assigned", "_base_built", "_base_attn_implementation"):
            output.pop(private, None)
        if isinstance(output.get(HF_BASE_CONFIG_KEY), dict):  # an edit to the labels is saved where it is read
            output[HF_BASE_CONFIG_KEY] = {**output[HF_BASE_CONFIG_KEY], **self._edited_fields()}
        return output

    def _edited_fields(self) -> dict[str, Any]:
        """The fields both configs have that were changed on this one since it was built (``config.num_labels =
        5``, ``config.output_hidden_states = True``)."""
        mirrored, assigned = self.__dict__.get("_mirrored", {}), self.__dict__.get("_assigned", set())
        return {
            key: getattr(self, key) for key, value in mirrored.items() if key in assigned or getattr(self, key) != value
        }

    def base_model_config(self, source: str = "config.json") -> PreTrainedConfig:
        """The base model's ``PretrainedConfig``, carrying the recipe (``han_recipe``) for ``Hanified*.__init__``.

        An edit to a field both configs have counts (``config.num_labels = 5``, ``config.output_hidden_states =
        True``), as does one to a field only the base has (``config.hidden_dropout_prob = 0.5``, written to
        ``base_config``)."""
        if not isinstance(self.base_config, dict) or not isinstance(self.han_recipe, dict):
            raise CheckpointError(
                f"{source}: a '{HF_HANIFIED_MODEL_TYPE}' config needs '{HF_BASE_CONFIG_KEY}' and '{HF_RECIPE_KEY}' "
                "objects (written by han_surgery.save_pretrained); a plain transformers folder loads with its own "
                "class or AutoModel*, and then han_surgery.hanify rewrites it"
            )
        chosen = getattr(self, "_base_attn_implementation", None)
        attn = {"attn_implementation": chosen} if chosen is not None else {}
        check_timm_wrapper(self.base_config, source)  # as han_surgery's own loader does (no checkpoint_path)
        base = transformers_base_config({**self.base_config, **self._edited_fields(), **attn}, source)
        setattr(base, HF_RECIPE_KEY, self.han_recipe)
        return base


_OWN_FIELDS = frozenset(
    {"model_type", "architectures", "transformers_version", "auto_map", "dtype", "torch_dtype", "tokenizer_class"}
    | {"_name_or_path", "_commit_hash", HF_BASE_CONFIG_KEY, HF_RECIPE_KEY}
)
"""Fields of a :class:`HanifiedConfig` that describe the hanified folder itself, never mirrored from its base config."""

_EDITABLE_PROPERTIES = ("output_attentions",)
"""Properties of every config whose edits on a :class:`HanifiedConfig` are applied to its base config (their value
is not copied from the base: setting ``output_attentions`` also chooses the attention implementation)."""

_LOADING_KWARGS = frozenset({"dtype", "torch_dtype", "quantization_config", "_from_auto", "_from_pipeline"})
"""``from_pretrained`` arguments that also name config fields but belong to the loading (as in transformers)."""

_PASSED_ON_KWARGS = ("attn_implementation", "experts_implementation")
"""Config arguments that transformers' ``from_pretrained`` sets on the config it is given: passed on to it."""


def _path_map(model: nn.Module, paths: list[str]):
    """Map recipe paths recorded on a task model (``bert.encoder...``) to a base model and back."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return None
    saved_on_head = bool(paths) and all(p.startswith(prefix + ".") for p in paths)
    is_head = isinstance(getattr(model, prefix, None), nn.Module)
    if saved_on_head and not is_head:
        return lambda p: p[len(prefix) + 1 :] if p.startswith(prefix + ".") else None
    if is_head and not saved_on_head:
        return lambda p: f"{prefix}.{p}"
    return None


def _in_part(model: nn.Module, path_map: Callable[[str], str | None] | None) -> Callable[[str], str | None]:
    """``path_map``, also dropping the recorded paths in a part of the saved model that ``model`` does not have
    (the decoder, for ``AutoModelForTextEncoding`` of a T5 model; the encoder, for ``AutoModelForCausalLM`` of a
    BART one; the layers a config override such as ``num_hidden_layers=1`` leaves out), as transformers ignores
    those weights. A path whose parent module is there must still replay."""
    modules = {name for name, _ in model.named_modules()}

    def mapped(path: str) -> str | None:
        path = path if path_map is None else path_map(path)
        if path is None or (path not in modules and path.rpartition(".")[0] not in modules):
            return None
        return path

    return mapped


class _Hanified:
    """Mixed into ``Hanified<Base>``: replays the recipe carried by the config after the base ``__init__``."""

    _han_base: type  # the transformers class this one extends (set by hanified_class)

    def __init__(self, config: PreTrainedConfig, *args: Any, **kwargs: Any) -> None:
        if getattr(config, HF_RECIPE_KEY, None) is None:
            base = type(self)._han_base
            raise ConfigError(
                f"{type(self).__qualname__}(config): the config carries no han-surgery recipe ({HF_RECIPE_KEY!r}). "
                f"Build {base.__name__}(config) and call han_surgery.hanify on it, or load a hanified folder "
                f"with {type(self).__qualname__}.from_pretrained / AutoModel*.from_pretrained"
            )
        super().__init__(config, *args, **kwargs)
        folder = getattr(config, "_name_or_path", "") or "."
        source = f"{Path(folder) / 'config.json'} ({HF_RECIPE_KEY})"
        recipe = Recipe.from_dict(getattr(config, HF_RECIPE_KEY), source)
        paths = [r.path for step in recipe.steps for r in step.rewrites]
        # a part of the saved model (T5EncoderModel of a T5 seq2seq model), or fewer layers (num_hidden_layers=1)
        path_map = _in_part(self, _path_map(self, paths))
        if paths and all(path_map(p) is None for p in paths):
            warnings.warn(
                f"{type(self).__qualname__}: none of the {len(paths)} block(s) the recipe in {source} rewrote "
                f"({paths[0]}, ...) is in this model, so it has no Han-block: its body is named otherwise than "
                f"{recipe.base.name}'s (transformers leaves those weights random too). Load the folder with "
                f"{recipe.base.name} or a class whose body it shares",
                stacklevel=2,
            )
        replay_recipe(self, recipe.steps, source, path_map=path_map)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, *model_args: Any, config: Any = None, **kwargs: Any
    ) -> PreTrainedModel:
        """transformers' ``from_pretrained``, reading the base config and the recipe from a hanified
        ``config.json`` (unless ``config`` is given: the base config, or the ``HanifiedConfig``
        ``AutoConfig.from_pretrained`` gives); one :class:`~han_surgery.CheckpointError` naming
        the file for weights that are unreadable or do not fit."""
        folder = Path(str(pretrained_model_name_or_path))
        if config is None:
            hanified, kwargs = _hanified_config(pretrained_model_name_or_path, kwargs)
            config = hanified.base_model_config(str(folder / "config.json"))
        elif isinstance(config, HanifiedConfig):  # AutoConfig.from_pretrained(dir), edited: its base config
            config = config.base_model_config(str(folder / "config.json"))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        except SafetensorError as e:
            raise CheckpointError(f"{folder / WEIGHTS_NAME}: not a readable safetensors file ({e})") from None
        except RuntimeError as e:  # transformers refuses tensors of the wrong shape with a RuntimeError
            if "mismatch" not in str(e):
                raise
            raise CheckpointError(f"{folder / WEIGHTS_NAME}: does not fit {cls.__qualname__} ({e})") from None

    def save_pretrained(
        self,
        save_directory: str | Path,
        is_main_process: bool = True,
        state_dict: dict[str, Any] | None = None,
        push_to_hub: bool = False,
        variant: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the folder with :func:`han_surgery.save_pretrained`, so that ``AutoModel*.from_pretrained``
        loads it back hanified; transformers' ``Trainer``, ``push_to_hub`` and sentence-transformers' ``save``
        call this too.

        ``is_main_process`` and ``state_dict`` (the weights to write, as ``Trainer`` and accelerate pass
        them) are honoured; ``push_to_hub=True`` (with ``repo_id``, ``commit_message``,
        ``commit_description``, ``private``, ``token``, ``revision``, ``create_pr``) uploads the written
        folder through transformers' ``push_to_hub``. Always one ``model.safetensors``: ``max_shard_size``
        and the other serialization options do not apply, and ``variant`` or ``safe_serialization=False``
        raise a :class:`~han_surgery.ConfigError`. With a PEFT adapter attached through transformers
        (``load_adapter`` / ``add_adapter``) transformers' own ``save_pretrained`` writes the adapter alone, as it
        does for any model.
        """
        if getattr(self, "_hf_peft_config_loaded", False):  # an adapter attached (load_adapter / add_adapter):
            # transformers saves the adapter alone, which loads back onto this hanified base; the whole model written
            # here held PEFT's key names, and reloaded with random attention weights
            return super().save_pretrained(
                save_directory,
                is_main_process=is_main_process,
                state_dict=state_dict,
                push_to_hub=push_to_hub,
                variant=variant,
                **kwargs,
            )
        if variant is not None or kwargs.get("safe_serialization", True) is False:
            option = f"variant={variant!r}" if variant is not None else "safe_serialization=False"
            raise ConfigError(
                f"{type(self).__qualname__}.save_pretrained: {option} is not supported for a hanified model; "
                "it is always saved as one model.safetensors"
            )
        if not is_main_process:
            return
        save_pretrained(self, save_directory, state_dict=state_dict)
        if push_to_hub:
            keys = ("commit_message", "commit_description", "private", "token", "revision", "create_pr")
            hub = {k: kwargs[k] for k in keys if k in kwargs}
            self.push_to_hub(kwargs.get("repo_id", Path(save_directory).name), **hub)


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def _hanified_config(
    pretrained_model_name_or_path: str | Path, kwargs: dict[str, Any]
) -> tuple[HanifiedConfig, dict[str, Any]]:
    """The :class:`HanifiedConfig` of a folder or Hub repo, read with the caller's Hub arguments (``revision``, ...)
    and config arguments (:meth:`HanifiedConfig.from_dict`), and the ``from_pretrained`` arguments left for the model."""
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    kept = {k: v for k, v in kwargs.items() if k in _LOADING_KWARGS}
    offered = {k: v for k, v in kwargs.items() if k not in hub and k not in kept}
    config, unused = HanifiedConfig.from_pretrained(
        pretrained_model_name_or_path, return_unused_kwargs=True, **hub, **offered
    )
    return config, {**hub, **kept, **unused}


_CLASSES: dict[type, type] = {}
ModelClassT = TypeVar("ModelClassT", bound="PreTrainedModel")


def hanified_class(base: type[ModelClassT]) -> type[ModelClassT]:
    """``Hanified<Base>``: ``base`` whose ``__init__`` also replays the recipe in ``config.han_recipe``, and whose
    ``save_pretrained`` writes a hanified folder (cached; a ``Hanified*`` class is returned as it is).

    :func:`han_surgery.hanify` gives a transformers model this class, so transformers' own saving
    (``model.save_pretrained``, ``Trainer``, ``push_to_hub``) writes a folder that loads back hanified.

    Its ``__name__`` is the base's (``"BertModel"``), because transformers looks models up by class name
    (``Trainer`` shifts the labels of causal LMs, pipelines pick how to decode); its ``__qualname__``
    says ``HanifiedBertModel``. It pickles as ``hanified_class(base)``, so wherever ``base`` pickles.
    """
    if issubclass(base, _Hanified):
        return base
    if base not in _CLASSES:
        _CLASSES[base] = _metaclass_for(type(base))(
            base.__name__,
            (_Hanified, base),
            {
                "__module__": __name__,
                "__qualname__": f"Hanified{base.__name__}",
                "__doc__": f"{base.__name__} rewritten by a han-surgery recipe.",
                "_han_base": base,
            },
        )
    return _CLASSES[base]


class _HanifiedMeta(type):
    """The metaclass of the ``Hanified<Base>`` classes, for :func:`_reduce_hanified_class`."""


def _reduce_hanified_class(cls: type) -> tuple[Any, tuple[type]]:
    """Pickle a ``Hanified<Base>`` class as ``hanified_class(base)`` (it is made at run time: no module holds it)."""
    return hanified_class, (cls._han_base,)


_METACLASSES: dict[type, type] = {type: _HanifiedMeta}


def _metaclass_for(base_meta: type) -> type:
    """:class:`_HanifiedMeta`, or a subclass that also derives from a base class's own metaclass."""
    if base_meta not in _METACLASSES:
        _METACLASSES[base_meta] = type(f"Hanified{base_meta.__name__}", (_HanifiedMeta, base_meta), {})
        copyreg.pickle(_METACLASSES[base_meta], _reduce_hanified_class)
    return _METACLASSES[base_meta]


copyreg.pickle(_HanifiedMeta, _reduce_hanified_class)


@register_hanify_hook
def _adopt_hanified_class(model: nn.Module) -> None:
    """After ``hanify``: a transformers model becomes a ``Hanified<Class>`` (see :func:`hanified_class`).

    So does each outermost transformers model *inside* ``model`` that the step rewrote (a
    ``SentenceTransformer``'s encoder, a user's wrapper module), with the step recorded on it too, relative
    to it (:meth:`~han_surgery.surgery.recipe.RecipeStep.under`): it saves itself, as ``SentenceTransformer.save``
    has it do."""
    for part in [model] if is_transformers_model(model) else record_last_step_on_parts(model, is_transformers_model):
        part.__class__ = hanified_class(type(part))
        _register_recordable_outputs(part)


def _register_recordable_outputs(model: PreTrainedModel) -> None:
    """Tell transformers what ``model``, now of a ``Hanified*`` class, may record (``output_hidden_states``,
    ``output_attentions``). transformers keeps each model class's ``_can_record_outputs`` in a registry keyed by the
    class, filled in ``PreTrainedModel.__init__``; a model whose class was swapped after it was built had no entry,
    and returned ``hidden_states=None`` silently. (A model built as a ``Hanified*`` class registers itself.)"""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers releases without the registry read the class attribute directly
        return
    _CAN_RECORD_REGISTRY[model] = model._can_record_outputs


class _AutoDispatch:
    """Registered in an ``AutoModel*`` class for :class:`HanifiedConfig`; loads ``Hanified<the class that
    Auto class picks for the base config>``."""

    config_class = HanifiedConfig
    auto_class: type[_BaseAutoModelClass]

    @classmethod
    def _resolve(cls, config: HanifiedConfig, source: str) -> tuple[type, PreTrainedConfig]:
        base_config = config.base_model_config(source)
        try:
            base = _get_model_class(base_config, cls.auto_class._model_mapping)
        except KeyError:
            raise ValueError(
                f"{cls.auto_class.__name__} has no model for a {base_config.model_type!r} base model; this hanified "
                f"model was saved from {config.architectures}"
            ) from None
        return hanified_class(base), base_config

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, *model_args: Any, config: Any = None, **kwargs: Any
    ) -> PreTrainedModel:
        if not isinstance(config, HanifiedConfig):
            config, kwargs = _hanified_config(pretrained_model_name_or_path, kwargs)
        model_class, base_config = cls._resolve(config, str(Path(str(pretrained_model_name_or_path)) / "config.json"))
        return model_class.from_pretrained(pretrained_model_name_or_path, *model_args, config=base_config, **kwargs)

    @classmethod
    def _from_config(cls, config: HanifiedConfig, **kwargs: Any) -> PreTrainedModel:
        model_class, base_config = cls._resolve(config, "config")
        return model_class._from_config(base_config, **kwargs)

    from_config = _from_config


AUTO_CLASSES: list[type[_BaseAutoModelClass]] = [
    getattr(modeling_auto, name) for name in transformers_auto_map() if name != "AutoConfig"
]
"""Every ``AutoModel*`` class a hanified model is registered with."""

DISPATCHERS: dict[str, type] = {
    f"Hanified{auto.__name__}": type(
        f"Hanified{auto.__name__}", (_AutoDispatch,), {"auto_class": auto, "__module__": __name__}
    )
    for auto in AUTO_CLASSES
}
"""``Hanified<AutoClass>`` -> the class registered in that Auto class (also module attributes, the names
``config.json``'s ``auto_map`` and the generated ``han_surgery_auto.py`` use)."""
globals().update(DISPATCHERS)

configuration_auto.AutoConfig.register(HF_HANIFIED_MODEL_TYPE, HanifiedConfig, exist_ok=True)
for _dispatch in DISPATCHERS.values():
    _dispatch.auto_class.register(HanifiedConfig, _dispatch, exist_ok=True)


def __getattr__(name: str) -> type:
    """``Hanified<Class>`` by its ``__name__`` in this module (``GPT2LMHeadModel``): what a library that records a
    model's class as (``__module__``, ``__name__``) imports back, as PEFT's ``AutoPeftModel*`` does."""
    if not name.startswith("_"):
        import transformers

        base = getattr(transformers, name, None)
        if isinstance(base, type) and issubclass(base, transformers.PreTrainedModel):
            return hanified_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
