"""``han-surgery demo``: the no-download tour (see :mod:`han_surgery.demo`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..dataclass_cli import CommandParser
from ..errors import ConfigError
from ..fileio import output_folder_problem
from ._common import require_text, run_command

__all__ = ["demo"]


def demo(argv: Sequence[str] | None = None, prog: str = "han-surgery demo") -> int:
    """Run :func:`han_surgery.demo.run_demo`."""
    parser = CommandParser(prog=prog, description="Run the no-download demo of han-surgery.")
    parser.add_argument("--fast", action="store_true", help="shorter training (about half the time)")
    parser.add_argument(
        "--out-dir",
        default=".",
        help="where checkerboard.png is written (default: .); a checkerboard.png the demo did not write is refused",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        from ..demo import run_demo

        require_text(out_dir=args.out_dir)
        out_dir = os.path.expanduser(args.out_dir)  # the shell leaves ~ in --out-dir=~/x
        problem = output_folder_problem(out_dir)  # before the training, not after it
        if problem:
            raise ConfigError(f"--out-dir {args.out_dir}: {problem}")
        run_demo(fast=args.fast, out_dir=out_dir)
        return 0

    return run_command(prog, body)
