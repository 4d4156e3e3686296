"""``han-surgery paper <experiment> ...``: hands over to :func:`han_surgery.paper.cli.main`, imported only here."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["paper"]


def paper(argv: Sequence[str] | None = None, prog: str = "han-surgery paper") -> int:
    """Run a paper experiment (the paper package is imported only when this command runs)."""
    from ..paper.cli import main

    return main(argv, prog=prog)
