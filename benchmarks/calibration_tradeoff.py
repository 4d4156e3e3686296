"""Where calibrated surgery stops paying: blocks kept vs parameters vs fidelity, on the real all-MiniLM-L6-v2.

For each way of choosing the blocks to keep (``CalibrationConfig.keep_by``), one calibrated
run with every FFN replaced gives each block's cost: its own fit's FVU (``"block"``), or how
much swapping it in raises the FVU of the last hidden state (``"output"``). Then, for
k = 1 .. 5, ``CalibrationConfig(max_fvu=...)`` is set between the k-th and (k+1)-th
largest cost, so that the costliest blocks keep their original FFN (a kept block changes
the inputs of the blocks after it, so every point is its own calibrated run, and with
``"output"`` the costs after it change too: the point says how many were kept). Each point
is scored as in ``calibrated_surgery.py`` (cosine of the sentence embeddings to the
original's, on Brown sentences of other sample files) and plotted against the model's
parameter count, next to deleting the FFNs, plain hanify and the original.

Usage (from the repository root)::

    python benchmarks/calibration_tradeoff.py --out docs/calibration_tradeoff.png --json docs/results/calibration_tradeoff.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrated_surgery import BROWN, batches, brown_split, delete_ffns, embed, load_minilm, scores  # noqa: E402

from han_surgery import HanConfig, hanify  # noqa: E402
from han_surgery.surgery.calibration import CalibrationConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=BROWN)
    parser.add_argument("--num-calibration", type=int, default=2048)
    parser.add_argument("--num-eval", type=int, default=400)
    parser.add_argument("--side-rank", type=int, default=32)
    parser.add_argument("--record-batches", type=int, default=16)
    parser.add_argument("--heal-steps", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-by", nargs="+", choices=("block", "output"), default=["block", "output"])
    parser.add_argument("--out", type=Path, default=None, help="PNG to write.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer, base = load_minilm()
    cal_text, eval_text = brown_split(args.data, args.num_calibration, args.num_eval, args.seed)
    cal, scored = batches(tokenizer, cal_text, 32, 128), batches(tokenizer, eval_text, 32, 128)
    ref = embed(base, scored)
    han_config = HanConfig(gain=True, input_scale=True, side_rank=args.side_rank)

    def point(label: str, model, kept: int | None, seconds: float | None = None, keep_by: str | None = None) -> dict:
        row = {"label": label, "keep_by": keep_by, "params": sum(p.numel() for p in model.parameters()), "kept": kept}
        row.update(scores(embed(model, scored), ref), seconds=seconds)
        print(json.dumps(row), flush=True)
        return row

    def calibrated(max_fvu: float | None, keep_by: str) -> tuple[torch.nn.Module, list, float]:
        model = copy.deepcopy(base)
        torch.manual_seed(args.seed)
        cfg = CalibrationConfig(
            max_fvu=max_fvu,
            keep_by=keep_by,
            record_batches=args.record_batches,
            heal_steps=args.heal_steps,
            seed=args.seed,
            progress=False,
        )
        start = time.perf_counter()
        report = hanify(model, han_config, calibration=cal, calibration_config=cfg).calibration
        return model, report.blocks, time.perf_counter() - start

    rows = [point("original", base, 6), point("FFNs deleted", delete_ffns(base), 0)]
    plain = copy.deepcopy(base)
    hanify(plain)
    rows.append(point("plain hanify", plain, 0))
    for keep_by in args.keep_by:
        model, blocks, seconds = calibrated(None, keep_by)
        rows.append(point(f"calibrated ({keep_by}), 0 kept", model, 0, seconds, keep_by))
        if keep_by == "block":
            costs = [b.fvu for b in blocks]
        else:  # the rise of the last hidden state's FVU that each swap caused
            running = [0.0] + [b.output_fvu for b in blocks]
            costs = [after - before for before, after in zip(running[:-1], running[1:], strict=True)]
        print(json.dumps({"keep_by": keep_by, "costs": [round(c, 4) for c in costs]}), flush=True)
        costs = sorted(costs, reverse=True)
        for k in range(1, len(costs)):
            threshold = (costs[k - 1] + costs[k]) / 2
            model, blocks, seconds = calibrated(threshold, keep_by)
            kept = sum(b.status == "kept" for b in blocks)
            rows.append(point(f"calibrated ({keep_by}), max_fvu {threshold:.3f}", model, kept, seconds, keep_by))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = {"block": "kept by own fit (FVU)", "output": "kept by rise of the last state's FVU"}
        for keep_by in args.keep_by:
            cal_rows = sorted((r for r in rows if r["keep_by"] == keep_by), key=lambda r: r["params"])
            x, y = [r["params"] / 1e6 for r in cal_rows], [r["cosine"] for r in cal_rows]
            ax.plot(x, y, "o-", label=f"calibrated, {names[keep_by]}")
            for r in cal_rows:
                ax.annotate(
                    f"{r['kept']}", (r["params"] / 1e6, r["cosine"]), textcoords="offset points", xytext=(4, -12)
                )
        for r, marker in zip(rows[:3], ("*", "x", "s"), strict=True):
            ax.plot(r["params"] / 1e6, r["cosine"], marker, markersize=10, label=r["label"])
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel("cosine to the original embeddings (numbers: FFNs kept)")
        ax.set_title(f"all-MiniLM-L6-v2: FFNs kept vs parameters vs fidelity (side rank {args.side_rank})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
