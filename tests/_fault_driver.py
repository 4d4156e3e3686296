"""Run ``han-surgery finetune <argv>`` and SIGKILL it at a chosen point (for tests/test_faults.py).

    python tests/_fault_driver.py POINT N [finetune options ...]

POINT is where the process kills itself, at the N-th time it gets there:

* ``step``: after an optimizer step (``torch.optim.AdamW.step``);
* ``state_file``: inside a checkpoint write, before accelerate writes its N-th file (``accelerate.checkpointing.save``);
* ``checkpoint_rename``: after a checkpoint's files and manifest are written, before ``step_N.tmp`` is renamed;
* ``export``: inside the final save, after the model files are staged, before anything is published;
* ``publish``: inside the final save, while the staged files are moved into place (before the N-th move);
* ``set_aside``: while ``--overwrite`` moves the folder's former contents aside (before the N-th move);
* ``time``: after N milliseconds, wherever the run is.

Nothing here is part of han-surgery: the faults are injected from outside, by patching library functions.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def on_nth_call(owner: object, name: str, n: int, *, after: bool = False) -> None:
    original = getattr(owner, name)
    calls = 0

    def wrapper(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == n and not after:
            die()
        result = original(*args, **kwargs)
        if calls == n and after:
            die()
        return result

    setattr(owner, name, wrapper)


def patch_os_replace(module: object, should_die: object) -> None:
    """Give ``module`` its own ``os`` whose ``replace`` kills the process when ``should_die(src, dst)``."""
    proxy = type(os)("os")
    proxy.__dict__.update(os.__dict__)

    def replace(src: str, dst: str) -> None:
        if should_die(src, dst):
            die()
        os.replace(src, dst)

    proxy.replace = replace
    module.os = proxy


def main() -> None:
    point, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    import torch

    torch.set_num_threads(1)
    if point == "step":
        on_nth_call(torch.optim.AdamW, "step", n, after=True)
    elif point == "state_file":
        import accelerate.checkpointing

        on_nth_call(accelerate.checkpointing, "save", n)
    elif point == "checkpoint_rename":
        import han_surgery.finetune.checkpoints as checkpoints

        renames = 0

        def kill_before_checkpoint_rename(src: str, dst: str) -> bool:
            nonlocal renames
            hit = str(src).endswith(".tmp") and os.path.isdir(src)
            renames += hit
            return hit and renames == n

        patch_os_replace(checkpoints, kill_before_checkpoint_rename)
    elif point == "export":
        import han_surgery.finetune.runner as runner

        on_nth_call(runner, "save_model", n, after=True)
    elif point == "publish":
        import han_surgery.fileio as fileio
        import han_surgery.finetune.runner as runner

        moves = None  # counting starts when publish_files does

        def kill_at_nth_move(src: str, dst: str) -> bool:
            nonlocal moves
            if moves is None:
                return False
            moves += 1
            return moves == n

        original_publish = fileio.publish_files

        def publish_files(*args: object, **kwargs: object) -> list[str]:
            nonlocal moves
            moves = 0
            return original_publish(*args, **kwargs)

        patch_os_replace(fileio, kill_at_nth_move)
        runner.publish_files = publish_files
    elif point == "set_aside":
        import han_surgery.finetune.checkpoints as checkpoints

        moves = 0

        def kill_at_nth_move_aside(src: str, dst: str) -> bool:
            nonlocal moves
            hit = os.path.basename(os.path.dirname(dst)).startswith(".overwritten")
            moves += hit
            return hit and moves == n

        patch_os_replace(checkpoints, kill_at_nth_move_aside)
    elif point == "time":
        threading.Timer(n / 1000, die).start()
    else:
        raise SystemExit(f"unknown fault point {point!r}")
    from han_surgery.cli.finetune import main as finetune

    sys.exit(finetune(argv))


if __name__ == "__main__":
    main()
