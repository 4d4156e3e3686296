"""Command-line arguments of ``han-surgery finetune`` / ``python -m han_surgery.finetune``.

The same parser backs both entry points (and ``accelerate launch -m han_surgery.finetune``), so
the options are defined once in :func:`add_arguments`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = ["add_arguments", "build_parser", "parse_args", "han_config_kwargs"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the fine-tuning options to ``parser``."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        help="timm or Han model name, local-dir:<folder>, a folder saved by han_surgery.save_pretrained, timm save_for_hf or transformers save_pretrained, or mlp[:WxD] / hannet[:WxD] for tabular data.",
    )
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="Load timm's pretrained weights for a timm name (needs the Hub or a warm cache).",
    )
    g.add_argument(
        "--model-kwargs",
        default=None,
        metavar="JSON",
        help="Extra keyword arguments for the model constructor, as JSON, e.g. '{\"drop_rate\": 0.1}'.",
    )

    h = parser.add_argument_group("surgery (--hanify)")
    h.add_argument(
        "--hanify",
        action="store_true",
        help="Apply han_surgery.hanify to the model before training (options below fill a HanConfig).",
    )
    h.add_argument(
        "--han-reflections",
        type=_positive_int,
        default=None,
        help="Householder reflections per Han-layer (HanConfig.reflections).",
    )
    h.add_argument(
        "--han-init",
        default=None,
        choices=("orthogonal", "normal"),
        help="Initialisation of the Householder vectors (HanConfig.init).",
    )
    h.add_argument("--han-dropout", type=float, default=None, help="Dropout inside the Han-blocks (HanConfig.dropout).")
    h.add_argument(
        "--han-bias-init",
        default=None,
        choices=("uniform", "zeros"),
        help="Initialisation of the Han-layer biases (HanConfig.bias_init).",
    )
    h.add_argument(
        "--han-drop-norm",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="Drop the norm layer in front of each replaced FFN (HanConfig.drop_norm; default yes, as the paper).",
    )
    h.add_argument(
        "--han-residual",
        default=None,
        choices=("keep", "drop"),
        help="keep: the block computes x + Han(x) (default, right for pretrained models); drop: the paper's Hanformer Han(x) (HanConfig.residual).",
    )
    h.add_argument(
        "--han-final-abs",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="End each Han-block with |.| (HanConfig.final_abs, the Han-Mixer block).",
    )
    h.add_argument(
        "--han-rules",
        nargs="+",
        default=None,
        metavar="RULE",
        help="Only these registered rules (names or globs, e.g. 'timm.*'; HanConfig.rules).",
    )
    h.add_argument(
        "--han-include",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="Only replace modules matching these patterns (HanConfig.include).",
    )
    h.add_argument(
        "--han-exclude",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="Never replace modules matching these patterns (HanConfig.exclude).",
    )

    d = parser.add_argument_group("data")
    d.add_argument(
        "--data",
        required=True,
        help="Image folder, .npz (images, labels), numeric .csv (target last), or .csv/.jsonl (text, label).",
    )
    d.add_argument(
        "--task",
        choices=("auto", "classification", "regression"),
        default="auto",
        help="For numeric CSVs: what the last column is (auto: classification for <= 20 non-negative integer values).",
    )
    d.add_argument(
        "--num-classes", type=_positive_int, default=None, help="Number of classes (default: largest label + 1)."
    )
    d.add_argument(
        "--val-fraction", type=float, default=0.1, help="Fraction of rows held out for evaluation (fixed by --seed)."
    )
    d.add_argument("--max-samples", type=_positive_int, default=None, help="Use only the first N rows (quick runs).")
    d.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help="Resize image-folder images to this square size (default 224).",
    )
    d.add_argument("--max-length", type=_positive_int, default=128, help="Token limit for text data.")

    t = parser.add_argument_group("training")
    t.add_argument("--output-dir", required=True, help="Where the model folder, metrics and checkpoints go.")
    t.add_argument("--overwrite", action="store_true", help="Replace an existing --output-dir.")
    length = t.add_mutually_exclusive_group()
    length.add_argument(
        "--epochs", type=_positive_int, default=None, help="Passes over the training split (default 1)."
    )
    length.add_argument(
        "--max-steps", type=_positive_int, default=None, help="Optimizer steps to run (instead of --epochs)."
    )
    t.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="Batch size PER PROCESS; the global batch is batch-size x processes x grad-accum.",
    )
    t.add_argument("--grad-accum", type=_positive_int, default=1, help="Micro-batches accumulated per optimizer step.")
    t.add_argument("--lr", type=float, default=1e-3, help="Peak learning rate (AdamW).")
    t.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay.")
    t.add_argument("--warmup-steps", type=int, default=0, help="Linear warm-up steps before the cosine decay.")
    t.add_argument(
        "--schedule", choices=("cosine", "constant"), default="cosine", help="Learning-rate schedule after warm-up."
    )
    t.add_argument("--label-smoothing", type=float, default=0.0, help="Label smoothing of the cross-entropy.")
    t.add_argument("--seed", type=int, default=0, help="Seed of the model init, the held-out split and the data order.")
    t.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="accelerate mixed precision (default: the accelerate config's, else no). CPU supports bf16.",
    )
    t.add_argument(
        "--eval-batch-size",
        type=_positive_int,
        default=None,
        help="Per-process batch size for evaluation (default 2x --batch-size).",
    )

    c = parser.add_argument_group("checkpoints")
    c.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        metavar="N",
        help="accelerate save_state every N optimizer steps (into <output-dir>/checkpoints).",
    )
    c.add_argument("--keep-checkpoints", type=_positive_int, default=2, help="Keep the newest N checkpoints.")
    c.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="Continue from the newest checkpoint in --output-dir (or the given checkpoint folder), exactly.",
    )

    k = parser.add_argument_group("distillation")
    k.add_argument(
        "--distill-from",
        default=None,
        metavar="MODEL",
        help="Teacher for knowledge distillation: 'base' (the --model before --hanify) or any --model spec.",
    )
    k.add_argument(
        "--distill-alpha", type=float, default=0.5, help="Weight of the distillation term: (1-a) CE + a T^2 KL."
    )
    k.add_argument(
        "--distill-temperature", type=float, default=2.0, help="Softmax temperature T of the distillation term."
    )

    o = parser.add_argument_group("output")
    o.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO_ID",
        help="Upload the output folder to this Hub repo (create_repo + upload_folder; token from `hf auth login` or HF_TOKEN).",
    )
    o.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    o.add_argument("--no-tensorboard", action="store_true", help="Do not log to TensorBoard even when it is installed.")
    o.add_argument("--no-progress", action="store_true", help="Disable the tqdm progress bar.")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m han_surgery.finetune",
        description="Fine-tune a (hanified) timm / transformers model with accelerate; write a Hub-ready folder.",
    )
    return add_arguments(parser)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def han_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``HanConfig`` fields given on the command line (unset options keep HanConfig's defaults)."""
    fields = {
        "reflections": args.han_reflections,
        "init": args.han_init,
        "bias_init": args.han_bias_init,
        "dropout": args.han_dropout,
        "drop_norm": args.han_drop_norm,
        "residual": args.han_residual,
        "final_abs": args.han_final_abs,
        "rules": args.han_rules,
        "include": args.han_include,
        "exclude": args.han_exclude,
    }
    return {k: v for k, v in fields.items() if v is not None}
