"""``han-surgery paper <experiment> [--quick] [--out DIR] ...``: rerun the paper's experiments.

Experiments (one module each in :mod:`han_surgery.paper`): ``checkerboard``, ``regression``,
``mnist``, ``approximation``, ``mixer``, ``mobilevit``. Without ``--quick`` each follows the
paper's protocol where the paper states it (docs/RESULTS.md lists our choices where it does
not); ``--quick`` is a smoke test of a few steps (seconds; it runs in CI).

Bad input (an option value, a missing or unreadable data file) ends as one line
``han-surgery paper: <what is wrong and what to do>`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ..dataclass_cli import CommandParser
from ..fileio import output_folder_problem
from .common import PaperInputError, use_agg_backend

__all__ = ["EXPERIMENTS", "PROG", "build_parser", "check_out", "main"]

PROG = "han-surgery paper"

EXPERIMENTS: dict[str, tuple[str, str]] = {
    "checkerboard": (
        "han_surgery.paper.checkerboard",
        "Section 4 / Table 3: HanNet vs FCNet and the ablations on the 81x81 checkerboard",
    ),
    "regression": ("han_surgery.paper.regression", "Table 9: HanNet vs FCNet1/FCNet2 on regression CSVs"),
    "mnist": ("han_surgery.paper.mnist_robustness", "Section 5.1 / Table 6: clean and PGD/CW robust accuracy on MNIST"),
    "approximation": ("han_surgery.paper.approximation", "Section 3.2 / Table 2: FC-1 and Han-3 fitting each other"),
    "mixer": ("han_surgery.paper.han_mixer", "Tables 11-12: Han-Mixer vs MLP-Mixer on CIFAR-10/100 or STL10 (--data)"),
    "mobilevit": ("han_surgery.paper.han_mobilevit", "Tables 13-14: Han-MobileViT vs MobileViT on CIFAR or STL10"),
}


class _Parser(CommandParser):
    """A :class:`~han_surgery.dataclass_cli.CommandParser` whose errors raise :class:`PaperInputError` (``main``
    prints them as one line)."""

    def error(self, message: str) -> NoReturn:
        raise PaperInputError(self.usage_problem(message))


def command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces ``args``: ``han-surgery paper <experiment>`` + non-default options."""
    parts = [*PROG.split(), args.experiment]
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


def check_out(
    out: str | None, *, overwrite: bool, experiment: str | None = None, quick: bool = False, plots: bool = False
) -> None:
    """Refuse ``--out`` before the experiment runs: a file, a place no folder can be made, or a non-empty folder
    that an earlier ``han-surgery paper`` run of the same ``experiment`` did not write (its ``results.json`` names
    the command; another experiment's plots would stay beside the new results), or, for a ``quick`` run, one
    that holds a full run's results, unless ``overwrite``; and, where the experiment ``plots``, a Python without
    matplotlib."""
    if out is None:
        return
    if not out.strip():
        raise PaperInputError("--out: give a non-empty folder name (leave out --out to print the results only)")
    folder = Path(out).expanduser()
    problem = output_folder_problem(folder)
    if problem:
        raise PaperInputError(f"--out {out}: {problem}")
    if plots:
        try:
            use_agg_backend()
        except ImportError:
            raise PaperInputError(
                f"--out {out}: this experiment also writes PNG plots, which need matplotlib: pip install "
                "matplotlib, or leave out --out to print the results only"
            ) from None
    if overwrite or not folder.is_dir() or not any(folder.iterdir()):
        return
    try:
        previous = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    writer = f"{PROG} {experiment}" if experiment else PROG
    if isinstance(previous, dict) and str(previous.get("command", "")).startswith(writer + " "):
        if quick and previous.get("quick") is False:
            raise PaperInputError(
                f"--out {out} holds the results of a full run ({previous['command']}): a --quick run would replace "
                "them; choose another folder, or pass --overwrite"
            )
        return  # an earlier run's results: replaced
    raise PaperInputError(
        f"--out {out} already exists, is not empty and was not written by '{writer}': pass --overwrite to write "
        "results.json, results.md and the plots into it anyway, or choose another folder"
    )


def _add_experiments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", metavar="<experiment>")
    for name, (module_name, help_text) in EXPERIMENTS.items():
        module = importlib.import_module(module_name)
        exp = sub.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        exp.add_argument("--quick", action="store_true", help="a few steps: a smoke test (seconds)")
        exp.add_argument("--out", default=None, help="folder for results.json, results.md and PNG plots")
        exp.add_argument(
            "--overwrite",
            action="store_true",
            help="write into a non-empty --out that no earlier run of this experiment wrote, or replace a full "
            "run's results with a --quick run's (files of the same names are replaced)",
        )
        module.add_arguments(exp)
        exp.set_defaults(exp_parser=exp)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The ``han-surgery paper`` parser (experiment modules are imported to build their sub-parsers)."""
    parser = _Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_experiments(parser)
    return parser


def _run(args: argparse.Namespace, prog: str = PROG) -> int:
    if getattr(args, "experiment", None) is None:
        args.paper_parser.print_help()
        return 2
    args.command_line = command_line(args)
    module = importlib.import_module(EXPERIMENTS[args.experiment][0])
    plots = getattr(module, "WRITES_PLOTS", False)
    try:
        check_out(args.out, overwrite=args.overwrite, experiment=args.experiment, quick=args.quick, plots=plots)
        if args.out is not None:  # the folder checked is the one written (the shell leaves ~ in --out=~/x)
            args.out = str(Path(args.out).expanduser())
        module.run(args)
    except PaperInputError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Entry point of ``han-surgery paper ARGS...``; returns the exit status (2 for bad input).

    ``prog`` is the command name used in usage and error lines.
    """
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except PaperInputError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return int(done.code or 0)
    args.paper_parser = parser
    return _run(args, prog)


if __name__ == "__main__":
    sys.exit(main())
