"""``han-surgery finetune ...`` (also ``python -m han_surgery.finetune`` and ``accelerate launch -m
han_surgery.finetune``) and ``han-surgery push DIR REPO_ID``.

The fine-tune flags are derived from :class:`~han_surgery.finetune.FinetuneConfig`'s fields and
the surgery flags (with ``--hanify``) from :class:`~han_surgery.HanConfig`'s and the calibration flags
(with ``--calibrate``) from :class:`~han_surgery.surgery.calibration.CalibrationData`'s and
:class:`~han_surgery.surgery.calibration.CalibrationConfig`'s, so the CLI and the Python API never
drift apart.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..dataclass_cli import CommandParser, add_dataclass_arguments, dataclass_kwargs, flag_name
from ..errors import ConfigError
from ..finetune.config import SURGERY, FinetuneConfig
from ..surgery.config import HanConfig
from ._calibration import add_calibration_arguments, calibration_from_args
from ._common import han_config, require_text, run_command, surgery_flag_errors

__all__ = ["build_parser", "config_from_args", "finetune", "push", "main"]

HAN_PREFIX = "han."


def build_parser(prog: str = "han-surgery finetune") -> argparse.ArgumentParser:
    """The ``finetune`` parser: one option per :class:`FinetuneConfig` field, plus ``--hanify`` and HanConfig's."""
    parser = CommandParser(
        prog=prog,
        description="Fine-tune a (hanified) timm / transformers model with accelerate; write a Hub-ready folder. "
        "For several processes: accelerate launch -m han_surgery.finetune <same options>.",
    )
    add_dataclass_arguments(parser, FinetuneConfig)
    surgery = parser.add_argument_group(SURGERY)
    surgery.add_argument(
        "--hanify",
        action="store_true",
        help="apply han_surgery.hanify before training (the options below configure it)",
    )
    add_dataclass_arguments(surgery, HanConfig, dest_prefix=HAN_PREFIX)
    add_calibration_arguments(
        parser,
        data_help="with --hanify: fit each new block to the one it replaces on DATA: 'train' (the training split of "
        "--data; ./train for a path of that name), a text file (.txt, .tsv, .csv, .jsonl; tokenised with the model's "
        "tokenizer), an image folder, an .npz of images, or a numeric .csv for a model without a tokenizer",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` the parsed flags describe (raises ``ConfigError`` on a bad combination)."""
    han_kwargs = dataclass_kwargs(args, HanConfig, dest_prefix=HAN_PREFIX)
    if han_kwargs and not args.hanify:
        import dataclasses

        flags = [flag_name(f) for f in dataclasses.fields(HanConfig) if f.name in han_kwargs]
        raise ConfigError(f"{', '.join(flags)} configure the surgery: add --hanify")
    hanify = han_config(han_kwargs) if args.hanify else None
    calibrate, calibration = calibration_from_args(args)
    return FinetuneConfig(
        **dataclass_kwargs(args, FinetuneConfig), hanify=hanify, calibrate=calibrate, calibration=calibration
    )


def finetune(argv: Sequence[str] | None = None, prog: str = "han-surgery finetune") -> int:
    """``han-surgery finetune``: build the config from the flags and call :func:`han_surgery.finetune.run`."""
    args = build_parser(prog).parse_args(argv)

    def body() -> int:
        from ..finetune.runner import run

        config = config_from_args(args)
        with surgery_flag_errors():  # --hanify's surgery and calibration name the flags given, not the fields
            run(config)
        return 0

    return run_command(prog, body)


def push(argv: Sequence[str] | None = None, prog: str = "han-surgery push") -> int:
    """``han-surgery push DIR REPO_ID [--private]``: :func:`han_surgery.finetune.push_folder`."""
    parser = CommandParser(prog=prog, description="Upload a fine-tuned model folder to the Hugging Face Hub.")
    parser.add_argument("directory", help="a folder written by han-surgery finetune")
    parser.add_argument("repo_id", help="<user or org>/<name> of the model repo (created if missing)")
    parser.add_argument(
        "--private",
        action="store_true",
        help="create the repo as private (without it: public, unless the organization's default is private; "
        "a repo that exists keeps its visibility)",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        from ..finetune.hub import push_folder

        require_text(directory=args.directory, repo_id=args.repo_id)
        url = push_folder(args.directory, args.repo_id, private=True if args.private else None)
        print(f"pushed {args.directory} to {url}")
        return 0

    return run_command(prog, body)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m han_surgery.finetune``: the same as ``han-surgery finetune``."""
    return finetune(argv)
