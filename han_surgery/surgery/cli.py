"""``han-surgery inspect`` and ``han-surgery hanify``: surgery from the command line.

``SOURCE`` is a timm model name (built with ``pretrained=False`` -- random
weights, no download -- unless ``--pretrained`` is given) or a local directory:
one written by ``han_surgery.save_pretrained``, by transformers'
``save_pretrained`` or by timm's ``save_for_hf`` (safetensors only).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from pathlib import Path

from torch import nn

from .config import HanConfig
from .engine import HanifyError, hanify
from .serialization import HAN_CONFIG_NAME, _refuse_pickles, from_pretrained, save_pretrained

__all__ = ["register", "load_source"]


def load_source(source: str, *, pretrained: bool = False, num_classes: int | None = None) -> nn.Module:
    """Build the model named by ``source`` (a timm name or a local directory), see the module docstring."""
    path = Path(source)
    if path.is_dir():
        _refuse_pickles(path)
        if (path / HAN_CONFIG_NAME).is_file():
            return from_pretrained(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise SystemExit(f"{path}: no config.json; expected a save_pretrained / save_for_hf directory")
        cfg = json.loads(cfg_file.read_text())
        if "architecture" in cfg:  # timm's save_for_hf
            import timm
            from timm.models._hub import load_model_config_from_path

            pretrained_cfg, name, model_args = load_model_config_from_path(path)
            # pretrained_cfg now points at the directory ("local-dir"): timm loads its safetensors.
            if num_classes is not None:
                model_args["num_classes"] = num_classes
            return timm.create_model(name, pretrained=True, pretrained_cfg=pretrained_cfg, **model_args)
        import transformers

        name = (cfg.get("architectures") or [None])[0]
        cls = getattr(transformers, name, None) if name else None
        if cls is None:
            raise SystemExit(f"{cfg_file}: architectures={cfg.get('architectures')} names no transformers class")
        return cls.from_pretrained(str(path), use_safetensors=True)
    import timm

    if not timm.is_model(source):
        near = difflib.get_close_matches(source, timm.list_models(), n=5, cutoff=0.5)
        raise SystemExit(f"{source!r} is neither a directory nor a timm model name; near timm names: {near}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(source, pretrained=pretrained, **kwargs)


def _config(args: argparse.Namespace) -> HanConfig:
    return HanConfig(
        rules=args.rules or None,
        drop_norm=not args.keep_norm,
        residual=args.residual,
        reflections=args.reflections,
        dropout=args.dropout,
        final_abs=args.final_abs,
        include=tuple(args.include or ()),
        exclude=tuple(args.exclude or ()),
    )


def _run(args: argparse.Namespace, dry_run: bool) -> int:
    try:
        model = load_source(args.source, pretrained=args.pretrained, num_classes=args.num_classes)
        start = time.perf_counter()
        report = hanify(model, _config(args), dry_run=dry_run)
        elapsed = time.perf_counter() - start
    except (ValueError, HanifyError) as e:  # NothingToRewriteError, pattern errors, UnsafeCheckpointError, ...
        print(f"han-surgery: error: {e}", file=sys.stderr)
        return 2
    print(report)
    print(f"hanify took {elapsed * 1e3:.0f} ms")
    if not dry_run:
        out = save_pretrained(model, args.output)
        print(f"saved to {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a timm model name (random weights unless --pretrained) or a local model directory")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="timm names only: download/load pretrained weights (default: pretrained=False, no download)",
    )
    p.add_argument("--num-classes", type=int, default=None, help="timm only: classifier size")
    p.add_argument(
        "--residual",
        choices=("keep", "drop"),
        default="keep",
        help="keep the residual around each FFN (default) or drop it (Hanformer)",
    )
    p.add_argument(
        "--keep-norm",
        action="store_true",
        help="keep the pre-norm in front of each FFN (default: drop it, as in the paper)",
    )
    p.add_argument("--reflections", type=int, default=1, help="Householder reflections per Han layer (default 1)")
    p.add_argument("--dropout", type=float, default=None, help="dropout in the Han blocks (default: inherit)")
    p.add_argument("--final-abs", action="store_true", help="end each block with |.| (Han-Mixer block)")
    p.add_argument(
        "--include", action="append", metavar="PATTERN", help="only these modules (glob, or 're:' regex; repeatable)"
    )
    p.add_argument(
        "--exclude", action="append", metavar="PATTERN", help="not these modules (glob, or 're:' regex; repeatable)"
    )
    p.add_argument(
        "--rules", action="append", metavar="NAME", help="only these rules (names or globs, e.g. 'timm.*'; repeatable)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    inspect = subparsers.add_parser(
        "inspect",
        help="Print the hanify dry-run report of a timm model or a model directory.",
        description=__doc__.replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(inspect)
    inspect.set_defaults(func=lambda a: _run(a, dry_run=True))
    rewrite = subparsers.add_parser(
        "hanify",
        help="Rewrite a timm model or a model directory with Han-blocks and save it (safetensors).",
        description=__doc__.replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(rewrite)
    rewrite.add_argument(
        "-o", "--output", required=True, help="directory to write (model.safetensors, han_config.json, config.json)"
    )
    rewrite.set_defaults(func=lambda a: _run(a, dry_run=False))


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="han-surgery")
    register(parser.add_subparsers())
    a = parser.parse_args()
    sys.exit(a.func(a))
