"""Side-by-side training and inference speed, and peak training memory, of Han models and their peers.

Rows (each a pair measured in one run, interleaved round by round so machine noise hits both
alike; ratios are the median over rounds of the per-round ratio):

* surgery on transformers: ``vit_small_patch16_224``, ``vit_base_patch16_224`` (timm) and
  BERT-base (transformers ``BertForSequenceClassification``, sequence length 128), each
  original vs ``hanify(model)`` (default :class:`~han_surgery.HanConfig`);
* the paper's models against the dense peers the paper pairs them with:
  ``han_mixer_m1h16_32`` vs the MLP(4) Mixer ``han_mixer_m4h0_32``, ``han_mixer_m0h16_32`` vs the
  MLP(2) Mixer ``han_mixer_m2h0_32``, ``han_mobilevit_xxs`` vs ``mobilevit_xxs``, and the
  regression HanNet (depth 20, width 200; ``han_surgery.paper.common.han_net``) vs FCNet1
  (depth 5, width 50) at batch 100, with the HanNet's 19 Han-layers either as built today
  (one ``HanLayer`` module each) or as one :class:`~han_surgery.layers.HanStack`.

A train step is ``zero_grad, forward, loss, backward, AdamW step``; inference is a forward
under ``torch.no_grad`` in eval mode. "Han, PyTorch path" is the Han model with the compiled
kernels switched off (:func:`han_surgery.kernels.disabled`). Peak memory is measured in a
separate process per variant: the growth of the peak resident set size over building the model
and two training steps (parameters, gradients, optimizer state and activations), above the
process after imports (transformers and the Han CPU kernel included, so that the kernel's one-time load is
charged to no variant; ``VmHWM`` in ``/proc/self/status``, Linux). The
child runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc returns freed tensors to the
system at once: without it, glibc's adaptive threshold keeps the hanified model's freed FFN
weights in the heap, and the resident set measures the allocator's history, not live memory.
For the surgery rows a third variant gives the floor of any FFN surgery: the hanified model with
every Han-block replaced by a branch that outputs zeros and has no parameters (the FFNs deleted;
their dropped pre-norms stay dropped), so what is left is the attention, norms, embeddings and head.

    python benchmarks/model_speed.py [--threads 1] [--rounds 7] [--rows transformers paper] [--no-memory]

Prints what it measured (times in ms, min and median over rounds) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import han_surgery
from han_surgery import kernels
from han_surgery.checks import positive_int, thread_count
from han_surgery.layers import HanBlock, stack_han_layers
from han_surgery.paper.common import fc_net, han_net

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


@dataclass
class Workload:
    """A model, its input, and the loss of one training step."""

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    loss: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
    infer: Callable[[nn.Module, tuple[torch.Tensor, ...]], object]


def _image_workload(model: nn.Module, batch: int) -> Workload:
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(batch, *size)
    y = torch.randint(0, model.num_classes, (batch,))
    return Workload(model, (x, y), lambda m, t: F.cross_entropy(m(t[0]), t[1]), lambda m, t: m(t[0]))


def _bert(batch: int, seq: int) -> Workload:
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(num_labels=2))
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    labels = torch.randint(0, 2, (batch,))
    return Workload(
        model,
        (ids, labels),
        lambda m, t: m(input_ids=t[0], labels=t[1]).loss,
        lambda m, t: m(input_ids=t[0]).logits,
    )


def _hannet(stacked: bool, features: int = 8, batch: int = 100) -> Workload:
    """The paper's regression HanNet (depth 20, width 200), its Han-layers as modules or as one HanStack."""
    net = han_net(features, 200, 20, 1, dense_first=1, dense_last=0)
    if stacked:
        net = stack_han_layers(net)
    return _regression(net, features, batch)


def _regression(net: nn.Module, features: int = 8, batch: int = 100) -> Workload:
    x, y = torch.randn(batch, features), torch.randn(batch, 1)
    return Workload(net, (x, y), lambda m, t: F.mse_loss(m(t[0]), t[1]), lambda m, t: m(t[0]))


class ZeroBranch(nn.Module):
    """An FFN branch deleted: outputs zeros of its input's shape, holds no parameter and saves nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def _delete_han_blocks(model: nn.Module) -> None:
    """Every :class:`~han_surgery.layers.HanBlock` of a hanified model replaced by a :class:`ZeroBranch`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, HanBlock):
            model.set_submodule(name, ZeroBranch())


def build(kind: str, name: str, variant: str, batch: int) -> Workload:
    """``variant``: ``"peer"`` (the original / dense model), ``"han"``, or (surgery rows) ``"deleted"``."""
    torch.manual_seed(0)
    if kind == "surgery":
        if name == "bert_base":
            work = _bert(batch, 128)
        else:
            work = _image_workload(timm.create_model(name), batch)
        if variant in ("han", "deleted"):
            han_surgery.hanify(work.model, han_surgery.HanConfig())
        if variant == "deleted":
            _delete_han_blocks(work.model)
        return work
    if name == "hannet":
        return _hannet(stacked=False) if variant == "han" else _regression(fc_net(8, 50, 5, 1))
    if name == "hannet_stack":
        return _hannet(stacked=True) if variant == "han" else _regression(fc_net(8, 50, 5, 1))
    han_name, peer_name = name.split(":")
    return _image_workload(timm.create_model(han_name if variant == "han" else peer_name, num_classes=10), batch)


# (label, kind, name, batch)
ROWS = {
    "transformers": [
        ("vit_small (batch 8)", "surgery", "vit_small_patch16_224", 8),
        ("vit_base (batch 8)", "surgery", "vit_base_patch16_224", 8),
        ("BERT-base (batch 8, seq 128)", "surgery", "bert_base", 8),
    ],
    "paper": [
        ("han_mixer_m1h16_32 vs MLP(4) (batch 64)", "paper", "han_mixer_m1h16_32:han_mixer_m4h0_32", 64),
        ("han_mixer_m0h16_32 vs MLP(2) (batch 64)", "paper", "han_mixer_m0h16_32:han_mixer_m2h0_32", 64),
        ("han_mobilevit_xxs vs mobilevit_xxs (batch 8, 256px)", "paper", "han_mobilevit_xxs:mobilevit_xxs", 8),
        ("HanNet (19 HanLayer modules) vs FCNet1 (batch 100)", "paper", "hannet", 100),
        ("HanNet (one HanStack) vs FCNet1 (batch 100)", "paper", "hannet_stack", 100),
    ],
}


def _train_step(work: Workload) -> Callable[[], None]:
    opt = torch.optim.AdamW(work.model.parameters(), lr=1e-3)

    def step() -> None:
        work.model.train()
        opt.zero_grad(set_to_none=True)
        work.loss(work.model, work.inputs).backward()
        opt.step()

    return step


def _inference(work: Workload) -> Callable[[], None]:
    def run() -> None:
        work.model.eval()
        with torch.no_grad():
            work.infer(work.model, work.inputs)

    return run


def _torch_path(fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with kernels.disabled():
            fn()

    return run


def measure(kind: str, name: str, batch: int, rounds: int, torch_path: bool, clock) -> dict[str, list[float]]:
    peer, han = build(kind, name, "peer", batch), build(kind, name, "han", batch)
    jobs = {"peer train": _train_step(peer), "han train": _train_step(han)}
    if torch_path:
        jobs["han torch-path train"] = _torch_path(_train_step(han))
    jobs.update({"peer infer": _inference(peer), "han infer": _inference(han)})
    if torch_path:
        jobs["han torch-path infer"] = _torch_path(_inference(han))
    # Tiny models: time several calls per sample so the clock's resolution does not matter.
    repeat = 20 if name.startswith("hannet") else 1
    for job in jobs.values():
        for _ in range(2):
            job()
    times: dict[str, list[float]] = {key: [] for key in jobs}
    for _ in range(rounds):
        for key, job in jobs.items():
            start = clock()
            for _ in range(repeat):
                job()
            times[key].append((clock() - start) / repeat)
    return times


def _status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (Linux), in MB.

    Not ``getrusage``: Linux carries a parent's RSS high-water mark across fork+exec into the
    child's ``ru_maxrss``, which would hide the child's own peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(kind: str, name: str, variant: str, batch: int) -> None:
    """Prints the peak RSS growth (MB) of building ``variant`` and running two training steps."""
    if kind == "surgery" and name == "bert_base":
        import transformers  # noqa: F401  (imported before the baseline, as timm is)
    from han_surgery.kernels import cpu

    cpu.available()  # the CPU kernel's one-time load (cpp_extension, the .so), before the baseline as well
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_mb("VmRSS")
    work = build(kind, name, variant, batch)
    step = _train_step(work)
    step()
    step()
    print(json.dumps({"peak_mb": _status_mb("VmHWM") - before}))


def peak_memory(kind: str, name: str, variant: str, batch: int, threads: int) -> float:
    cmd = [sys.executable, __file__, "--memory-child", kind, name, variant, str(batch), "--threads", str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave the resident set
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=["transformers", "paper"])
    parser.add_argument("--only", nargs="+", default=None, help="run only rows whose label contains one of these")
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--threads", type=thread_count, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="process: CPU time (use with --threads 1)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-torch-path", action="store_true", help="skip timing the Han models without kernels")
    parser.add_argument("--json", type=str, default=None, help="also write the raw timings here")
    parser.add_argument("--memory-child", nargs=4, metavar=("KIND", "NAME", "VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.json:  # before measuring: a bad path fails now, not after the whole run
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--json {args.json}: cannot create its folder ({exc})")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        kind, name, variant, batch = args.memory_child
        memory_child(kind, name, variant, int(batch))
        return
    clock = CLOCKS[args.clock]
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {threads} threads, "
        f"{platform.processor() or platform.machine()}, rounds={args.rounds}, clock={args.clock}"
    )
    from han_surgery.kernels import cpu

    print(f"CPU kernel: {'built' if cpu.available() else 'unavailable (PyTorch path)'}\n")
    report = {}
    table = []
    for group in args.rows:
        for label, kind, name, batch in ROWS[group]:
            if args.only and not any(key in label for key in args.only):
                continue
            times = measure(kind, name, batch, args.rounds, not args.no_torch_path, clock)
            report[label] = {"times_s": times}
            print(label)
            for key, values in times.items():
                print(f"  {key:22s} {min(values) * 1e3:9.2f} ms min  {statistics.median(values) * 1e3:9.2f} ms median")
            train = _ratio(times, "peer train", "han train")
            infer = _ratio(times, "peer infer", "han infer")
            row = {"train peer/han": train, "inference peer/han": infer}
            if not args.no_torch_path:
                row["train torch-path/kernel"] = _ratio(times, "han torch-path train", "han train")
            if not args.no_memory:
                row["peak MB peer"] = peak_memory(kind, name, "peer", batch, threads)
                row["peak MB han"] = peak_memory(kind, name, "han", batch, threads)
                if kind == "surgery":
                    row["peak MB FFNs deleted"] = peak_memory(kind, name, "deleted", batch, threads)
            report[label].update(row)
            print("  " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()) + "\n", flush=True)
            table.append((label, row))
    print(f"| pair ({threads} threads, {args.rounds} rounds) | train step peer / Han | inference peer / Han", end="")
    print(" | Han train, PyTorch path / kernels" if not args.no_torch_path else "", end="")
    print(" | peak training memory, peer -> Han (FFNs deleted) |" if not args.no_memory else " |")
    print("|---|---|---|" + ("---|" if not args.no_torch_path else "") + ("---|" if not args.no_memory else ""))
    for label, row in table:
        cells = [f"{row['train peer/han']:.2f}x", f"{row['inference peer/han']:.2f}x"]
        if not args.no_torch_path:
            cells.append(f"{row['train torch-path/kernel']:.2f}x")
        if not args.no_memory:
            peer_mb, han_mb = row["peak MB peer"], row["peak MB han"]
            memory = f"{peer_mb:.0f} -> {han_mb:.0f} MB ({han_mb / peer_mb:.0%})"
            if "peak MB FFNs deleted" in row:
                deleted_mb = row["peak MB FFNs deleted"]
                memory += f" ({deleted_mb:.0f} MB, {deleted_mb / peer_mb:.0%})"
            cells.append(memory)
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": threads, "rounds": args.rounds, "rows": report}, indent=1))


if __name__ == "__main__":
    main()
