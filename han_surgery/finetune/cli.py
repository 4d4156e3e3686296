"""``han-surgery finetune ...`` and ``han-surgery push <dir> <repo_id>`` (registered in ``han_surgery.cli``)."""

from __future__ import annotations

import argparse
import sys


def _push(args: argparse.Namespace) -> int:
    from .hub import HubUploadError, push_folder

    try:
        url = push_folder(args.directory, args.repo_id, private=args.private)
    except HubUploadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"pushed {args.directory} to {url}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .train import run_cli

    return run_cli(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    from .args import add_arguments

    parser = subparsers.add_parser(
        "finetune",
        help="Fine-tune a (hanified) model with accelerate and write a Hub-ready folder.",
        description="Fine-tune a (hanified) timm / transformers model with accelerate; write a Hub-ready folder. "
        "For several processes: accelerate launch -m han_surgery.finetune <same options>.",
    )
    add_arguments(parser)
    parser.set_defaults(func=_finetune)

    push = subparsers.add_parser("push", help="Upload a fine-tuned model folder to the Hugging Face Hub.")
    push.add_argument("directory", help="A folder written by han-surgery finetune.")
    push.add_argument("repo_id", help="<user or org>/<name> of the model repo (created if missing).")
    push.add_argument("--private", action="store_true", help="Create the repo as private.")
    push.set_defaults(func=_push)
