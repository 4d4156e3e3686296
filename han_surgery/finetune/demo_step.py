"""The fine-tuning step of ``han-surgery demo``: a tiny timm ViT trained, hanified, distilled (~20 s, no download)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

TINY_VIT = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "qkv_bias": False}


def make_images(path: Path, n: int = 480, seed: int = 0) -> Path:
    """Four classes of noisy 16x16 grey images: class k has pixels uniform in [45k, 45k + 100)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = (rng.random((n, 16, 16)) * 100 + 45 * labels[:, None, None]).astype(np.uint8)
    np.savez(path, images=images, labels=labels)
    return path


def step_finetune() -> None:
    """Train a base model, hanify it, fine-tune it with distillation: accelerate, checkpoints, Hub folder."""
    from ..demo import format_table, section
    from .args import parse_args
    from .train import run

    section("Fine-tuning with accelerate: train, hanify, distil, ship (generated images)")
    with tempfile.TemporaryDirectory(prefix="han-finetune-") as tmp:
        root = Path(tmp)
        data = make_images(root / "shapes.npz")
        common = ["--data", str(data), "--batch-size", "32", "--lr", "3e-3", "--no-progress", "--no-tensorboard"]
        rows = []
        start = time.perf_counter()
        print("$ python -m han_surgery.finetune --model test_vit ... --epochs 2 --output-dir base")
        base = run(
            parse_args(
                [
                    "--model",
                    "test_vit",
                    "--model-kwargs",
                    json.dumps(TINY_VIT),
                    "--epochs",
                    "2",
                    "--output-dir",
                    str(root / "base"),
                    *common,
                ]
            )
        )
        rows.append(
            [
                "test_vit (tiny), 2 epochs",
                f"{base['params']:,}",
                f"{base['eval_accuracy']:.1%}",
                f"{base['total_runtime_s']:.1f} s",
            ]
        )
        print(
            "\n$ python -m han_surgery.finetune --model base --hanify --distill-from base --epochs 1 --checkpoint-every 7 --output-dir han"
        )
        han = run(
            parse_args(
                [
                    "--model",
                    str(root / "base"),
                    "--hanify",
                    "--distill-from",
                    "base",
                    "--epochs",
                    "1",
                    "--checkpoint-every",
                    "7",
                    "--output-dir",
                    str(root / "han"),
                    *common,
                ]
            )
        )
        rows.append(
            [
                "hanified + distilled, 1 epoch",
                f"{han['params']:,}",
                f"{han['eval_accuracy']:.1%}",
                f"{han['total_runtime_s']:.1f} s",
            ]
        )
        print()
        print(format_table(["model", "params", "held-out accuracy", "wall time"], rows))
        files = sorted(p.name + ("/" if p.is_dir() else "") for p in (root / "han").iterdir())
        print(f"\nThe output folder is ready for `han-surgery push <dir> <user>/<repo>`: {', '.join(files)}")
        card = (root / "han" / "README.md").read_text().split("---")[1].strip().splitlines()
        print("Its model card starts with:\n  " + "\n  ".join(card[:12]) + "\n  ...")
        print(
            f"(2 runs in {time.perf_counter() - start:.1f} s; multi-process: accelerate launch -m han_surgery.finetune ...)"
        )
