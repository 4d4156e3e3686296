"""``han-surgery inspect SOURCE`` and ``han-surgery hanify SOURCE -o DIR``: surgery from the command line.

``SOURCE`` is a timm model name (built with ``pretrained=False`` -- random weights, no
download -- unless ``--pretrained`` is given), ``local-dir:<folder>`` or a folder: one written by
``han_surgery.save_pretrained``, by transformers' ``save_pretrained`` or by timm's
``save_for_hf`` (safetensors only). The surgery options are the fields of ``HanConfig``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from ..dataclass_cli import add_dataclass_arguments, dataclass_kwargs
from ..surgery.config import HanConfig
from ._common import positive_int, run_command

__all__ = ["build_parser", "inspect", "hanify"]


def build_parser(prog: str, *, write: bool) -> argparse.ArgumentParser:
    """The parser of ``inspect`` (``write=False``) or ``hanify`` (``write=True``)."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog=prog,
        description=__doc__.replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="a timm model name, local-dir:<folder>, or a model folder")
    parser.add_argument(
        "--pretrained", action="store_true", help="timm names only: load timm's pretrained weights (needs the Hub)"
    )
    parser.add_argument("--num-classes", type=positive_int, default=None, help="timm only: classifier size")
    add_dataclass_arguments(parser.add_argument_group("surgery (HanConfig)"), HanConfig)
    if write:
        parser.add_argument(
            "-o", "--output", required=True, help="folder to write (model.safetensors, han_config.json, config.json)"
        )
    return parser


def _run(args: argparse.Namespace, *, write: bool) -> int:
    from ..loading import load_model
    from ..surgery.engine import hanify as hanify_model
    from ..surgery.serialization import save_pretrained

    config = HanConfig(**dataclass_kwargs(args, HanConfig))
    model = load_model(args.source, pretrained=args.pretrained, num_classes=args.num_classes)
    start = time.perf_counter()
    report = hanify_model(model, config, dry_run=not write)
    elapsed = time.perf_counter() - start
    print(report)
    print(f"hanify took {elapsed * 1e3:.0f} ms")
    if write:
        out = save_pretrained(model, args.output)
        print(f"saved to {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def inspect(argv: Sequence[str] | None = None, prog: str = "han-surgery inspect") -> int:
    """``han-surgery inspect``: the dry-run report (nothing is written)."""
    args = build_parser(prog, write=False).parse_args(argv)
    return run_command(prog, lambda: _run(args, write=False))


def hanify(argv: Sequence[str] | None = None, prog: str = "han-surgery hanify") -> int:
    """``han-surgery hanify``: rewrite the model and save it with ``han_surgery.save_pretrained``."""
    args = build_parser(prog, write=True).parse_args(argv)
    return run_command(prog, lambda: _run(args, write=True))
