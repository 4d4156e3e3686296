"""``han-surgery paper <experiment> [--quick] [--out DIR] ...``: rerun the paper's experiments.

Experiments: ``checkerboard``, ``regression``, ``mnist``, ``approximation`` (one module each in
:mod:`han_surgery.paper`). ``--quick`` is a smoke test of a few hundred steps (seconds; it runs
in CI); without it the run follows the paper's protocol as far as documented in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
from collections.abc import Sequence

EXPERIMENTS: dict[str, tuple[str, str]] = {
    "checkerboard": (
        "han_surgery.paper.checkerboard",
        "Section 4 / Table 3: HanNet vs FCNet on the 81x81 checkerboard",
    ),
    "regression": ("han_surgery.paper.regression", "Table 9: HanNet vs FCNet1/FCNet2 on regression CSVs"),
    "mnist": ("han_surgery.paper.mnist_robustness", "Section 5.1 / Table 6: clean and PGD/CW robust accuracy on MNIST"),
    "approximation": ("han_surgery.paper.approximation", "Section 3.2 / Table 2: FC-1 and Han-3 fitting each other"),
}


def command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces ``args``: ``han-surgery paper <experiment>`` + non-default options."""
    parts = ["han-surgery", "paper", args.experiment]
    for action in args.exp_parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:
            parts.append(flag)
        else:
            for v in value if isinstance(value, list) else [value]:
                parts += [flag, shlex.quote(str(v))]
    return " ".join(parts)


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "experiment", None) is None:
        args.paper_parser.print_help()
        return 2
    args.command_line = command_line(args)
    importlib.import_module(EXPERIMENTS[args.experiment][0]).run(args)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``paper`` subcommand (experiment modules are imported when their parser is built)."""
    parser = subparsers.add_parser(
        "paper",
        help="Reproduce the paper's experiments (checkerboard, regression, mnist, approximation).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="experiment", metavar="<experiment>")
    for name, (module_name, help_text) in EXPERIMENTS.items():
        exp = sub.add_parser(
            name,
            help=help_text,
            description=importlib.import_module(module_name).__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        exp.add_argument("--quick", action="store_true", help="a few hundred steps: a smoke test (seconds)")
        exp.add_argument("--out", default=None, help="folder for results.json, results.md and PNG plots")
        importlib.import_module(module_name).add_arguments(exp)
        exp.set_defaults(exp_parser=exp)
    parser.set_defaults(func=_run, paper_parser=parser)


def main(argv: Sequence[str] | None = None, prog: str = "han-surgery paper") -> int:
    """``han-surgery paper <experiment> ...``: parse ``argv`` and run the experiment; return the exit code."""
    parser = argparse.ArgumentParser(prog=prog.rsplit(" ", 1)[0])
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["paper", *(argv or [])])
    return _run(args)
