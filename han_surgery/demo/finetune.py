"""The fine-tuning step of the demo: a tiny timm ViT trained, hanified, distilled (~20 s, no download)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..finetune import FinetuneConfig, run
from ..finetune.hub import command_line
from ..surgery.config import HanConfig
from ..utils import format_table
from ._format import section

__all__ = ["TINY_VIT", "make_images", "step_finetune"]

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
    section("Fine-tuning with accelerate: train, hanify, distil, ship (generated images)")
    with tempfile.TemporaryDirectory(prefix="han-finetune-") as tmp:
        root = Path(tmp)
        common = {"data": str(make_images(root / "shapes.npz")), "batch_size": 32, "lr": 3e-3}
        common.update(progress=False, tensorboard=False)
        rows = []
        start = time.perf_counter()
        base_config = FinetuneConfig(
            model="test_vit", model_kwargs=TINY_VIT, epochs=2, output_dir=str(root / "base"), **common
        )
        print(f"(equivalent to: {command_line(base_config)})")
        base = run(base_config)
        rows.append(["test_vit (tiny), 2 epochs", f"{base.params:,}", f"{base.metrics['eval_accuracy']:.1%}",
                     f"{base.total_runtime_s:.1f} s"])  # fmt: skip
        han_config = FinetuneConfig(
            model=str(root / "base"),
            hanify=HanConfig(),
            distill_from="base",
            epochs=1,
            checkpoint_every=7,
            output_dir=str(root / "han"),
            **common,
        )
        print(f"\n(equivalent to: {command_line(han_config)})")
        han = run(han_config)
        rows.append(["hanified + distilled, 1 epoch", f"{han.params:,}", f"{han.metrics['eval_accuracy']:.1%}",
                     f"{han.total_runtime_s:.1f} s"])  # fmt: skip
        print()
        print(format_table(["model", "params", "held-out accuracy", "wall time"], rows))
        files = sorted(p.name + ("/" if p.is_dir() else "") for p in (root / "han").iterdir())
        print(f"\nThe output folder is ready for `han-surgery push <dir> <user>/<repo>`: {', '.join(files)}")
        card = (root / "han" / "README.md").read_text().split("---")[1].strip().splitlines()
        print("Its model card starts with:\n  " + "\n  ".join(card[:12]) + "\n  ...")
        print(
            f"(2 runs in {time.perf_counter() - start:.1f} s; multi-process: accelerate launch -m han_surgery.finetune ...)"
        )
