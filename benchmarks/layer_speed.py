"""Side-by-side speed of the Han-layer on this machine.

Measures, in one run and interleaved round by round (so machine noise hits every
candidate alike), forward and forward+backward at 8192 rows for n in {384, 768, 1024}:

  han       -- han_surgery.HanLayer: |H x + b| (the compiled CPU kernel when it is built)
  han-torch -- the same layer on its PyTorch implementation (han_surgery.kernels.disabled())
  han-k4, han-k16 -- HanLayer(n, reflections=4 / 16), kernel
  paper     -- the paper authors' formulation (x - 2*(x @ v_hat) * v_hat.T + b).abs()
  linear    -- nn.Linear(n, n) followed by abs
  clone     -- x.clone(): read x, write a fresh same-size tensor (what a layer's forward must do)
  copy_     -- y.copy_(x) into a preallocated y (no allocation)
  abs       -- x.abs() (forward+backward: the memory floor of an element-wise layer)

and prints the ratios issue 15 asks for. Times are the minimum over rounds (the
least-disturbed run) with the median beside it; ratios are the median over rounds
of the per-round ratio, with the ratio of the minima beside it.

    python benchmarks/layer_speed.py [--rows 8192] [--rounds 15] [--threads N] [--clock wall|process] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from han_surgery import Abs, HanLayer, kernels
from han_surgery.checks import positive_int, thread_count
from han_surgery.kernels import cpu


class PaperHanLayer(nn.Module):
    """The authors' reference formulation, kept verbatim as the baseline (b)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(n, 1))
        self.b = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v_hat = self.v / self.v.norm()
        return (x - 2 * (x @ v_hat) * v_hat.T + self.b).abs()


class TorchPath(nn.Module):
    """Runs ``inner`` with the compiled kernels switched off."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with kernels.disabled():
            return self.inner(x)


def candidates(n: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "han": HanLayer(n),
        "han-torch": TorchPath(HanLayer(n)),
        "han-k4": HanLayer(n, reflections=4),
        "han-k16": HanLayer(n, reflections=16),
        "paper": PaperHanLayer(n),
        "linear": nn.Sequential(nn.Linear(n, n), Abs()),
        "clone": torch.clone,
        "abs": torch.abs,
    }


NAMES = ["han", "han-torch", "han-k4", "han-k16", "paper", "linear", "clone", "copy_", "abs"]
FORWARD_ONLY = ("clone", "copy_")


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def time_once(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def measure(
    n: int, rows: int, rounds: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, dict[str, list[float]]]:
    torch.manual_seed(0)
    x = torch.randn(rows, n, requires_grad=True)
    grad = torch.randn(rows, n)
    out = torch.empty(rows, n)
    mods = candidates(n)

    def fwd(m):
        def run():
            with torch.no_grad():
                m(x)

        return run

    def fwd_bwd(m):
        params = list(m.parameters()) if isinstance(m, nn.Module) else []

        def run():
            # Fresh gradients each call, as a training step after ``zero_grad()`` has them: accumulating
            # into last round's buffers would time an add the step does not do.
            x.grad = None
            for p in params:
                p.grad = None
            m(x).backward(grad)

        return run

    jobs = {
        (name, kind): (fwd if kind == "fwd" else fwd_bwd)(m)
        for name, m in mods.items()
        for kind in ("fwd", "fwd+bwd")
        if kind == "fwd" or name not in FORWARD_ONLY
    }
    jobs["copy_", "fwd"] = lambda: out.copy_(x.detach())
    for job in jobs.values():  # warm-up
        job()
        job()
    times: dict[str, dict[str, list[float]]] = {name: {"fwd": [], "fwd+bwd": []} for name in NAMES}
    for _ in range(rounds):
        for (name, kind), job in jobs.items():
            times[name][kind].append(time_once(job, clock))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=positive_int, default=8192)
    parser.add_argument("--widths", type=positive_int, nargs="+", default=[384, 768, 1024])
    parser.add_argument("--rounds", type=positive_int, default=15)
    parser.add_argument("--threads", type=thread_count, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time (default); process: CPU time of this process, steadier on a shared "
        "machine (use with --threads 1, since idle OpenMP threads spin and count as CPU time)",
    )
    parser.add_argument("--json", type=str, default=None, help="also write the raw timings here")
    args = parser.parse_args(argv)
    if min(args.widths) < 16:
        parser.error(f"--widths must be >= 16 (the reflections=16 candidate needs n >= 16), got {min(args.widths)}")
    if args.json:  # before measuring: a bad path fails now, not after the whole run
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--json {args.json}: cannot create its folder ({exc})")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, rows={args.rows}, rounds={args.rounds}, clock={args.clock}"
    )
    print(f"CPU kernel: {'built' if cpu.available() else 'unavailable: han runs the PyTorch path'}")
    print("times in ms: min (median) over rounds\n")
    report = {}
    header = f"{'n':>5} {'pass':8} " + " ".join(f"{name:>16}" for name in NAMES)
    print(header)
    print("-" * len(header))
    for n in args.widths:
        times = measure(n, args.rows, args.rounds, CLOCKS[args.clock])
        report[n] = times
        for kind in ("fwd", "fwd+bwd"):
            cells = [
                f"{min(times[m][kind]) * 1e3:7.2f} ({statistics.median(times[m][kind]) * 1e3:6.2f})"
                if times[m][kind]
                else "-"
                for m in NAMES
            ]
            print(f"{n:>5} {kind:8} " + " ".join(f"{c:>16}" for c in cells))

    # Each round times every candidate back to back, so a per-round ratio compares runs made
    # seconds apart; the median over rounds is steadier than a ratio of minima on a noisy VM.
    def ratio(times, num, den, kind):
        return statistics.median(a / b for a, b in zip(times[num][kind], times[den][kind], strict=False))

    print("\nratios: median over rounds of the per-round ratio (ratio of the minima)   [issue 15 target at n=768]")
    for n, times in report.items():
        best = {m: {k: min(v) for k, v in kinds.items() if v} for m, kinds in times.items()}
        print(f"n={n}")
        for label, num, den, kind, target in (
            ("fwd      han / clone", "han", "clone", "fwd", "<= 1.5"),
            ("fwd      han / copy_", "han", "copy_", "fwd", ""),
            ("fwd+bwd  paper / han", "paper", "han", "fwd+bwd", ">= 4"),
            ("fwd+bwd  linear / han", "linear", "han", "fwd+bwd", ">= 10"),
            ("fwd+bwd  han-torch / han", "han-torch", "han", "fwd+bwd", ""),
            ("fwd      han-k4 / han", "han-k4", "han", "fwd", "<= 1.5"),
            ("fwd+bwd  han-k4 / han", "han-k4", "han", "fwd+bwd", "<= 1.5"),
            ("fwd      han-k16 / han", "han-k16", "han", "fwd", "<= 2"),
            ("fwd+bwd  han-k16 / han", "han-k16", "han", "fwd+bwd", "<= 2"),
        ):
            measured = f"{ratio(times, num, den, kind):5.2f}x ({best[num][kind] / best[den][kind]:5.2f}x)"
            print(f"  {label:26s} {measured}" + (f"   [{target}]" if target else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": args.rows, "threads": torch.get_num_threads(), "seconds": report}, f, indent=1)


if __name__ == "__main__":
    main()
