"""What a model folder holds: the one place that decides it.

``han-surgery inspect``/``hanify``, ``finetune --model`` and :func:`han_surgery.from_pretrained`
all call :func:`inspect_model_folder`, which reads only JSON (never a pickle) and answers:

=================  =====================================================================
kind               the folder holds
=================  =====================================================================
``"hanified"``     ``han_config.json`` (written by :func:`han_surgery.save_pretrained`): a
                   base model plus the recipe that rewrote it; ``base_library`` says whose
``"timm"``         a timm ``config.json`` with ``architecture`` (``save_for_hf``)
``"transformers"`` a transformers ``config.json`` with ``model_type`` (``save_pretrained``)
``"tabular"``      a ``config.json`` with ``han_surgery_tabular`` (the fine-tune command's
                   small tabular networks, :class:`han_surgery.models.TabularNet`)
=================  =====================================================================

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
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "HAN_CONFIG_NAME",
    "TABULAR_CONFIG_KEY",
    "PICKLE_SUFFIXES",
    "FolderKind",
    "ModelFolder",
    "inspect_model_folder",
    "read_json_object",
    "refuse_pickles",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
HAN_CONFIG_NAME = "han_config.json"
TABULAR_CONFIG_KEY = "han_surgery_tabular"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

FolderKind = Literal["hanified", "timm", "transformers", "tabular"]


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
    """Raise :class:`UnsafeCheckpointError` if ``directory`` has pickle weights but no ``model.safetensors``."""
    if (directory / WEIGHTS_NAME).is_file():
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(
            f"{directory} holds only pickle-based weights ({', '.join(pickles)}) and no {WEIGHTS_NAME}. "
            "han-surgery never unpickles files (loading a pickle can run arbitrary code). Convert them to "
            "safetensors in an environment you trust, e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')."
        )


@dataclass(frozen=True)
class ModelFolder:
    """A model folder, as :func:`inspect_model_folder` found it.

    Attributes:
        path: the folder.
        kind: see the module docstring.
        config: the parsed ``config.json`` (``{}`` if a hanified folder of a custom model has none).
        han_config: the parsed ``han_config.json`` (hanified folders only).
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
    han_file = directory / HAN_CONFIG_NAME
    if han_file.is_file():
        han_config = read_json_object(han_file)
        base = han_config.get("base")
        library = base.get("library") if isinstance(base, dict) else None
        if _config_kind(config) == "tabular":
            library = "tabular"
        return ModelFolder(directory, "hanified", config, han_config, library)
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
