"""``han-surgery inspect SOURCE`` and ``han-surgery hanify SOURCE -o DIR``: surgery from the command line.

``SOURCE`` is a timm model name (built with ``pretrained=False`` -- random weights, no
download -- unless ``--pretrained`` is given), ``local-dir:<folder>`` or a folder: one written by
``han_surgery.save_pretrained``, by transformers' ``save_pretrained`` or by timm's
``save_for_hf`` (safetensors only). The surgery options are the fields of ``HanConfig``.

``hanify --calibrate DATA`` fits each new block to the block it replaces on ``DATA`` (calibrated
surgery, see docs/CALIBRATION.md): a text file (``.txt``, ``.tsv``/``.csv`` with a ``sentence`` or
``text`` column, ``.jsonl``), tokenised with the tokenizer saved in the model folder, or what
``finetune --data`` reads (an image folder, ``.npz``). The fit's options are the fields of
``CalibrationConfig``, prefixed: ``--calibration-steps``, ``--calibration-max-fvu``, ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checks import seed_arg
from ..dataclass_cli import CommandParser, add_dataclass_arguments, dataclass_kwargs, flags_in_text
from ..errors import CheckpointError, ConfigError, NothingToRewriteError, first_line
from ..fileio import (
    LOCK_NAME,
    FolderLock,
    input_held_by,
    lies_in,
    output_folder_problem,
    publish_files,
    remove_path,
    too_wide_to_empty,
)
from ..folders import HAN_CONFIG_NAME
from ..surgery.calibration.data import CalibrationData
from ..surgery.config import HanConfig
from ._calibration import add_calibration_arguments, calibration_from_args
from ._common import han_config, num_classes, require_text, run_command, surgery_flag_errors

__all__ = ["build_parser", "inspect", "hanify"]


def build_parser(prog: str, *, write: bool) -> argparse.ArgumentParser:
    """The parser of ``inspect`` (``write=False``) or ``hanify`` (``write=True``)."""
    parser = CommandParser(
        prog=prog,
        # inspect plans only: the paragraph on hanify --calibrate is hanify's
        description=(__doc__ if write else __doc__.split("\n\n``hanify --calibrate")[0]).replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="a timm model name, local-dir:<folder>, or a model folder")
    parser.add_argument(
        "--pretrained", action="store_true", help="timm names only: load timm's pretrained weights (needs the Hub)"
    )
    parser.add_argument("--num-classes", type=num_classes, default=None, help="timm only: classifier size")
    parser.add_argument(
        "--seed",
        type=seed_arg,
        default=0,
        help="seeds torch before the model is built and its Han-blocks drawn: the same command gives the same "
        "weights (default: 0; calibration draws its samples by --calibration-seed)",
    )
    add_dataclass_arguments(parser.add_argument_group("surgery (HanConfig)"), HanConfig)
    if write:
        parser.add_argument(
            "-o",
            "--output",
            required=True,
            help="folder to write (model.safetensors, han_config.json, config.json; for transformers "
            "han_surgery_auto.py; a model folder's tokenizer, image processor and sentence-transformers files too)",
        )
        parser.add_argument("--overwrite", action="store_true", help="replace the -o folder if it is not empty")
        add_calibration_arguments(
            parser,
            data_help="fit each new block to the one it replaces on DATA: a text file (.txt, .tsv, .csv, .jsonl; "
            "tokenised with the tokenizer in the model folder), an image folder, an .npz of images, or a numeric .csv for "
            "a model without a tokenizer",
        )
    return parser


def _run(args: argparse.Namespace, *, write: bool) -> int:
    import torch

    from ..loading import load_model
    from ..surgery.engine import hanify as hanify_model
    from ..surgery.recipe import recipe_of

    require_text(source=args.source, output=getattr(args, "output", None))
    config = han_config(dataclass_kwargs(args, HanConfig))
    calibration_data, calibration_config = calibration_from_args(args) if write else (None, None)
    out = Path(args.output).expanduser() if write else None
    if out is not None:  # before any work: never overwrite a folder the user made without --overwrite
        problem = output_folder_problem(out)
        if problem:
            raise ConfigError(f"-o {out}: {problem}")
        # a staging folder a killed run left is not the user's (the save replaces it)
        if out.is_dir() and any(p.name not in (LOCK_NAME, STAGING_NAME) for p in out.iterdir()) and not args.overwrite:
            raise ConfigError(f"-o {out} already exists and is not empty: pass --overwrite to replace it")
        wide = args.overwrite and too_wide_to_empty(out)
        if wide:
            raise ConfigError(f"-o {out} is {wide}: --overwrite would delete everything in it; write to a new folder")
        held = args.overwrite and input_held_by(out, {"the source": args.source, "--calibrate": args.calibrate})
        if held:
            raise ConfigError(f"-o {out} holds {held}: --overwrite would delete it; write to another folder")
        FolderLock(out, "-o").check()
    folder = _source_folder(args.source)
    tokenizer, tokenizer_error = None, None
    if folder is not None and (write or calibration_data is not None):
        from ..finetune.models import load_tokenizer

        try:
            tokenizer = load_tokenizer(folder)
        except CheckpointError as e:
            if calibration_data is not None:  # --calibrate tokenises with it: fail before any work
                raise
            tokenizer_error = e  # -o is written without it, as without an image processor transformers cannot load
    batches = None
    if calibration_data is not None:  # before the model loads: a bad DATA fails fast
        batches = _calibration_batches(args.source, calibration_data, calibration_config.seed, tokenizer)
    torch.manual_seed(args.seed)  # a timm name's random weights and the Han-blocks' initialisation
    model = load_model(args.source, pretrained=args.pretrained, num_classes=args.num_classes)
    if batches is not None:
        from ..finetune.calibration import check_calibration_positions
        from ..surgery.calibration import with_decoder_inputs

        check_calibration_positions(batches, model, args.source)
        batches = with_decoder_inputs(batches, model)  # T5's decoder needs its own inputs
    with surgery_flag_errors():  # the surgery's errors name the flags given (--include), not HanConfig's fields
        start = time.perf_counter()
        report = hanify_model(
            model, config, dry_run=not write, calibration=batches, calibration_config=calibration_config
        )
        elapsed = time.perf_counter() - start
        print(flags_in_text(str(report), HanConfig))  # its skip reasons name the flags: --residual keep
        print(f"hanify took {elapsed * 1e3:.0f} ms")
        if write and not report.rewrites and not report.skipped and report.han_modules_found:
            # no candidate at all: the options (and the calibration asked for) had no effect, and the copy would be
            # the folder as it is
            already = f"{args.source} is already hanified: {report.han_modules_found} Han modules"
            if batches is not None:
                raise ConfigError(
                    f"--calibrate: no block was rewritten, so none was calibrated ({already}); calibrate when you "
                    "hanify the original model. Nothing was saved"
                )
            raise ConfigError(
                f"no block was rewritten ({already}), so its options have no effect; hanify the original model. "
                "Nothing was saved"
            )
        if out is not None:
            # every candidate skipped: no Han model to save, or (a folder hanified in part) a copy of it as it is
            if not report.rewrites or not recipe_of(model):
                already = (
                    f"; {report.han_modules_found} Han modules were there before" if report.han_modules_found else ""
                )
                raise NothingToRewriteError(
                    f"nothing was rewritten ({len(report.skipped)} candidate block(s) skipped"
                    + (f": {'; '.join(_skip_reasons(report)[:3])}" if report.skipped else "")
                    + f"{already}), so nothing was saved to {out}"
                )
            if tokenizer_error is not None:
                warnings.warn(f"the tokenizer was not copied: {tokenizer_error}", stacklevel=2)
            _save(model, out, folder, tokenizer, overwrite=args.overwrite)
    return 0


def _skip_reasons(report: Any) -> list[str]:
    """The report's distinct skip reasons, those the options decide first (they name a flag, or say what was
    excluded or kept), then the most frequent: a model's many position-bias MLPs must not hide why its FFNs were
    left."""
    reasons = [flags_in_text(s.reason, HanConfig) for s in report.skipped]
    counts = Counter(reasons)

    def optional(reason: str) -> bool:
        return "--" in reason or "excluded" in reason or "kept" in reason

    return sorted(counts, key=lambda r: (not optional(r), -counts[r], r))


STAGING_NAME = ".hanify.tmp"
"""The folder inside ``-o`` that :func:`_save` writes before it publishes."""


def _source_folder(source: str) -> Path | None:
    """The folder ``source`` names (``local-dir:`` or a path), or ``None`` for a timm model name."""
    folder = Path(source.removeprefix("local-dir:")).expanduser()
    return folder if folder.is_dir() else None


def _save(model: Any, out: Path, source: Path | None, tokenizer: Any, *, overwrite: bool) -> None:
    """``save_pretrained`` into a staging folder inside ``out`` with the source folder's tokenizer, image
    processor and sentence-transformers pipeline, then publish; a failure leaves neither the staging folder
    nor an ``out`` it created, nor the parent folders it created for it (``-o new/deep/out``)."""
    from ..surgery.serialization import save_pretrained

    created = [p for p in (out, *out.parents) if not p.exists()]  # out first, then the parents the lock makes
    staging = out / STAGING_NAME
    locked = False  # the staging folder is this run's only once it holds the lock: else another run's
    try:
        with FolderLock(out, "-o") as lock:
            locked = True
            if lock.took_over is not None:
                print(f"note: took over the lock left in {out} by a run that died (pid {lock.took_over.get('pid')})")
            filled = sorted(p.name for p in out.iterdir() if p.name not in (LOCK_NAME, staging.name))
            if filled and not overwrite:  # checked empty when the run started; another run or the user wrote since
                raise ConfigError(
                    f"-o {out} is no longer empty ({', '.join(filled[:3])}{' ...' if len(filled) > 3 else ''} "
                    "appeared while this run worked): nothing was written; pass --overwrite to replace it"
                )
            remove_path(staging)  # a dead run's, or a file of that name
            save_pretrained(model, staging)
            outside = _links_outside(source) if source is not None else []
            if outside:  # the tokenizer and the image processor were read through those links: not written out
                warnings.warn(
                    f"the tokenizer and image processor were not copied: {', '.join(outside[:3])} in {source} "
                    f"link{'s' if len(outside) == 1 else ''} to outside it",
                    stacklevel=2,
                )
            if tokenizer is not None and not outside:
                tokenizer.save_pretrained(str(staging))
            if source is not None:
                if not outside:
                    _save_processor(source, staging)
                _copy_sentence_transformers(source, staging)
            names = publish_files(staging, out, marker=HAN_CONFIG_NAME, replace=overwrite)
    except BaseException:
        if locked and staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # the deepest first; only while empty (another run may have written beside it)
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()
            else:
                break
        raise
    print(f"saved to {out} ({', '.join(names)})")


def _save_processor(source: Path, staging: Path) -> None:
    """Save the image processor of ``source`` (its ``preprocessor_config.json``) into ``staging``, if it has one."""
    if not (source / "preprocessor_config.json").is_file():
        return
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError, ImportError, TypeError, KeyError, AttributeError) as e:  # [] gives AttributeError
        message = f"{source / 'preprocessor_config.json'} was not copied: transformers cannot load it ({first_line(e)})"
        warnings.warn(message, stacklevel=2)
        return
    processor.save_pretrained(str(staging))


SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
"""A sentence-transformers folder's own files: its module list and its settings (``max_seq_length``, prompts, ...)."""


def _copy_sentence_transformers(source: Path, staging: Path) -> None:
    """Copy the pipeline a sentence-transformers folder (one with ``modules.json``) builds around its transformer:
    :data:`SENTENCE_TRANSFORMERS_FILES` and the folders of the other modules (pooling, normalisation, dense layers;
    their JSON and safetensors files), so that ``SentenceTransformer(out)`` loads the same pipeline around the
    hanified transformer instead of a default one (mean pooling, no normalisation, another ``max_seq_length``)."""
    modules_file = source / "modules.json"
    if not modules_file.is_file():
        return
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"{modules_file} was not copied: not readable JSON ({e})", stacklevel=2)
        return
    paths = [m.get("path") for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    if not paths or not all(isinstance(p, str) for p in paths):
        warnings.warn(f"{modules_file} was not copied: not a sentence-transformers module list", stacklevel=2)
        return
    roots = _own_roots(source)
    own = staging.parent.resolve()  # -o itself, which may lie inside a module folder of the source
    for name in SENTENCE_TRANSFORMERS_FILES:
        if not (source / name).is_file():
            continue
        if not lies_in(source / name, *roots):
            warnings.warn(f"{source / name} was not copied: it links to outside {source}", stacklevel=2)
            continue
        shutil.copyfile(source / name, staging / name)
    for path in paths:  # "" is the transformer itself, saved above
        folder = source / path
        if not path or Path(path).is_absolute() or ".." in Path(path).parts or not folder.is_dir():
            continue
        if folder.resolve() == source.resolve():  # "." (or "./"): the transformer's own folder, saved above
            continue
        if not lies_in(folder, *roots):
            warnings.warn(f"{folder} was not copied: it links to outside {source}", stacklevel=2)
            continue
        for file in sorted(f for f in folder.rglob("*") if f.is_file() and not lies_in(f, own)):
            if file.suffix not in (".json", ".safetensors"):
                warnings.warn(f"{file} was not copied (only JSON and safetensors files are)", stacklevel=2)
                continue
            if not lies_in(file, *roots):
                warnings.warn(f"{file} was not copied: it links to outside {source}", stacklevel=2)
                continue
            target = staging / path / file.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)


def _links_outside(source: Path) -> list[str]:
    """The names of the files directly in ``source`` that link to outside it (:func:`_own_roots`): what its
    tokenizer or image processor reads from such a file would be written into ``-o``."""
    roots = _own_roots(source)
    return sorted(p.name for p in source.iterdir() if p.is_symlink() and p.is_file() and not lies_in(p, *roots))


def _own_roots(source: Path) -> tuple[Path, ...]:
    """Where the files of the model folder ``source`` may really live: the folder itself, and for a folder in a
    snapshot of the Hub cache (``models--org--name/snapshots/<revision>[/<subfolder>]``, whose files link to
    ``blobs/`` beside ``snapshots/``) its repo."""
    real = source.resolve()
    snapshots = next((p for p in real.parents if p.name == "snapshots"), None)
    return (real, snapshots.parent) if snapshots is not None else (real,)


def _calibration_batches(source: str, data: CalibrationData, seed: int, tokenizer: Any = None) -> list:
    """``--calibrate``'s batches; text is tokenised with ``tokenizer``, the one saved in the ``source`` folder."""
    from ..finetune.calibration import load_calibration_batches

    return load_calibration_batches(data, tokenizer=tokenizer, model_name=source, seed=seed)


def inspect(argv: Sequence[str] | None = None, prog: str = "han-surgery inspect") -> int:
    """``han-surgery inspect``: the dry-run report (nothing is written)."""
    args = build_parser(prog, write=False).parse_args(argv)
    return run_command(prog, lambda: _run(args, write=False))


def hanify(argv: Sequence[str] | None = None, prog: str = "han-surgery hanify") -> int:
    """``han-surgery hanify``: rewrite the model and save it with ``han_surgery.save_pretrained``."""
    args = build_parser(prog, write=True).parse_args(argv)
    return run_command(prog, lambda: _run(args, write=True))
