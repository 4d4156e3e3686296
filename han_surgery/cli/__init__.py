"""The ``han-surgery`` command line: a thin layer over the Python API.

``han-surgery <command> ...`` looks the command up in :data:`COMMANDS` and hands the rest of the
arguments to that command's own parser (so a misspelled flag is matched against that command's flags). Only
the command that runs is imported: ``han-surgery --help`` imports no command module.

Every command follows the same contract (see :mod:`han_surgery.cli._common`): a
:class:`~han_surgery.errors.HanSurgeryError` ends as one line ``han-surgery <command>: <message>``
on stderr with exit code 2, and so does a usage error (:class:`~han_surgery.dataclass_cli.CommandParser`);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..dataclass_cli import CommandParser
from ..version import __version__

__all__ = ["COMMANDS", "main"]

#: command -> (module, function ``f(argv, prog) -> int``, one line of help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("han_surgery.cli.demo", "demo", "Run the no-download demo of han-surgery."),
    "inspect": (
        "han_surgery.cli.surgery",
        "inspect",
        "Print the hanify dry-run report of a timm model or a model folder.",
    ),
    "hanify": (
        "han_surgery.cli.surgery",
        "hanify",
        "Rewrite a timm model or a model folder with Han-blocks and save it.",
    ),
    "finetune": (
        "han_surgery.cli.finetune",
        "finetune",
        "Fine-tune a (hanified) model with accelerate and write a Hub-ready folder.",
    ),
    "push": ("han_surgery.cli.finetune", "push", "Upload a fine-tuned model folder to the Hugging Face Hub."),
    "paper": ("han_surgery.cli.paper", "paper", "Reproduce the paper's experiments (checkerboard, regression, ...)."),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="han-surgery",
        description="Householder (Han) layers for timm and Hugging Face models. "
        "Run `han-surgery <command> --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"han-surgery {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``han-surgery`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        module_name, function, _ = COMMANDS[argv[0]]
        command = getattr(importlib.import_module(module_name), function)
        return int(command(argv[1:], prog=f"han-surgery {argv[0]}"))
    parser = _top_parser()
    parser.parse_args(argv)  # --help, --version, or an unknown command (argparse exits with its usage)
    parser.print_help()
    return 2
