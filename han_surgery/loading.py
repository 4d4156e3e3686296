"""``load_model``: any model han-surgery works with, from a name or a folder, without unpickling anything.

The source is one of

* a timm model name (``"vit_small_patch16_224"``, or a Han model such as ``"han_mobilevit_xxs"``):
  built with ``pretrained=False`` (random weights, no download) unless ``pretrained=True``;
* ``local-dir:<folder>`` or a folder: whatever :func:`~han_surgery.folders.inspect_model_folder`
  finds there -- a hanified folder (:func:`~han_surgery.from_pretrained`), a timm ``save_for_hf``
  folder, a transformers ``save_pretrained`` folder (the class named in ``architectures``,
  safetensors only, one file or shards, no code from the folder), or a fine-tuned tabular network.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .errors import CheckpointError, ConfigError, first_line
from .fileio import safetensors_problem
from .folders import (
    CONFIG_NAME,
    SHARDED_WEIGHTS_INDEX,
    TABULAR_CONFIG_KEY,
    WEIGHTS_NAME,
    ModelFolder,
    inspect_model_folder,
    may_name_hub_repo,
    read_timm_config,
    shard_files,
)
from .pretrained import create_timm_model
from .surgery.serialization import config_build_errors, empty_parameters, from_pretrained

__all__ = ["load_model", "load_folder", "weight_files"]


def weight_files(folder: ModelFolder) -> list[Path]:
    """The safetensors files of a plain folder: ``model.safetensors``, or for a transformers folder the shards its
    ``model.safetensors.index.json`` lists (file names in the folder only)."""
    weights = folder.path / WEIGHTS_NAME
    index = folder.path / SHARDED_WEIGHTS_INDEX
    if weights.is_file() or folder.kind != "transformers" or not index.is_file():
        if not weights.is_file():
            raise CheckpointError(f"{weights}: missing")
        return [weights]
    shards = shard_files(folder.path)
    missing = next((shard for shard in shards if not shard.is_file()), None)
    if missing is not None:
        raise CheckpointError(f"{missing}: missing (a shard {index.name} lists)")
    return shards


def load_folder(folder: ModelFolder, *, num_classes: int | None = None) -> nn.Module:
    """Load the model of an inspected folder (see the module docstring).

    Args:
        folder: from :func:`~han_surgery.folders.inspect_model_folder`.
        num_classes: timm folders only: a new classifier size (timm re-initialises the head).
    """
    if folder.kind == "hanified":
        base = _tabular_net(folder) if folder.base_library == "tabular" else None  # our own: from its config.json
        return from_pretrained(folder.path, model=base)
    files = weight_files(folder)
    weights = files[0] if len(files) == 1 else folder.path / SHARDED_WEIGHTS_INDEX
    for file in files:
        problem = safetensors_problem(file)  # a truncated or garbage file, named before any library reads it
        if problem:
            raise CheckpointError(problem)
    if folder.kind == "timm":
        return _load_timm_folder(folder.path, num_classes)
    if folder.kind == "tabular":
        from safetensors.torch import load_model as load_safetensors

        model = _tabular_net(folder)
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
    config_file = folder.path / CONFIG_NAME
    with _held_transformers_logs() as held:
        try:
            model = cls.from_pretrained(str(folder.path), use_safetensors=True, trust_remote_code=False)
        except SafetensorError as e:
            raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
        except (MemoryError, torch.OutOfMemoryError, CheckpointError):
            held.release()
            raise
        except Exception as e:
            if isinstance(e, RuntimeError) and ("size mismatch" in str(e) or "ignore_mismatched_sizes" in str(e)):
                # size mismatches between config.json and the weights (the report is dropped)
                raise CheckpointError(
                    f"{weights}: its tensor shapes do not fit {config_file} ({_mismatch_summary(held.records, e)})"
                ) from None
            with config_build_errors(config_file, name):  # the config alone does not build: its fault
                config = cls.config_class.from_pretrained(str(folder.path))
                with empty_parameters():
                    cls(config)
            if isinstance(e, (OSError, ValueError)):
                raise CheckpointError(f"{folder.path}: transformers cannot load it: {first_line(e)}") from None
            held.release()
            raise
        held.release()
    return model


def _tabular_net(folder: ModelFolder) -> nn.Module:
    """The :class:`~han_surgery.models.tabular.TabularNet` of a tabular folder, built from the arguments in its
    ``config.json`` (``han_surgery_tabular``): an object of the constructor's arguments, each checked by it
    (whole numbers of a sane size) before anything is allocated; what it refuses names the file."""
    from .models.tabular import TabularNet

    config_file = folder.path / CONFIG_NAME
    arguments = folder.config[TABULAR_CONFIG_KEY]
    if not isinstance(arguments, dict):
        raise CheckpointError(
            f"{config_file}: {TABULAR_CONFIG_KEY!r} must be an object of TabularNet's arguments, "
            f"got {type(arguments).__name__}"
        )
    parameters = inspect.signature(TabularNet).parameters
    unknown = sorted(set(arguments) - set(parameters))
    missing = [name for name, p in parameters.items() if p.default is p.empty and name not in arguments]
    if unknown or missing:
        problem = f"unknown {', '.join(map(repr, unknown))}" if unknown else f"no {', '.join(map(repr, missing))}"
        raise CheckpointError(
            f"{config_file}: {TABULAR_CONFIG_KEY!r} has {problem}; TabularNet takes {', '.join(parameters)}"
        )
    with config_build_errors(config_file, "TabularNet"):
        return TabularNet(**arguments)


class _HeldLogs:
    def __init__(self, handlers: list[logging.Handler]) -> None:
        self.handlers = handlers
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def release(self) -> None:
        """Emit the held records after all (the load went on, or failed for a reason we do not explain)."""
        records, self.records = self.records, []
        for h in self.handlers:
            h.removeFilter(self)
        for record in records:
            for h in self.handlers:
                if record.levelno >= h.level:
                    h.handle(record)


@contextlib.contextmanager
def _held_transformers_logs() -> Iterator[_HeldLogs]:
    """Hold what transformers logs during a load: on a shape mismatch its multi-line report is replaced by one line."""
    handlers = list(logging.getLogger("transformers").handlers)
    held = _HeldLogs(handlers)
    for h in handlers:
        h.addFilter(held)
    try:
        yield held
    finally:
        for h in handlers:
            h.removeFilter(held)


def _mismatch_summary(records: list[logging.LogRecord], error: BaseException) -> str:
    rows = [line for r in records for line in r.getMessage().splitlines() if "size mismatch" in line]
    if not rows:
        return first_line(error)
    key, *_, detail = (c.strip() for c in rows[0].split("|"))
    more = f"; {len(rows) - 1} more" if len(rows) > 1 else ""
    return f"{key}: {detail.replace('Reinit due to size mismatch - ', '')}{more}"


def _load_timm_folder(path: Path, num_classes: int | None) -> nn.Module:
    """A timm ``save_for_hf`` folder: its ``config.json``'s architecture and ``model_args``, its safetensors."""
    import timm

    config_file = path / "config.json"
    pretrained_cfg, name, model_args = read_timm_config(path)  # a timm model name; model_args allow-listed
    # pretrained_cfg now points at the folder ("local-dir"): timm loads its safetensors.
    if num_classes is not None:
        model_args["num_classes"] = num_classes
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg=pretrained_cfg, **model_args)
    except SafetensorError as e:
        raise CheckpointError(f"{path / WEIGHTS_NAME}: not a readable safetensors file ({e})") from None
    except (MemoryError, torch.OutOfMemoryError, CheckpointError):
        raise
    except Exception as e:
        # load_state_dict: missing / unexpected keys, shape mismatches
        lines = [line.strip() for line in str(e).splitlines()] if isinstance(e, RuntimeError) else []
        lines = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
        if lines:
            more = f"; {len(lines) - 1} more" if len(lines) > 1 else ""
            raise CheckpointError(
                f"{path / WEIGHTS_NAME}: does not fit the model {config_file} describes ({lines[0].rstrip('.')}{more})"
            ) from None
        # a model_args or pretrained_cfg value the constructor refuses: the config alone does not build
        with config_build_errors(config_file, repr(name)):
            timm.create_model(name, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
        if isinstance(e, ValueError):  # the config builds, its weights do not load (a Han model's checkpoint check)
            raise CheckpointError(f"{path / WEIGHTS_NAME}: {first_line(e)}") from None
        raise


def hub_repo_hint(spec: str) -> str:
    """For a model spec that may name a Hub repo (``hf-hub:owner/name[@rev]``, ``owner/name``), the sentence that says
    how to get it, since folders and timm names are what is loaded here; ``""`` for anything else (a path that
    starts with ``.``, ``/`` or ``~`` is a path)."""
    if not (spec.startswith("hf-hub:") or may_name_hub_repo(spec)):
        return ""
    name, _, revision = spec.removeprefix("hf-hub:").partition("@")
    download = f"hf download {name}" + (f" --revision {revision}" if revision else "") + " --local-dir <folder>"
    return (
        f" If it is a Hub repo: it is not downloaded here; download it ({download}) and pass the folder, or load it "
        "in Python with han_surgery.from_pretrained (a hanified repo) or timm.create_model('hf-hub:...')"
    )


def load_model(source: str | Path, *, pretrained: bool = False, num_classes: int | None = None) -> nn.Module:
    """Build the model named by ``source`` (see the module docstring).

    Args:
        source: a timm model name, ``local-dir:<folder>``, or a folder.
        pretrained: timm names only: load timm's pretrained weights (needs the Hub or its cache).
        num_classes: timm names and plain timm folders only: the classifier size.

    Raises:
        ConfigError: ``source`` is neither a folder nor a timm model name (the message lists near names),
            or ``pretrained`` / ``num_classes`` is given for a folder that does not take it.
        CheckpointError: the folder cannot be loaded (the message names the file).
    """
    text = str(source)
    spec = text.removeprefix("local-dir:")
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = inspect_model_folder(path)
        if pretrained:
            raise ConfigError(f"pretrained=True (--pretrained) is for timm model names; {path} is a folder: drop it")
        if num_classes is not None and folder.kind != "timm":
            raise ConfigError(
                f"num_classes (--num-classes) gives a plain timm folder a new classifier; {path} is a "
                f"{folder.kind} folder, whose classifier size it would not change: drop it"
            )
        return load_folder(folder, num_classes=num_classes)
    if text.startswith("local-dir:") or path.exists():
        raise CheckpointError(f"{spec}: not a folder")
    import timm

    if not timm.is_model(text):
        hint = hub_repo_hint(text)
        if hint:
            raise ConfigError(f"{text!r}: no such folder, and not a timm model name.{hint}")
        near = difflib.get_close_matches(text, timm.list_models(), n=5, cutoff=0.5)
        raise ConfigError(
            f"{text!r} is neither a folder nor a timm model name"
            + (f"; near timm names: {', '.join(near)}" if near else "")
        )
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return create_timm_model(text, pretrained=pretrained, **kwargs)
