"""The recipe: what :func:`~han_surgery.hanify` did to a model, in a typed, versioned schema.

``hanify`` records one :class:`RecipeStep` per call on the model it rewrites;
:func:`~han_surgery.save_pretrained` writes them, with the base model and the dtype, as
``han_config.json`` (a :class:`Recipe`); :func:`~han_surgery.from_pretrained` reads that file
back with :meth:`Recipe.read` and replays each step on a freshly built base model. This module
is the only code that writes or reads the file::

    {
      "format_version": 1,
      "han_surgery_version": "0.2.0",
      "base": {"library": "transformers", "class": "BertModel"},      # or {"library": "timm",
                                                                       #     "architecture": "vit_small_patch16_224"},
                                                                       # or {"library": null, "class": "pkg.Module"}
      "dtype": "float32",
      "recipe": [                                                      # one entry per hanify() call
        {"config": {...HanConfig fields...},
         "rewrites": [{"path": "encoder.layer.0.intermediate", "rule": "hf.split_ffn",
                       "swapped": ["encoder.layer.0.intermediate", "encoder.layer.0.output"],
                       "neighbours": {"norm": "...", "residual": "kept"}}, ...]}
      ]
    }

A reader refuses a file whose ``format_version`` is newer than :data:`RECIPE_FORMAT_VERSION`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError
from ..folders import HAN_CONFIG_NAME, TIMM_BASE_ARG, TIMM_HANIFIED_ARCH, read_json_object
from ..utils import is_transformers_model
from ..version import __version__
from .config import HanConfig

__all__ = [
    "RECIPE_FORMAT_VERSION",
    "RECIPE_ATTR",
    "RewriteEntry",
    "RecipeStep",
    "BaseModelSpec",
    "Recipe",
    "recipe_of",
    "record_step",
    "replace_last_step",
]

RECIPE_FORMAT_VERSION = 1
RECIPE_ATTR = "_han_surgery_recipe"
"""Attribute ``hanify`` sets on the model it rewrites: the list of :class:`RecipeStep` applied so far."""


def _require(condition: bool, source: str, what: str) -> None:
    if not condition:
        raise CheckpointError(f"{source}: {what}")


@dataclass(frozen=True)
class RewriteEntry:
    """One rewritten FFN: its path, the rule, every module path swapped, what happened to the neighbours."""

    path: str
    rule: str
    swapped: tuple[str, ...] = ()
    neighbours: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rule": self.rule,
            "swapped": list(self.swapped),
            "neighbours": dict(self.neighbours),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str) -> RewriteEntry:
        _require(isinstance(data, dict), source, f"a rewrite must be an object, got {data!r:.80}")
        _require(
            isinstance(data.get("path"), str) and isinstance(data.get("rule"), str),
            source,
            f"a rewrite needs string 'path' and 'rule', got {data!r:.80}",
        )
        swapped = data.get("swapped", [])
        neighbours = data.get("neighbours", {})
        _require(
            isinstance(swapped, list) and all(isinstance(p, str) for p in swapped),
            source,
            f"'swapped' of {data['path']!r} must be a list of module paths",
        )
        _require(isinstance(neighbours, dict), source, f"'neighbours' of {data['path']!r} must be an object")
        return cls(data["path"], data["rule"], tuple(swapped), {str(k): str(v) for k, v in neighbours.items()})


@dataclass(frozen=True)
class RecipeStep:
    """One :func:`~han_surgery.hanify` call: its :class:`HanConfig`, the rewrites it made and, for a
    calibrated call, the :class:`~han_surgery.surgery.calibration.CalibrationConfig` it used (a record only:
    the fitted weights are in the checkpoint, so loading never re-runs the fit)."""

    config: HanConfig
    rewrites: tuple[RewriteEntry, ...] = ()
    calibration: dict[str, Any] | None = None

    def under(self, prefix: str) -> RecipeStep | None:
        """This step as seen from the sub-module at ``prefix`` (``"0.auto_model"``): the rewrites wholly inside
        it, their paths relative to it, and no include/exclude patterns (they were written for the whole model;
        the recorded paths say what was chosen). ``None`` if no rewrite lies inside."""
        head = prefix + "."
        inside = tuple(
            RewriteEntry(r.path[len(head) :], r.rule, tuple(p[len(head) :] for p in r.swapped), dict(r.neighbours))
            for r in self.rewrites
            if r.path.startswith(head) and all(p.startswith(head) for p in r.swapped)
        )
        if not inside:
            return None
        return RecipeStep(dataclasses.replace(self.config, include=(), exclude=()), inside, self.calibration)

    def to_dict(self) -> dict[str, Any]:
        out = {"config": self.config.to_dict(), "rewrites": [r.to_dict() for r in self.rewrites]}
        if self.calibration is not None:
            out["calibration"] = dict(self.calibration)
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str) -> RecipeStep:
        _require(isinstance(data, dict), source, f"each recipe step must be an object, got {data!r:.80}")
        _require(isinstance(data.get("config"), dict), source, "a recipe step lacks its 'config' object")
        _require(isinstance(data.get("rewrites"), list), source, "a recipe step lacks its 'rewrites' list")
        try:
            config = HanConfig.from_dict(data["config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: invalid HanConfig in the recipe ({e})") from None
        calibration = data.get("calibration")
        _require(
            calibration is None or isinstance(calibration, dict), source, "a step's 'calibration' must be an object"
        )
        return cls(config, tuple(RewriteEntry.from_dict(r, source) for r in data["rewrites"]), calibration)


@dataclass(frozen=True)
class BaseModelSpec:
    """The model the recipe starts from.

    Attributes:
        library: ``"timm"``, ``"transformers"``, or ``None`` for any other ``nn.Module``.
        name: the timm architecture, or the model class (transformers: its name in
            ``transformers``; others: ``module.QualName``).
    """

    library: str | None
    name: str

    def to_dict(self) -> dict[str, Any]:
        key = "architecture" if self.library == "timm" else "class"
        return {"library": self.library, key: self.name}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> BaseModelSpec:
        _require(isinstance(data, dict), source, "'base' must be an object naming the base model")
        library = data.get("library")
        _require(library in (None, "timm", "transformers"), source, f"unknown base library {library!r}")
        name = data.get("architecture" if library == "timm" else "class")
        _require(isinstance(name, str) and bool(name), source, f"'base' does not name the {library or 'custom'} model")
        return cls(library, name)

    @classmethod
    def of(cls, model: nn.Module) -> BaseModelSpec:
        """The spec of ``model``: timm if it carries timm's ``pretrained_cfg``, transformers if it is a
        ``PreTrainedModel`` (checked without importing transformers for other models), else custom.

        A model loaded natively from a hanified folder names its base: transformers' ``Hanified<Base>``
        classes subclass the base class; timm's ``"hanified"`` models keep it in ``model_args["han_base"]``.
        """
        if is_transformers_model(model):
            base = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers."))
            return cls("transformers", base.__name__)
        cfg = getattr(model, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("architecture") == TIMM_HANIFIED_ARCH:
            return cls("timm", getattr(model, "_model_args", {})[TIMM_BASE_ARG])
        if isinstance(cfg, dict) and cfg.get("architecture"):
            return cls("timm", cfg["architecture"])
        return cls(None, f"{type(model).__module__}.{type(model).__qualname__}")


@dataclass(frozen=True)
class Recipe:
    """The content of ``han_config.json``: the base model, its dtype, and the hanify steps applied to it."""

    base: BaseModelSpec
    steps: tuple[RecipeStep, ...]
    dtype: str = "float32"
    format_version: int = RECIPE_FORMAT_VERSION
    han_surgery_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "han_surgery_version": self.han_surgery_version,
            "base": self.base.to_dict(),
            "dtype": self.dtype,
            "recipe": [s.to_dict() for s in self.steps],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = HAN_CONFIG_NAME) -> Recipe:
        """Validate and parse; every problem raises :class:`CheckpointError` naming ``source``."""
        _require(isinstance(data, dict), source, "expected a JSON object")
        version = data.get("format_version")
        _require(
            isinstance(version, int) and not isinstance(version, bool),
            source,
            f"'format_version' must be an integer, got {version!r}",
        )
        _require(
            version <= RECIPE_FORMAT_VERSION,
            source,
            f"format_version {version} is newer than this han-surgery reads ({RECIPE_FORMAT_VERSION}); "
            f"upgrade han-surgery (it was written by {data.get('han_surgery_version')})",
        )
        _require(
            isinstance(data.get("recipe"), list) and bool(data["recipe"]),
            source,
            "no 'recipe' list of hanify steps: not written by han_surgery.save_pretrained?",
        )
        dtype = data.get("dtype", "float32")
        _require(dtype in ("float32", "float64", "float16", "bfloat16"), source, f"unsupported dtype {dtype!r}")
        return cls(
            base=BaseModelSpec.from_dict(data.get("base"), source),
            steps=tuple(RecipeStep.from_dict(s, source) for s in data["recipe"]),
            dtype=dtype,
            format_version=version,
            han_surgery_version=str(data.get("han_surgery_version", "unknown")),
        )

    def write(self, directory: str | Path) -> Path:
        """Write ``<directory>/han_config.json``; return its path."""
        path = Path(directory) / HAN_CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> Recipe:
        """Read ``<directory>/han_config.json`` (see :meth:`from_dict`)."""
        path = Path(directory) / HAN_CONFIG_NAME
        return cls.from_dict(read_json_object(path), str(path))


def recipe_of(model: nn.Module) -> list[RecipeStep]:
    """The hanify steps applied to ``model`` so far (empty if none)."""
    return list(getattr(model, RECIPE_ATTR, ()))


def record_last_step_on_parts(model: nn.Module, is_part: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """Record ``model``'s last step on each outermost sub-module for which ``is_part`` holds (a transformers or
    timm model inside a user's module) and that the step rewrote inside, relative to it
    (:meth:`RecipeStep.under`); return those parts. A part then saves itself with its library's API."""
    step, parts, outer = recipe_of(model)[-1], [], []
    for prefix, sub in model.named_modules():
        if not prefix or not is_part(sub) or any(prefix.startswith(p + ".") for p in outer):
            continue
        outer.append(prefix)
        inside = step.under(prefix)
        if inside is not None:
            record_step(sub, inside)
            parts.append(sub)
    return parts


def record_step(model: nn.Module, step: RecipeStep) -> None:
    """Append ``step`` to ``model``'s recipe (stored as a plain attribute, not a sub-module or buffer)."""
    object.__setattr__(model, RECIPE_ATTR, [*recipe_of(model), step])


def replace_last_step(model: nn.Module, step: RecipeStep) -> None:
    """Make ``step`` the last step of ``model``'s recipe, in place of the one recorded last (which must exist)."""
    steps = recipe_of(model)
    if not steps:
        raise ValueError(f"{type(model).__name__} has no recipe step to replace")
    object.__setattr__(model, RECIPE_ATTR, [*steps[:-1], step])
