"""Run fine-tunes from argv lists, through the same parser as ``han-surgery finetune``."""

from __future__ import annotations

from typing import Any

from han_surgery.cli.finetune import build_parser, config_from_args, finetune
from han_surgery.finetune import FinetuneConfig, run


def config(argv: list[str]) -> FinetuneConfig:
    """The :class:`FinetuneConfig` that ``han-surgery finetune <argv>`` builds."""
    return config_from_args(build_parser().parse_args(argv))


def run_argv(argv: list[str]) -> dict[str, Any]:
    """Run in-process; the ``results.json`` dict."""
    return run(config(argv)).to_dict()


def cli(argv: list[str]) -> int:
    """``han-surgery finetune <argv>`` in-process: the exit code (errors go to stderr)."""
    return finetune(argv)
