"""The model card and the Hub upload of a fine-tuned model folder.

* :func:`render_model_card` renders ``han_surgery/model_cards/template.md`` with huggingface_hub's
  ``ModelCard.from_template``: YAML metadata (``library_name``, ``tags`` with ``han-surgery`` and
  ``householder``, ``base_model`` for timm's Hub weights, ``datasets``, ``metrics`` and a ``model-index``
  with the measured values) and a body with the base model, the parameters before/after, the recipe and how to
  load the model.
* :func:`push_folder` uploads a folder with ``HfApi.create_repo`` + ``HfApi.upload_folder`` (token
  from ``hf auth login`` or ``HF_TOKEN``); checkpoints and staging folders (``*.tmp/``) are not uploaded, a
  link to a file outside the folder is refused, and the card goes up pointed at the repo (:func:`card_for_repo`).
  Failures (no network, no token, no permission) raise :class:`HubUploadError` and leave the local folder as it is.
* ``han-surgery push <dir> <repo_id>`` is :func:`push_folder` on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any

from ..dataclass_cli import to_argv
from ..errors import CheckpointError, HanSurgeryError
from ..fileio import folder_problems, lies_in
from ..folders import (
    CARD_NAME,
    CONFIG_NAME,
    HF_BASE_CONFIG_KEY,
    TIMM_BASE_ARG,
    TIMM_HANIFIED_ARCH,
    WEIGHTS_NAME,
    read_json_object,
)
from ..surgery.calibration.config import FLAG_PREFIX, CalibrationConfig
from ..surgery.report import HanifyReport
from ..utils import is_han_timm_architecture
from .checkpoints import ARGS_FILE
from .config import FinetuneConfig, FinetuneResult, repo_id_problem
from .data import DataBundle
from .models import BuiltModel

__all__ = [
    "HubUploadError",
    "TEMPLATE_PATH",
    "base_model_id",
    "command_line",
    "load_snippet",
    "render_model_card",
    "write_model_card",
    "push_folder",
]

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "template.md"
# training state, and staging folders of an unfinished write (.export.tmp, .hanify.tmp, .overwritten.tmp) and
# their files: "*.tmp" alone matches no file inside one
UPLOAD_IGNORE = ["checkpoints/*", "checkpoints/**", "*.tmp", "*.tmp/*", "*.tmp/**", "*.lock"]
RESULTS_NAME = "results.json"


class HubUploadError(HanSurgeryError, RuntimeError):
    """The upload to the Hub failed; the local folder is untouched and can be pushed again later."""


def command_line(config: FinetuneConfig, num_processes: int = 1, mixed_precision: str | None = None) -> str:
    """The command that reruns ``config`` (non-default options only): ``han-surgery finetune ...``, or
    ``accelerate launch --multi_gpu --num_processes N -m han_surgery.finetune ...`` for several processes.
    ``mixed_precision``: the one the run had, named when accelerate's config or launcher chose it (not
    ``--mixed-precision``), so that the command reruns the run elsewhere. Paths under the home directory read
    ``~/...`` (the card that shows the command names no local user)."""
    if config.mixed_precision is None and mixed_precision not in (None, "no"):
        config = dataclasses.replace(config, mixed_precision=mixed_precision)
    launcher = (
        f"accelerate launch --multi_gpu --num_processes {num_processes} -m han_surgery.finetune"
        if num_processes > 1
        else "han-surgery finetune"
    )
    argv = to_argv(config, exclude=("resume", "overwrite"))
    if config.hanify is not None:
        argv += ["--hanify", *to_argv(config.hanify)]
    if config.calibrate is not None:
        argv += ["--calibrate", config.calibrate.source, *to_argv(config.calibrate, flag_prefix=FLAG_PREFIX)]
        argv += to_argv(config.calibration or CalibrationConfig(), flag_prefix=FLAG_PREFIX)
    return " ".join([launcher, *(_shell_word(arg, str(Path.home())) for arg in argv)])


def _shell_word(arg: str, home: str) -> str:
    """``arg`` quoted for a POSIX shell, a path under the home directory ``home`` as ``~/...`` (the shell expands
    ``~/`` again, han-surgery ``local-dir:~/``)."""
    for prefix in ("", "local-dir:"):
        if home != "/" and (arg == prefix + home or arg.startswith(prefix + home + "/")):
            rest = arg[len(prefix + home) + 1 :]
            return f"{prefix}~/{shlex.quote(rest)}" if rest else f"{prefix}~"
    return shlex.quote(arg)


def _epochs(value: float) -> str:
    """An epoch count for prose: ``1234``, ``2.5``, ``0.048`` (``.3g`` wrote 1234 as ``1.23e+03``)."""
    return f"{value:.2f}".rstrip("0").rstrip(".") if value >= 0.1 else f"{value:.2g}"


def _library_name(built: BuiltModel) -> str:
    return {"timm": "timm", "transformers": "transformers", "tabular": "pytorch"}[built.family]


def base_model_id(config: FinetuneConfig, built: BuiltModel) -> str:
    """What the model came from: the timm weights' Hub id, the model name, or what a local folder was built from."""
    cfg = getattr(built.model, "pretrained_cfg", None) or {}
    if config.pretrained and cfg.get("hf_hub_id"):
        return cfg["hf_hub_id"]
    spec = config.model.removeprefix("local-dir:")
    path = Path(spec).expanduser()
    if not path.is_dir():
        return spec
    # a local folder: name what it was built from (the base model's Hub id is not known offline); for a hanified
    # folder, its base model (timm's model_args["han_base"], transformers' base_config), never a local path
    results = read_json_object(path / RESULTS_NAME) if (path / RESULTS_NAME).is_file() else {}
    saved = read_json_object(path / CONFIG_NAME) if (path / CONFIG_NAME).is_file() else {}
    model_args = saved.get("model_args") if isinstance(saved.get("model_args"), dict) else {}
    base_config = saved.get(HF_BASE_CONFIG_KEY) if isinstance(saved.get(HF_BASE_CONFIG_KEY), dict) else {}
    base_path = base_config.get("_name_or_path")
    base_folder = _base_folder(path, base_path)
    # (name, whether it may be a local path to skip): card titles are names, whatever folders exist here
    candidates = (
        (results.get("base_model"), True),
        (model_args.get(TIMM_BASE_ARG), True),
        (saved.get("architecture"), True),
        # a transformers folder: the title of its own card (a config.json's _name_or_path is where the weights
        # were loaded from before they were saved here: all-MiniLM-L6-v2's names the model it was trained from)
        (None if base_config else _card_title(path), False),
        (_card_title(base_folder), False) if base_folder else (base_path, True),  # a hanified one: its base's
        (saved.get("_name_or_path"), True),
    )
    for value, maybe_path in candidates:
        if not isinstance(value, str) or not value or value == TIMM_HANIFIED_ARCH:
            continue
        if not (maybe_path and _is_local_path(value)):
            return value
    # a hanified transformers folder made from a local one: its architecture (the card names this folder too)
    architectures = base_config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0]
    return path.name


def _base_folder(folder: Path, name_or_path: Any) -> Path | None:
    """The local folder a hanified transformers folder was made from (its base config's ``_name_or_path``), else
    ``None``. A relative path is the one ``han-surgery hanify`` was given, from the directory it ran in: tried
    from here, then from beside ``folder`` (``hanify base -o han`` run in the folder that holds both)."""
    if not isinstance(name_or_path, str) or not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    for candidate in (path,) if path.is_absolute() else (path, folder.parent / path):
        try:
            if candidate.is_dir():
                return candidate
        except OSError:  # a name no file system takes (over 255 bytes): not a folder
            return None
    return None


def hub_base_model(config: FinetuneConfig, built: BuiltModel) -> str | None:
    """The card's ``base_model`` (the Hub links the card to that repo): the Hub repo of timm's pretrained weights
    the run started from. ``None`` otherwise: an architecture, a spec (``hannet:16x3``) or a local folder is no Hub
    repo, and neither need be a transformers folder's ``_name_or_path`` (a relative path such as ``models/bert``
    looks like one), so the card names those in its body only."""
    cfg = getattr(built.model, "pretrained_cfg", None) or {}
    hub_id = cfg.get("hf_hub_id") if config.pretrained else None
    return hub_id if isinstance(hub_id, str) and hub_id.count("/") == 1 else None


def base_license(config: FinetuneConfig, built: BuiltModel) -> str | None:
    """The card's ``license``: the licence of the weights the run started from, where it is known (timm's
    ``pretrained_cfg["license"]`` with ``--pretrained`` on a timm name; the ``license:`` of a model folder's own
    README.md, or of its base's folder for a hanified transformers folder). ``None`` otherwise (weights trained
    from scratch are the user's to license): the card then has none."""
    return base_license_metadata(config, built).get("license")


def base_license_metadata(config: FinetuneConfig, built: BuiltModel) -> dict[str, str]:
    """The card's licence fields (see :func:`base_license`): ``license``, and for ``license: other`` the
    ``license_name`` and (an absolute URL) ``license_link`` the base's card gives; empty where none is known."""
    if built.random_weights == "all":
        return {}
    folder = Path(config.model.removeprefix("local-dir:")).expanduser()
    if not folder.is_dir():  # a timm name: its Hub weights' licence, if --pretrained loaded them
        value = (getattr(built.model, "pretrained_cfg", None) or {}).get("license") if config.pretrained else None
        return {"license": value} if isinstance(value, str) and value else {}
    # A folder's weights are its own (timm's pretrained_cfg in its config.json names a licence even for random
    # weights): the licence of its README, else, for a hanified transformers folder (`han-surgery hanify -o` writes
    # no README), that of the local folder its base was loaded from.
    saved = read_json_object(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else {}
    base_config = saved.get(HF_BASE_CONFIG_KEY) if isinstance(saved.get(HF_BASE_CONFIG_KEY), dict) else {}
    for directory in (folder, _base_folder(folder, base_config.get("_name_or_path"))):
        card = _folder_card(directory) if directory else None
        value = card.data.license if card else None
        if isinstance(value, str) and value:
            fields = {"license": value}
            for key in ("license_name", "license_link") if value == "other" else ():
                detail = getattr(card.data, key, None)
                # a relative link names a file of the base's repo, which this folder does not have
                if isinstance(detail, str) and detail and (key == "license_name" or "://" in detail):
                    fields[key] = detail
            return fields
    return {}


def _folder_card(folder: Path) -> Any:
    """The ``huggingface_hub.ModelCard`` of a model folder's README.md; ``None`` if it has none or it does not
    parse (a README without YAML, or YAML the Hub would refuse)."""
    readme = folder / CARD_NAME
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:  # metadata the Hub would refuse (a model-index result without a dataset) still has a licence
        return ModelCard.load(readme, ignore_metadata_errors=True)
    except Exception:  # noqa: BLE001 (nothing to read from it)
        return None


def _card_title(folder: Path) -> str | None:
    """The model a folder's card is about: its ``model-index`` name, else the card's first ``# `` heading."""
    card = _folder_card(folder)
    if card is None:
        return None
    name = getattr(card.data, "model_name", None)
    if isinstance(name, str) and name.strip():
        return name.strip()
    heading, fence = "", ""
    for line in card.text.splitlines():  # the first "# " line outside a code block (where it is a comment)
        marker = line.lstrip()[:3]
        if marker in ("```", "~~~"):
            fence = "" if fence == marker else fence or marker
        elif not fence and line.startswith("# "):
            heading = line[2:].strip()
            break
    heading = re.sub(r"^model card for\s+", "", heading, flags=re.IGNORECASE)  # huggingface_hub's template
    return heading if heading and heading.lower() not in ("model card", "model id") else None


def _is_local_path(value: str) -> bool:
    """``_name_or_path`` holds the folder a model was loaded from when it was not a Hub id."""
    path = Path(value).expanduser()
    try:
        return path.is_absolute() or value.startswith(".") or path.exists()
    except OSError:  # a name no file system takes (over 255 bytes): not a path
        return False


def load_snippet(built: BuiltModel, repo_id: str | None, max_length: int | None = None) -> str:
    """The model card's "How to load it" code: the library's own loader (with ``import han_surgery`` first
    for hanified models, which registers them with it), from the Hub repo ``repo_id`` or this folder."""
    folder = FOLDER_PLACEHOLDER
    if built.family == "timm":
        name = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{folder}"
        head = "import timm\n"
        if built.hanified:
            head += "import han_surgery  # pip install han-surgery: registers the 'hanified' timm model\n"
        elif is_han_timm_architecture((getattr(built.model, "pretrained_cfg", None) or {}).get("architecture")):
            head += "import han_surgery  # pip install han-surgery: registers the han_* timm models\n"
        return f'{head}\nmodel = timm.create_model("{name}", pretrained=True)'
    if built.family == "transformers":
        src = f'"{repo_id}"' if repo_id else f'"{folder}"'
        head = ""
        if built.hanified:
            head = "import han_surgery  # pip install han-surgery: registers hanified models with the Auto classes\n"
        return (
            f"{head}from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f"model = AutoModelForSequenceClassification.from_pretrained({src})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({src})"
            + (
                f"\n# trained and evaluated on texts cut to {max_length} tokens (the tokenizer's model_max_length):\n"
                "# tokenizer(texts, truncation=True), or pipeline(..., truncation=True), cuts them the same way"
                if max_length
                else ""
            )
        )
    where = f'huggingface_hub.snapshot_download("{repo_id}")' if repo_id else f'"{folder}"'
    return (
        f"import huggingface_hub, han_surgery\n\nmodel = han_surgery.load_model({where})\n"
        "# takes raw rows (the training CSV's feature columns, in order): the training split's\n"
        "# standardisation is inside the model (config.json); regression outputs are in the data's units"
    )


def _rows(count: int) -> str:
    return f"{count:,} row{'' if count == 1 else 's'}"


def render_model_card(
    *,
    config: FinetuneConfig,
    built: BuiltModel,
    data: DataBundle,
    result: FinetuneResult,
    han_report: HanifyReport | None = None,
) -> Any:
    """Build the ``huggingface_hub.ModelCard`` of a finished run (see the module docstring)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    repo_id = config.push_to_hub
    model_name = repo_id.split("/")[-1] if repo_id else _folder_name(config.output_dir)
    kinds = {"image": "image-classification", "text": "text-classification", "tabular": f"tabular-{data.task}"}
    task_type = kinds[data.kind]
    metrics = result.metrics
    metric_rows: list[tuple[str, str]] = []
    eval_results = []
    for key, metric_type in (("eval_accuracy", "accuracy"), ("eval_rmse", "rmse"), ("eval_loss", "loss")):
        if key in metrics:
            value = round(float(metrics[key]), 6)
            metric_rows.append((metric_type, f"{value:.4f}"))
            eval_results.append(
                EvalResult(
                    task_type=task_type,
                    dataset_type=data.name,
                    dataset_name=data.name,
                    dataset_split="held-out",
                    metric_type=metric_type,
                    metric_value=value,
                )
            )
    if "train_loss" in metrics:
        metric_rows.append(("train loss (last 10 steps)", f"{metrics['train_loss']:.4f}"))
    tags = ["han-surgery", "householder", task_type]
    if built.family == "timm":
        tags.append("image-classification" if data.kind == "image" else data.kind)
    if built.hanified:
        tags.append("han-layer")
    base_model = base_model_id(config, built)
    card_data = ModelCardData(
        library_name=_library_name(built),
        tags=sorted(set(tags)),
        base_model=hub_base_model(config, built),
        datasets=[data.name],
        metrics=[m for m, _ in metric_rows if " " not in m],
        model_name=model_name,
        eval_results=eval_results or None,
        **base_license_metadata(config, built),
    )
    setup = result.setup
    distill_line = None
    if config.distill_from:
        terms = []
        if config.distill in ("logits", "both"):
            terms.append(
                "MSE(student, teacher outputs)"
                if data.task == "regression"
                else f"T^2 KL(teacher || student), T = {config.distill_temperature}"
            )
        if config.distill in ("hidden", "both"):
            weight = f"{config.distill_hidden_weight} x " if config.distill_hidden_weight != 1 else ""
            terms.append(f"{weight}MSE / Var(teacher) of the hidden state after every rewritten block")
        distill_line = (
            f"knowledge distillation from `{config.distill_from}`: loss = (1 - {config.distill_alpha}) x task loss + "
            f"{config.distill_alpha} x ({' + '.join(terms)})"
        )
    per_epoch = setup.get("steps_per_epoch")
    passes = (
        f"{_epochs(setup['total_steps'] / per_epoch)} epochs of {per_epoch} steps"  # --max-steps: rarely whole epochs
        if config.max_steps and per_epoch
        else f"{setup['epochs']} epoch(s)"
    )
    clipping = f", gradient norm clipped at {config.max_grad_norm}" if config.max_grad_norm is not None else ""
    recipe = (
        f"{setup['total_steps']} optimizer steps ({passes}), AdamW lr {config.lr} ({config.schedule}"
        f"{f', {config.warmup_steps} warm-up steps' if config.warmup_steps else ''}), weight decay "
        f"{config.weight_decay}{clipping}, global batch {setup['global_batch_size']}, seed {config.seed}"
    )
    started_from = base_model  # the model the parameter table's first row counts
    if config.model_kwargs:  # the architecture is the named one changed by --model-kwargs: say so
        started_from = f"{base_model} --model-kwargs '{json.dumps(config.model_kwargs)}'"
    if built.loaded_hanified:  # the surgery was an earlier run's: this one started from its hanified folder
        started_from = _folder_name(config.model.removeprefix("local-dir:"))  # `.` names the folder it is
        summary = (
            f"`{base_model}` with its MLP blocks replaced by Han-blocks (`han_surgery.hanify`, in an earlier run), "
            f"fine-tuned further from the hanified folder `{started_from}`."
        )
    elif built.hanified:
        summary = (
            f"`{started_from}` with its MLP blocks replaced by Han-blocks (`han_surgery.hanify`), then fine-tuned."
        )
    elif built.random_weights == "all":
        summary = f"`{started_from}` trained from scratch (from random weights)."
    else:
        summary = f"A fine-tuned `{started_from}`."
    params = f"{result.params:,}" + (f" ({result.params / result.params_base:.1%})" if result.params_base else "")
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        summary=summary,
        dataset_name=data.name,
        held_out=(
            f"{_rows(len(data.eval))}: the data's own `{data.held_out_folder}/` folder"
            if data.held_out_folder
            # the share held out, not --val-fraction: ceil(fraction x rows) rows are (2 of 12 rows: 17%, not 10%)
            else f"{_rows(len(data.eval))}, {len(data.eval) / (len(data.train) + len(data.eval)):.0%} of the data, "
            f"fixed by seed {config.seed}"
        ),
        result_rows=metric_rows,
        base_model_name=started_from,
        params_base=f"{result.params_base:,}",
        params=params,
        han_report=str(han_report).strip() if han_report is not None else None,
        data_description=data.describe(),
        recipe_line=recipe,
        distill_line=distill_line,
        setup_line=(
            f"{setup['num_processes']} process(es) on {setup['device']} ({setup['distributed_type']}), "
            f"mixed precision {setup['mixed_precision']}, {setup['per_process_batch_size']} per process x "
            f"{setup['grad_accum']} accumulation step(s)"
        ),
        train_runtime=result.train_runtime_s,
        total_runtime=result.total_runtime_s,
        command=command_line(config, setup.get("num_processes", 1), setup.get("mixed_precision")),
        load_snippet=load_snippet(built, repo_id, config.max_length if data.kind == "text" else None),
    )


def write_model_card(directory: str | Path, **kwargs: Any) -> Path:
    """Render the model card (:func:`render_model_card` arguments) into ``<directory>/README.md``."""
    path = Path(directory) / CARD_NAME
    render_model_card(**kwargs).save(str(path))
    return path


FOLDER_PLACEHOLDER = "path/to/this/folder"  # where a card written without --push-to-hub loads the model from


def _folder_name(path: str | Path, leads_to: Path | None = None) -> str:
    """The name a card written without ``--push-to-hub`` gives its output folder ``path``: its last part, or, for
    ``.``, ``..`` or ``runs/..``, the name of the folder it leads to (``leads_to`` where that is known: ``path`` is
    relative to the directory the run ran in)."""
    name = Path(path).expanduser().name
    return name if name not in ("", "..") else Path(leads_to or path).expanduser().resolve().name


def card_for_repo(text: str, repo_id: str, written_for: str | None, written_name: str | None = None) -> str:
    """The model card ``text`` with its name and "How to load it" pointing at the Hub repo ``repo_id``.

    A card is written when the run ends: for ``--push-to-hub``'s repo (``written_for``), or without one for the
    local folder (``local-dir:path/to/this/folder``, ``"path/to/this/folder"``) under the output folder's name
    (``written_name``). ``han-surgery push`` uploads it to ``repo_id``, which may be neither. Only what the run wrote
    is replaced, in the text as it is: a name or a line the user edited, and everything else, stays as they left it.
    """
    replacements = [
        (f"local-dir:{FOLDER_PLACEHOLDER}", f"hf-hub:{repo_id}"),
        (f'han_surgery.load_model("{FOLDER_PLACEHOLDER}")', f'han_surgery.load_model(huggingface_hub.snapshot_download("{repo_id}"))'),
        (f'"{FOLDER_PLACEHOLDER}"', f'"{repo_id}"'),
    ]  # fmt: skip
    if written_for:
        replacements += [(f"hf-hub:{written_for}", f"hf-hub:{repo_id}"), (f'"{written_for}"', f'"{repo_id}"')]
    old_name = written_for.split("/")[-1] if written_for else written_name
    new_name = repo_id.split("/")[-1]
    for before, after in replacements:
        text = text.replace(before, after)
    if old_name and old_name != new_name:  # the model-index entry and the title the template wrote
        text = _renamed_in_model_index(text, old_name, new_name).replace(f"\n# {old_name}\n", f"\n# {new_name}\n")
    return text


def _renamed_in_model_index(text: str, old_name: str, new_name: str) -> str:
    """``text`` with its model-index name ``new_name`` if huggingface_hub reads it as ``old_name``, else as it is.

    huggingface_hub parses the card and writes the new name (quoted as it quotes one: ``'2024'`` stays a string);
    only that value changes in the text, so the rest of the YAML (its order, a comment) stays as it was. A name
    in any spelling YAML gives it (``2024``, ``'2024'``, ``"2024"``) is found.
    """
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK, yaml_dump

    def model_name(card_text: str) -> Any:
        try:
            return ModelCard(card_text, ignore_metadata_errors=True).data.model_name
        except Exception:  # noqa: BLE001 (metadata huggingface_hub cannot read: no name to rename)
            return None

    block = REGEX_YAML_BLOCK.search(text)
    name = model_name(text) if block else None
    if name is None or str(name) != old_name:  # no model-index, or the user renamed it: left as it is
        return text
    yaml_text = block.group(2)
    index = re.search(r"^model-index:", yaml_text, flags=re.MULTILINE)
    if index is None:
        return text
    spellings = (old_name, "'" + old_name.replace("'", "''") + "'", json.dumps(old_name))
    entry = re.compile(
        rf"^([ \t]*-[ \t]+name:[ \t]+)(?:{'|'.join(map(re.escape, spellings))})(?=[ \t]*(?:#[^\r\n]*)?\r?$)",
        flags=re.MULTILINE,
    )
    value = yaml_dump({"name": new_name}).partition(":")[2].strip()  # as huggingface_hub writes it
    renamed = entry.sub(lambda m: m.group(1) + value, yaml_text[index.start() :], count=1)
    start = block.start(2) + index.start()
    result = text[:start] + renamed + text[block.end(2) :]
    return result if model_name(result) == new_name else text


def _card_to_upload(directory: Path, repo_id: str) -> str:
    """The model card of ``directory`` as it should land in ``repo_id`` (:func:`card_for_repo`), read with the
    ``training_args.json`` that says what it was written for. Raises :class:`HubUploadError` naming the file
    that cannot be read: nothing has been sent to the Hub yet."""
    try:
        args = read_json_object(directory / ARGS_FILE) if (directory / ARGS_FILE).is_file() else {}
    except CheckpointError as e:  # it names the file and what is wrong with it
        raise _not_finished(directory, str(e)) from None
    card_path = directory / CARD_NAME
    try:
        card = card_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _not_finished(directory, f"{card_path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise _not_finished(directory, f"{card_path}: cannot be read ({e})") from None
    written_for = args.get("push_to_hub") if isinstance(args.get("push_to_hub"), str) else None
    output_dir = args.get("output_dir")
    written_name = _folder_name(output_dir, leads_to=directory) if isinstance(output_dir, str) else None
    return card_for_repo(card, repo_id, written_for, written_name)


def _not_finished(directory: Path, problem: str) -> HubUploadError:
    """The error of a folder :func:`push_folder` refuses before the Hub is contacted."""
    return HubUploadError(f"{directory} is not a finished model folder: {problem}. Nothing was uploaded.")


def _stage(directory: Path, staged: Path, card: str) -> None:
    """Fill the empty folder ``staged`` with ``directory`` as it should land in the repo: links to its files, and
    the model card ``card`` (:func:`_card_to_upload`). The folder itself is not touched; a linked folder is not
    followed. Raises :class:`HubUploadError` for a link to a file outside the folder (``notes.txt ->
    ~/.ssh/id_rsa``), whose content is not the folder's to publish; a link to one of its own files is fine."""
    root = directory.resolve()
    for path in directory.rglob("*"):
        if path.is_file() and not lies_in(path, root):
            raise HubUploadError(
                f"{path} is a link to {path.resolve()}, outside {directory}: remove it, or replace it with a copy "
                "of that file if it belongs in the repo. Nothing was uploaded."
            )
        if path.is_file() and path != directory / CARD_NAME:
            target = staged / path.relative_to(directory)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    (staged / CARD_NAME).write_text(card, encoding="utf-8")


def push_folder(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload model fine-tuned with han-surgery",
) -> str:
    """Upload ``directory`` (without ``checkpoints/``) to the Hub model repo ``repo_id``; return the commit URL.

    ``private``: ``True`` creates the repo private; ``None`` (the default) leaves it to the Hub, as
    ``HfApi.create_repo`` does: public unless the organization's default is private (``False``: public). A repo
    that exists keeps its visibility.

    Every local file is checked and read before the Hub is contacted, so a folder that cannot be uploaded creates
    no repo.

    Raises:
        HubUploadError: the folder is incomplete (a missing file, a safetensors file whose size does not match its
            header, unreadable JSON, a model card that is not UTF-8, a run still writing it), or the Hub could not
            be reached / refused the upload.
    """
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not directory.is_dir():
        what = "a file, not a folder" if directory.exists() else "no such folder"
        raise HubUploadError(f"{directory} is not a finished model folder: {what}.")
    problem = repo_id_problem(repo_id)
    if problem:
        raise HubUploadError(f"{repo_id}: {problem}. Nothing was uploaded.")
    problems = folder_problems(directory, required=(WEIGHTS_NAME, CONFIG_NAME, CARD_NAME))
    if problems:
        raise _not_finished(directory, "; ".join(problems))
    card = _card_to_upload(directory, repo_id)
    with tempfile.TemporaryDirectory(prefix="han-surgery-push-") as tmp:
        staged = Path(tmp)
        try:
            _stage(directory, staged, card)
        except OSError as e:
            raise HubUploadError(
                f"{directory}: its files could not be prepared for the upload ({e}). Nothing was uploaded."
            ) from None
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            commit = api.upload_folder(
                folder_path=str(staged),
                repo_id=repo_id,
                repo_type="model",
                ignore_patterns=UPLOAD_IGNORE,
                commit_message=commit_message,
            )
        except Exception as e:  # network, auth and HTTP errors all end the same way for the user
            raise HubUploadError(
                f"Upload of {directory} to the Hub repo {repo_id} failed: {type(e).__name__}: {e}. "
                f"The local folder is complete; retry later with `han-surgery push {directory} {repo_id}` "
                f"(log in with `hf auth login` or set HF_TOKEN)."
            ) from e
    return str(getattr(commit, "commit_url", commit))
