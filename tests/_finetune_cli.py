"""Run fine-tunes from argv lists, through the same parser as ``han-surgery finetune``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from han_surgery.cli.finetune import build_parser, config_from_args, finetune
from han_surgery.finetune import FinetuneConfig, run


def config(argv: list[str]) -> FinetuneConfig:
    """The :class:`FinetuneConfig` that ``han-surgery finetune <argv>`` builds."""
    return config_from_args(build_parser().parse_args(argv))


def run_argv(argv: list[str]) -> dict[str, Any]:
    """Run in-process; the ``results.json`` dict."""
    return run(config(argv)).to_dict()


def cli(argv: list[str]) -> int:
    """``han-surgery finetune <argv>`` in-process: the exit code (errors go to stderr)."""
    return finetune(argv)


def rehash_checkpoint(checkpoint: Path) -> None:
    """Rewrite a checkpoint's manifest after a test edited its files, as an older version's files or an attacker who
    edits the folder would leave it (the manifest guards against corruption only)."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(checkpoint.iterdir())
        if p.is_file() and p.name != "checkpoint_manifest.json"
    }
    (checkpoint / "checkpoint_manifest.json").write_text(json.dumps({"files": files}))
