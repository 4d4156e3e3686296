"""The fine-tuning step of the demo: the real ``python -m han_surgery.finetune`` on bundled MNIST, in a subprocess."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import HanSurgeryError
from ._format import section

__all__ = ["MNIST", "DemoStepError", "finetune_command", "step_finetune"]


class DemoStepError(HanSurgeryError, RuntimeError):
    """A step of the demo failed (the CLI prints it as one line, exit code 2)."""


MNIST = Path(__file__).with_name("data") / "mnist_2500.npz"


def finetune_command(output_dir: Path, epochs: int) -> list[str]:
    """The command the demo runs and prints: timm's small ``test_resnet`` (373k parameters) from scratch on the
    bundled 2,500 MNIST digits (2,250 train / 250 held out)."""
    return [
        sys.executable, "-m", "han_surgery.finetune", "--model", "test_resnet",
        "--data", str(MNIST), "--image-size", "28", "--epochs", str(epochs), "--batch-size", "64",
        "--lr", "3e-3", "--no-tensorboard", "--output-dir", str(output_dir),
    ]  # fmt: skip


def step_finetune(fast: bool = False) -> list[float]:
    """Run the printed command (progress bar included); show the Hub-ready folder and its model card.

    Returns the held-out accuracy after each epoch.
    """
    section("Fine-tuning that learns: MNIST (2,500 bundled digits), a real `han_surgery.finetune` run")
    with tempfile.TemporaryDirectory(prefix="han-finetune-") as tmp:
        out = Path(tmp) / "mnist-resnet"
        command = finetune_command(out, epochs=2 if fast else 3)
        print("$ " + shlex.join(["python", *command[1:]]), flush=True)
        # run in the empty temporary folder: `python -m` puts the working directory first on sys.path, where a
        # user's own accelerate.py or timm.py would shadow the real ones in the child alone
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False, cwd=tmp)
        print(done.stdout, end="")
        if done.returncode != 0:
            raise DemoStepError(
                f"the fine-tune step failed with exit code {done.returncode} (its output is above); "
                f"run `han-surgery finetune` with the printed options to see why"
            )
        accuracies = [float(a) for a in re.findall(r"eval_accuracy ([0-9.]+)", done.stdout)]
        files = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
        print(f"\nHub-ready folder (`han-surgery push <dir> <user>/<repo>`): {', '.join(files)}")
        card = (out / "README.md").read_text().splitlines()
        print("README.md (model card) starts with:\n  " + "\n  ".join(card[:10]) + "\n  ...")
    return accuracies
