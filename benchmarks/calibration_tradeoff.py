"""Where calibrated surgery stops paying: blocks kept vs parameters vs fidelity, on the real all-MiniLM-L6-v2.

For each way of choosing the blocks to keep (``CalibrationConfig.keep_by``), one calibrated
run with every FFN replaced gives each block's cost: its own fit's FVU (``"block"``), or how
much swapping it in raises the FVU of the last hidden state (``"output"``). Then, for
k = 1 .. 5, ``CalibrationConfig(max_fvu=...)`` is set between the k-th and (k+1)-th
largest cost, so that the costliest blocks keep their original FFN (a kept block changes
the inputs of the blocks after it, so every point is its own calibrated run, and with
``"output"`` the costs after it change too: the point says how many were kept, and counts
that no midpoint gave are searched for by bisection, ``--bisect`` runs each). A third way,
``greedy``, asks for each count directly: ``CalibrationConfig(keep_by="output", keep_count=k)``
chooses the k blocks one calibration pass at a time (nested sets, every count). Each point
is scored as in ``calibrated_surgery.py`` (cosine of the sentence embeddings to the
original's, on Brown sentences of other sample files) and plotted against the model's
parameter count, next to deleting the FFNs, plain hanify and the original.

Usage (from the repository root)::

    python benchmarks/calibration_tradeoff.py --threads 2 --out docs/calibration_tradeoff.png \
        --json docs/results/calibration/tradeoff.json
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
from calibrated_surgery import (  # noqa: E402
    BROWN,
    batches,
    brown_split,
    check_data,
    delete_ffns,
    embed,
    load_minilm,
    scores,
)

from han_surgery import HanConfig, hanify  # noqa: E402
from han_surgery.checks import int_at_least, positive_int, thread_count  # noqa: E402
from han_surgery.surgery.calibration import CalibrationConfig, CalibrationReport  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=BROWN)
    parser.add_argument("--num-calibration", type=positive_int, default=2048)
    parser.add_argument("--num-eval", type=int_at_least(3), default=400, help="Sentences scored (at least 3).")
    parser.add_argument("--side-rank", type=positive_int, default=32)
    parser.add_argument("--record-batches", type=positive_int, default=16)
    parser.add_argument("--heal-steps", type=int_at_least(0), default=0)
    parser.add_argument("--threads", type=thread_count, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--keep-by",
        nargs="+",
        choices=("block", "output", "greedy"),
        default=["block", "output", "greedy"],
        help="how the kept blocks are chosen: max_fvu thresholds on the own fit (block) or on the last state's "
        "rise (output), or keep_count (greedy)",
    )
    parser.add_argument(
        "--bisect", type=int_at_least(0), default=2, help="extra runs per count of kept blocks not yet seen"
    )
    parser.add_argument("--out", type=Path, default=None, help="PNG to write.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    check_data(parser, args.data)
    torch.set_num_threads(args.threads)

    try:
        cal_text, eval_text = brown_split(args.data, args.num_calibration, args.num_eval, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    tokenizer, base = load_minilm()
    cal, scored = batches(tokenizer, cal_text, 32, 128), batches(tokenizer, eval_text, 32, 128)
    ref = embed(base, scored)
    han_config = HanConfig(gain=True, input_scale=True, side_rank=args.side_rank)

    def point(label: str, model, kept: int | None, seconds: float | None = None, keep_by: str | None = None) -> dict:
        params = sum(p.numel() for p in model.parameters())
        row = {"label": label, "keep_by": keep_by, "params": params, "kept": kept}
        row.update(scores(embed(model, scored), ref), seconds=seconds)
        print(json.dumps(row), flush=True)
        return row

    def calibrated(
        max_fvu: float | None, keep_by: str, keep_count: int | None = None
    ) -> tuple[torch.nn.Module, CalibrationReport, float]:
        model = copy.deepcopy(base)
        torch.manual_seed(args.seed)
        cfg = CalibrationConfig(
            max_fvu=max_fvu,
            keep_by=keep_by,
            keep_count=keep_count,
            record_batches=args.record_batches,
            heal_steps=args.heal_steps,
            seed=args.seed,
            progress=False,
        )
        start = time.perf_counter()
        report = hanify(model, han_config, calibration=cal, calibration_config=cfg).calibration
        return model, report, time.perf_counter() - start

    rows = [point("original", base, 6), point("FFNs deleted", delete_ffns(base), 0)]
    plain = copy.deepcopy(base)
    torch.manual_seed(args.seed)  # its random blocks: --seed's, as in calibrated_surgery.py (default HanConfig)
    hanify(plain)
    rows.append(point("plain hanify", plain, 0))

    def greedy() -> None:
        for k in range(1, 6):
            model, report, seconds = calibrated(None, "output", keep_count=k)
            kept = [b.path for b in report.kept]
            rows.append(
                {**point(f"calibrated, keep_count {k}", model, len(kept), seconds, "greedy"), "kept_blocks": kept}
            )

    def sweep(keep_by: str) -> None:
        model, report, seconds = calibrated(None, keep_by)
        rows.append(point(f"calibrated ({keep_by}), 0 kept", model, 0, seconds, keep_by))
        if keep_by == "block":
            costs = [b.fvu for b in report.blocks]
        else:  # the rise of the last hidden state's FVU that each swap caused
            costs = report.output_rises()
        print(json.dumps({"keep_by": keep_by, "costs": [round(c, 4) for c in costs]}), flush=True)
        costs = sorted(costs, reverse=True)
        tried: dict[float, int] = {}  # threshold -> blocks kept

        def run(threshold: float) -> None:
            model, report, seconds = calibrated(threshold, keep_by)
            kept = [b.path for b in report.kept]
            tried[threshold] = len(kept)
            label = f"calibrated ({keep_by}), max_fvu {threshold:.4f}"
            rows.append({**point(label, model, len(kept), seconds, keep_by), "kept_blocks": kept})

        for k in range(1, len(costs)):
            run((costs[k - 1] + costs[k]) / 2)
        # A kept block changes the costs of the blocks after it, so some counts may be missed: bisect for them.
        for k in range(1, len(costs)):
            for _ in range(args.bisect):
                if k in tried.values():
                    break
                below = [t for t, n in tried.items() if n > k] or [0.0]  # thresholds that keep more
                above = [t for t, n in tried.items() if n < k] or [2 * max(costs)]
                if max(below) >= min(above):
                    break
                run((max(below) + min(above)) / 2)

    for keep_by in args.keep_by:
        if keep_by == "greedy":
            greedy()
        else:
            sweep(keep_by)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = {
            "block": "kept by own fit (FVU)",
            "output": "kept by rise of the last state's FVU",
            "greedy": "kept greedily by that rise (keep_count)",
        }
        for keep_by in args.keep_by:
            cal_rows = [r for r in rows if r["keep_by"] == keep_by]
            cal_rows = sorted({(r["params"], r["cosine"]): r for r in cal_rows}.values(), key=lambda r: r["params"])
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
