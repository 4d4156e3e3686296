"""Toy data for the fine-tuning tests: a tiny timm ViT's kwargs and a generated 4-class image set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: A tiny ViT (``--model test_vit --model-kwargs``) for the toy runs.
TINY_VIT = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "qkv_bias": False}


def make_images(path: Path, n: int = 480, seed: int = 0) -> Path:
    """Four classes of noisy 16x16 grey images (class k: pixels uniform in [45k, 45k + 100)), saved as ``.npz``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = (rng.random((n, 16, 16)) * 100 + 45 * labels[:, None, None]).astype(np.uint8)
    np.savez(path, images=images, labels=labels)
    return path
