"""The model card and the Hub upload of a fine-tuned model folder.

* :func:`write_model_card` renders ``han_surgery/model_cards/template.md`` with huggingface_hub's
  ``ModelCard.from_template``: YAML metadata (``library_name``, ``tags`` with ``han-surgery`` and
  ``householder``, ``base_model``, ``datasets``, ``metrics`` and a ``model-index`` with the measured
  values) and a body with the parameters before/after, the recipe and how to load the model.
* :func:`push_folder` uploads a folder with ``HfApi.create_repo`` + ``HfApi.upload_folder`` (token
  from ``hf auth login`` or ``HF_TOKEN``); checkpoints are not uploaded. Failures (no network, no
  token, no permission) raise :class:`HubUploadError` and leave the local folder as it is.
* ``han-surgery push <dir> <repo_id>`` is :func:`push_folder` on the command line.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

__all__ = ["HubUploadError", "TEMPLATE_PATH", "render_model_card", "write_model_card", "push_folder", "command_line"]

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "template.md"
UPLOAD_IGNORE = ["checkpoints/*", "checkpoints/**", "*.tmp"]


class HubUploadError(RuntimeError):
    """The upload to the Hub failed; the local folder is untouched and can be pushed again later."""


def command_line(args: argparse.Namespace, num_processes: int = 1) -> str:
    """The command equivalent to ``args`` (non-default options only): ``python -m han_surgery.finetune ...``, or
    ``accelerate launch --num_processes N -m han_surgery.finetune ...`` for a multi-process run."""
    from .args import build_parser

    parser = build_parser()
    launcher = f"accelerate launch --multi_gpu --num_processes {num_processes}" if num_processes > 1 else "python"
    parts = [f"{launcher} -m han_surgery.finetune"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[0]
        if isinstance(value, bool):
            if action.nargs == 0 and value is True:
                parts.append(flag)
            else:  # BooleanOptionalAction
                parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        elif action.const is not None and value == action.const:
            parts.append(flag)
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) if p != parts[0] else p for p in parts)


def _library_name(built: Any) -> str:
    return {"timm": "timm", "transformers": "transformers", "tabular": "pytorch"}[built.family]


def base_model_id(args: argparse.Namespace, built: Any) -> str:
    cfg = getattr(built.model, "pretrained_cfg", None) or {}
    if args.pretrained and cfg.get("hf_hub_id"):
        return cfg["hf_hub_id"]
    spec = args.model[len("local-dir:") :] if args.model.startswith("local-dir:") else args.model
    path = Path(spec).expanduser()
    if not path.is_dir():
        return spec
    # a local folder: name what it was built from (the base model's Hub id is not known offline)
    for name in ("training_args.json", "config.json"):
        if (path / name).is_file():
            conf = json.loads((path / name).read_text())
            for key in ("base_model", "architecture", "_name_or_path"):
                if isinstance(conf.get(key), str) and conf[key]:
                    return conf[key]
    return path.name


def _load_snippet(built: Any, repo_id: str | None) -> str:
    where = f'huggingface_hub.snapshot_download("{repo_id}")' if repo_id else '"path/to/this/folder"'
    if built.hanified:
        return (
            "import huggingface_hub, han_surgery\n\n"
            f"folder = {where}\n"
            "model = han_surgery.from_pretrained(folder)  # the Han-blocks and their weights, ready for eval()"
        )
    if built.family == "timm":
        name = f"hf-hub:{repo_id}" if repo_id else "local-dir:path/to/this/folder"
        return f'import timm\n\nmodel = timm.create_model("{name}", pretrained=True)'
    if built.family == "transformers":
        src = f'"{repo_id}"' if repo_id else '"path/to/this/folder"'
        return (
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f"model = AutoModelForSequenceClassification.from_pretrained({src})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({src})"
        )
    return f"import huggingface_hub\nfrom han_surgery.finetune import load_model\n\nmodel = load_model({where})"


def render_model_card(
    *, args: argparse.Namespace, built: Any, data: Any, results: dict[str, Any], han_report: Any = None
) -> Any:
    """Build the ``huggingface_hub.ModelCard`` of a finished run (see the module docstring)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    repo_id = args.push_to_hub
    model_name = repo_id.split("/")[-1] if repo_id else Path(args.output_dir).name
    task_type = {"image": "image-classification", "text": "text-classification", "tabular": f"tabular-{data.task}"}[
        data.kind
    ]
    metric_rows: list[tuple[str, str]] = []
    eval_results = []
    for key, metric_type in (("eval_accuracy", "accuracy"), ("eval_rmse", "rmse"), ("eval_loss", "loss")):
        if key in results:
            value = round(float(results[key]), 6)
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
    if "train_loss" in results:
        metric_rows.append(("train loss (last 10 steps)", f"{results['train_loss']:.4f}"))
    tags = ["han-surgery", "householder", task_type]
    if built.family == "timm":
        tags.append("image-classification" if data.kind == "image" else data.kind)
    if built.hanified:
        tags.append("han-layer")
    card_data = ModelCardData(
        library_name=_library_name(built),
        tags=sorted(set(tags)),
        base_model=base_model_id(args, built),
        datasets=[data.name],
        metrics=[m for m, _ in metric_rows if " " not in m],
        model_name=model_name,
        eval_results=eval_results or None,
        license="apache-2.0",
    )
    setup = results
    distill_line = None
    if args.distill_from:
        distill_line = (
            f"knowledge distillation from `{args.distill_from}`: loss = (1 - {args.distill_alpha}) x task loss + "
            f"{args.distill_alpha} x T^2 KL(teacher || student), T = {args.distill_temperature}"
        )
    recipe = (
        f"{setup['total_steps']} optimizer steps ({setup['epochs']} epoch(s)), AdamW lr {args.lr} ({args.schedule}"
        f"{f', {args.warmup_steps} warm-up steps' if args.warmup_steps else ''}), weight decay {args.weight_decay}, "
        f"global batch {setup['global_batch_size']}, seed {args.seed}"
    )
    summary = (
        f"`{base_model_id(args, built)}` with its MLP blocks replaced by Han-blocks (`han_surgery.hanify`), then fine-tuned."
        if built.hanified and not built.han_loaded
        else f"A fine-tuned `{base_model_id(args, built)}`."
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        summary=summary,
        dataset_name=data.name,
        eval_rows=len(data.eval),
        val_fraction_pct=f"{args.val_fraction:.0%}",
        seed=args.seed,
        result_rows=metric_rows,
        base_model_name=base_model_id(args, built),
        params_base=f"{results['params_base']:,}",
        params=f"{results['params']:,}"
        + (f" ({results['params'] / results['params_base']:.1%})" if results["params_base"] else ""),
        han_report=str(han_report).strip() if han_report is not None else None,
        data_description=data.describe(),
        recipe_line=recipe,
        distill_line=distill_line,
        setup_line=(
            f"{setup['num_processes']} process(es) on {setup['device']} ({setup['distributed_type']}), "
            f"mixed precision {setup['mixed_precision']}, {setup['per_process_batch_size']} per process x "
            f"{setup['grad_accum']} accumulation step(s)"
        ),
        train_runtime=results["train_runtime_s"],
        total_runtime=results["total_runtime_s"],
        command=command_line(args, results.get("num_processes", 1)),
        load_snippet=_load_snippet(built, repo_id),
    )
    return card


def write_model_card(directory: str | Path, **kwargs: Any) -> Path:
    """Render the model card (:func:`render_model_card` arguments) into ``<directory>/README.md``."""
    path = Path(directory) / "README.md"
    render_model_card(**kwargs).save(str(path))
    return path


def push_folder(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload model fine-tuned with han-surgery",
) -> str:
    """Upload ``directory`` (without ``checkpoints/``) to the Hub model repo ``repo_id``; return the commit URL.

    Raises:
        HubUploadError: the folder is incomplete, or the Hub could not be reached / refused the upload.
    """
    from huggingface_hub import HfApi

    directory = Path(directory)
    missing = [f for f in ("model.safetensors", "config.json", "README.md") if not (directory / f).is_file()]
    if missing:
        raise HubUploadError(f"{directory} is not a finished model folder: missing {', '.join(missing)}.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(directory),
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
