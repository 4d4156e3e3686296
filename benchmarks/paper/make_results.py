"""Generate docs/RESULTS.md from the results.json files of the paper runs (docs/results/<experiment>/).

    python benchmarks/paper/make_results.py [--results docs/results] [--out docs/RESULTS.md]

Every number of "ours" comes from a results.json; the paper's values are the ones stated in the
paper's text that we could check (see PAPER_NOTES); the rest are marked as not transcribed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HEADER = """# Reproducing the paper's experiments

Yu & Zhang, *A Lightweight and Gradient-Stable Neural Layer* (Neural Networks, 2024). Each
experiment is one command, `han-surgery paper <experiment>`, with `--quick` (a smoke test that
runs in CI) and `--out DIR` (results.json, results.md, PNG plots). The runs below were made on
**2 CPU cores of a shared machine that other jobs were loading at the same time** (load average
between about 3 and 10 during these runs), with `nice -n 10`; wall times are therefore upper bounds. The folders under
[`docs/results/`](results/) hold each run's results.json, table and plots; this page is generated
from them by `python benchmarks/paper/make_results.py`.

Where a paper value is marked *not transcribed*, the paper's table was not available to us
offline, so we report our numbers without a side-by-side comparison rather than quote from memory.
"""


def _fmt_wall(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def checkerboard(res: list[dict]) -> str:
    """One row per model; runs of the same model from several commands (e.g. two halves of an lr grid) are merged."""
    import math

    out = ["## 1. Checkerboard (Section 4, Figure 1, Table 3)\n"]
    merged: dict[str, dict] = {}
    for r_ in res:
        for row in r_["rows"]:
            m = merged.setdefault(
                row["variant"], {"row": row, "per_lr": [], "commands": [], "wall": 0.0, "iters": set()}
            )
            m["per_lr"] += row["per_lr"]
            m["commands"].append(r_["command"])
            m["iters"].add(r_["config"]["iters"])
    out.append(
        "| model | params | paper test acc % | ours: best test acc over training and lr grid % (paper's protocol) "
        "| ours: final-model test acc % (lr with lowest final train loss) | lr grid (diverged) | iterations | command(s) |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    for variant, m in merged.items():
        row, runs = m["row"], sorted(m["per_lr"], key=lambda p: p["lr"])
        paper_pick = max(runs, key=lambda p: p["best_test_acc"])
        finite = [p for p in runs if math.isfinite(p["final_train_loss"])] or runs
        clean = min(finite, key=lambda p: p["final_train_loss"])
        diverged = [p["lr"] for p in runs if not math.isfinite(p["final_train_loss"])]
        grid = ", ".join(str(p["lr"]) for p in runs) + (
            f" ({', '.join(map(str, diverged))} diverged)" if diverged else ""
        )
        paper = (
            "not stated"
            if row.get("paper_test_acc") is None
            else f"{row['paper_test_acc']:.1f}" + (" (about)" if variant == "fcnet" else "")
        )
        cmds = "<br>".join(f"`{c}`" for c in m["commands"])
        out.append(
            f"| {row['label']} | {row['params']:,} | {paper} | {100 * paper_pick['best_test_acc']:.2f} (lr {paper_pick['lr']}) "
            f"| {100 * clean['final_test_acc']:.2f} (lr {clean['lr']}) | {grid} | {', '.join(f'{i:,}' for i in sorted(m['iters']))} | {cmds} |"
        )
    out.append("")
    out.append("| command | wall time (all its runs, 2 processes) |")
    out.append("|---|---|")
    for r_ in res:
        out.append(f"| `{r_['command']}` | {_fmt_wall(r_['wall_seconds'])} |")
    out.append("")
    for r_ in res:
        name = Path(r_["_folder"]).name
        out.append(f"![boards {name}](results/{name}/boards.png)\n")
    out.append(
        "Protocol: the authors' code (20 x 30 HanNet: dense, dense, 17 Han-layers, dense, dense 30->2 head; ABS; orthogonal "
        "init; MSE on both outputs; SGD momentum 0.9, batch 100, 40,000 iterations, lr x0.2 at 50/70/90%; one seed). The "
        "paper's number is the best test accuracy seen during training (evaluated every 100 iterations) and over the lr grid, "
        "i.e. selected on the test set; we report that number and, as a cleaner figure, the final model's test accuracy at "
        "the lr with the lowest final training loss (the boards show those final models). FCNet uses the authors' 9-value lr "
        "grid. Ablation rows (b, e, f1) follow our reading of Table 3 (same 20 x 30 skeleton; (e)/(f1) replace the 17 "
        "Householder layers by dense 30 x 30 layers; (f1) adds `lambda * sum ||W^T W - I||_F^2`, lambda = 0.01, over the "
        "square dense layers); the paper's ablation numbers were not available to us. The 20 x 30 models train with "
        "`torch.compile` (`--compile`), which changes floating-point rounding but not the model.\n"
    )
    return "\n".join(out)


def regression(res: list[dict]) -> str:
    """One table per protocol (epochs, lr grid, seeds, schedule); runs split by dataset are merged."""
    groups: dict[tuple, list[dict]] = {}
    for r_ in res:
        cfg = r_["config"]
        groups.setdefault((cfg["epochs"], tuple(cfg["lrs"]), len(cfg["seeds"]), cfg["schedule"]), []).append(r_)
    out = [
        "## 2. Regression (Table 9)\n",
        "Paper values: *not transcribed*. The paper's protocol is 300 epochs, lr grid [0.001, 0.003] chosen per seed on "
        "validation RMSE, 5 seeds; what we ran is in each table's heading.\n",
    ]
    for (epochs, lrs, n_seeds, schedule), runs in sorted(groups.items(), key=lambda kv: kv[0][0]):
        out.append(f"### {epochs} epochs, lr grid {list(lrs)}, {n_seeds} seeds, schedule `{schedule}`\n")
        for r_ in runs:
            out.append(
                f"- `{r_['command']}` — wall time {_fmt_wall(r_['wall_seconds'])}"
                f" (results in [`{Path(r_['_folder']).name}/`](results/{Path(r_['_folder']).name}/))"
            )
        out += [
            "",
            "| dataset | model | params | test RMSE (mean ± std over seeds) | test R^2 (mean ± std) | lr chosen per seed |",
            "|---|---|---|---|---|---|",
        ]
        for r_ in runs:
            for row in r_["rows"]:
                out.append(
                    f"| {row['dataset']} | {row['label']} | {row['params']:,} | {row['rmse_mean']:.4g} ± {row['rmse_std']:.2g} "
                    f"| {row['r2_mean']:.4f} ± {row['r2_std']:.2g} | {', '.join(map(str, row['chosen_lrs']))} |"
                )
        out.append("")
        rows = [row for r_ in runs for row in r_["rows"]]
        verdict = []
        for ds in dict.fromkeys(row["dataset"] for row in rows):
            by = {row["model"]: row for row in rows if row["dataset"] == ds}
            if "hannet" in by and "fcnet1" in by:
                better = [m for m in ("fcnet1", "fcnet2") if m in by and by["hannet"]["rmse_mean"] < by[m]["rmse_mean"]]
                verdict.append(
                    f"{ds}: HanNet's mean RMSE is lower than " + (" and ".join(better) if better else "neither FCNet's")
                    if better
                    else f"{ds}: HanNet's mean RMSE is not lower than either FCNet's"
                )
        if verdict:
            out.append("At this budget — " + "; ".join(verdict) + ".\n")
    out.append(
        "Protocol: batch 100, Adam, the best-validation epoch scored on the test split; schedule `epoch` = lr x0.2 at 50% "
        "and 70% of the epochs (the authors' code steps its MultiStepLR every iteration, so their lr fell to 0.04x after 210 "
        "iterations; `--schedule authors` reproduces that). Constant feature columns are dropped and features standardised "
        "with whole-file statistics, as the authors do; the target is not rescaled, so RMSE is in the target's units. Each "
        "seed is a new random 80 / 12 / 8 train / test / validation split. The full protocol (5 seeds x 2 lrs x 3 models "
        "x 3 datasets = 90 runs of 300 epochs, HanNet about 42k Adam steps per run) did not fit this session's shared "
        "2-core budget, so **our models are trained for far fewer epochs than the paper's** and the numbers are not a "
        "like-for-like comparison with Table 9; `han-surgery paper regression --out DIR` runs the full protocol. "
        "The 8-epoch run was written to `docs/results/regression` and the folder renamed afterwards. The paper's "
        "claim is that HanNets keep or improve accuracy with fewer parameters; our short runs do not show HanNet ahead of "
        "FCNet1 (a similar parameter count) once both train for 20 epochs (at 8 epochs it was ahead on two of the three "
        "sets); whether the 300-epoch protocol changes this we cannot tell from these runs.\n"
    )
    return "\n".join(out)


def mnist(r_: dict) -> str:
    cfg = r_["config"]
    keys = [k for k in r_["rows"][0] if isinstance(r_["rows"][0][k], dict) and "mean" in r_["rows"][0][k]]
    out = [
        f"## 3. MNIST robustness (Section 5.1, Table 6): {cfg['epochs']} epochs, {len(cfg['seeds'])} seeds\n",
        f"Command: `{r_['command']}` — wall time {_fmt_wall(r_['wall_seconds'])}. Paper values: *not transcribed*. "
        f"Accuracy % on the {cfg['n_test']} test digits, mean ± std over {len(cfg['seeds'])} seeds.\n",
        "| model | params | " + " | ".join(_mnist_header(k) for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for row in r_["rows"]:
        out.append(
            f"| {row['label']} | {row['params']:,} | "
            + " | ".join(f"{row[k]['mean']:.1f} ± {row[k]['std']:.1f}" for k in keys)
            + " |"
        )
    out.append("")
    by = {row["model"]: row for row in r_["rows"]}
    if {"hannet", "fcnet"} <= set(by):
        attacks = [k for k in keys if k != "clean"]
        better = [k for k in attacks if by["hannet"][k]["mean"] > by["fcnet"][k]["mean"]]
        worse = [_mnist_header(k) for k in attacks if k not in better]
        out.append(
            f"HanNet's robust accuracy is higher than FCNet's in {len(better)} of {len(attacks)} attack settings"
            + (f" (not in: {', '.join(worse)})" if worse else "")
            + f"; its clean accuracy is {by['hannet']['clean']['mean']:.1f}% vs {by['fcnet']['clean']['mean']:.1f}%, "
            f"with {by['hannet']['params']:,} vs {by['fcnet']['params']:,} parameters.\n"
        )
    out.append(f"![mnist](results/{Path(r_['_folder']).name}/robustness.png)\n")
    out.append(
        f"Setup: {cfg['n_train']} training / {cfg['n_test']} test digits of `mnist10k.npz`. **The file is sorted by label** "
        "(its first 8,000 digits are classes 0-7 only), so we use a fixed random 8,000 / 2,000 split (seed 0) instead of "
        f"first/last. Adam lr {cfg['lr']}, batch 100, {cfg['epochs']} epochs. HanNet = 20 Han-layers of width 784 on the "
        "raw pixels + dense 784->10 head (our reading: the paper's exact head was not available to us); FCNet = 784-784-10 "
        f"ReLU. Attacks (white-box, our implementation in `han_surgery/paper/attacks.py`, unit-tested to raise the loss): "
        f"PGD L-inf and L2 with {cfg['pgd_steps']} steps of 2.5 eps / steps and a random start; CW-L2 with fixed c, "
        f"{cfg['cw_steps']} Adam steps (lr 0.01, kappa 0), robust accuracy counts the digits for which no misclassified "
        "point was found. torchattacks 3.5.1 was not used because it pins `requests~=2.25`.\n"
    )
    return "\n".join(out)


def _mnist_header(key: str) -> str:
    if key == "clean":
        return "clean"
    kind, val = key.split("@")
    return {"pgd_linf": f"PGD L-inf {val}", "pgd_l2": f"PGD L2 {val}", "cw": f"CW c={val}"}[kind]


def approximation(r_: dict) -> str:
    cfg = r_["config"]
    dims = cfg["dims"]
    labels = {"fc1": "FC-1", "han3": "Han-3"}
    out = [
        "## 4. Mutual approximation (Section 3.2, Table 2)\n",
        f"Command: `{r_['command']}` — wall time {_fmt_wall(r_['wall_seconds'])}. Paper values: *not transcribed*. "
        f"Test RMSE (mean ± std over {len(cfg['seeds'])} random targets), relative = RMSE / std of the target's output.\n",
        "| student fits target | " + " | ".join(f"d = {d}" for d in dims) + " |",
        "|---|" + "---|" * len(dims),
    ]
    for row in r_["rows"]:
        name = f"{labels[row['student']]} fits {labels[row['target']]}" + (
            " (control)" if row["student"] == row["target"] else ""
        )
        cells = [row["cells"][str(d)] for d in dims]
        out.append(
            f"| {name} | "
            + " | ".join(
                f"{c['rmse_mean']:.2e} ± {c['rmse_std']:.1e} (rel. {c['relative_rmse_mean']:.3f})" for c in cells
            )
            + " |"
        )
    out.append("")
    ctrl = next((row for row in r_["rows"] if row["student"] == row["target"] == "han3"), None)
    if ctrl is not None:
        rel = [ctrl["cells"][str(d)]["relative_rmse_mean"] for d in dims]
        out.append(
            f"Caveat: with this optimiser budget even Han-3 fitting a Han-3 target (an exact fit exists) stays at a relative "
            f"RMSE of {min(rel):.2f}-{max(rel):.2f}, so a large part of the cross-fit errors above is optimisation (the "
            "Han-3 landscape is hard at d <= 4), not necessarily a gap in expressiveness; we draw no conclusion on "
            "Table 2's claim from this run.\n"
        )
    out.append(f"![approximation](results/{Path(r_['_folder']).name}/approximation.png)\n")
    out.append(
        "Our reading of the setting: FC-1 is one dense layer with ABS, `x -> |W x + b|` (d^2 + d parameters), Han-3 is three "
        "Han-layers (6d parameters), both R^d -> R^d; a randomly initialised target of one kind is fitted by the other kind "
        f"with Adam (lr {cfg['lr']}, cosine decay, {cfg['steps']} steps of {cfg['batch_size']} fresh uniform inputs in "
        "[-1, 1]^d), scored on 4,096 held-out inputs. The same-kind rows are controls (an exact fit exists), showing how "
        "much of the error is optimisation rather than expressiveness.\n"
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default="docs/results")
    parser.add_argument("--out", default="docs/RESULTS.md")
    args = parser.parse_args()
    found: dict[str, list[dict]] = {}
    for path in sorted(Path(args.results).glob("*/results.json")):
        res = json.loads(path.read_text())
        if res.get("quick"):
            continue
        res["_folder"] = str(path.parent)
        found.setdefault(res["experiment"], []).append(res)
    parts = [HEADER]
    if "checkerboard" in found:
        parts.append(checkerboard(found["checkerboard"]))
    if "regression" in found:
        parts.append(regression(found["regression"]))
    for name, fn in (("mnist", mnist), ("approximation", approximation)):
        for res in found.get(name, []):
            parts.append(fn(res))
    missing = [n for n in ("checkerboard", "regression", "mnist", "approximation") if n not in found]
    if missing:
        parts.append("## Not run yet\n\n" + ", ".join(missing) + ": no full-run results.json in docs/results/ yet.\n")
    Path(args.out).write_text("\n".join(parts))
    print(f"wrote {args.out} from {sum(len(v) for v in found.values())} result file(s)")


if __name__ == "__main__":
    main()
