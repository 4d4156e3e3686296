"""``han-surgery paper <experiment> ...``: hands over to :func:`han_surgery.paper.cli.main`, imported only here."""

from __future__ import annotations

from collections.abc import Sequence

from ._common import run_command

__all__ = ["paper"]


def paper(argv: Sequence[str] | None = None, prog: str = "han-surgery paper") -> int:
    """Run a paper experiment (the paper package is imported only when this command runs); Ctrl-C and SIGTERM
    stop it with one line, as every command (:func:`~._common.run_command`)."""
    from ..paper.cli import main

    return run_command(prog, lambda: main(argv, prog=prog))
