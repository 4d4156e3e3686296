"""The public API as a type checker sees it (the package ships ``py.typed``): mypy over tests/typing/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_typed_usage_passes_mypy(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    # MYPYPATH: the source tree itself (an editable install's import hook is invisible to mypy); errors inside
    # han_surgery and the libraries are not reported (--follow-imports=silent), only those of the user's file.
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "mypy", "--follow-imports=silent", "--warn-unused-ignores", "--no-error-summary",
        "--cache-dir", str(tmp_path / "cache"), str(ROOT / "tests" / "typing" / "typed_usage.py"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
