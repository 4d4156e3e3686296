"""The ``han-surgery`` command line.

Each subcommand lives in its own module, which exposes
``register(subparsers) -> None``; the parser it adds sets ``func`` (called with
the parsed ``argparse.Namespace``, returning an exit code). Add a module to
``SUBCOMMAND_MODULES`` to add a subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "han_surgery.demo",
    "han_surgery.surgery.cli",
    "han_surgery.finetune.cli",
    "han_surgery.paper.cli",
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="han-surgery",
        description="Householder (Han) layers for timm and Hugging Face models.",
    )
    parser.add_argument("--version", action="version", version=f"han-surgery {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
