"""The README's Python examples run as written (in a fresh folder), and the figures they quote are the code's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/CALIBRATION.md")

#: A block holding one of these needs what CI does not have; the reason is the test's skip message.
NOT_OFFLINE = {
    '"hf-hub:': "loads a model from the Hugging Face Hub",
    "pretrained=True": "downloads pretrained weights",
}
#: A figure an example quotes in a comment: ``report.params_before, report.params_after  # 86,567,656 -> 29,916,904``.
QUOTED_FIGURES = re.compile(r"^(report\.\w+, report\.\w+)\s+#\s*([\d,]+ -> [\d,]+)", re.M)


def _python_blocks() -> list:
    params = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, match.start()) + 1
            code = match.group(1)
            marks = [pytest.mark.skip(reason=why) for key, why in NOT_OFFLINE.items() if key in code][:1]
            params.append(pytest.param(code, id=f"{doc}:{line}", marks=marks))
    return params


@pytest.mark.parametrize("code", _python_blocks())
def test_a_python_example_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples write folders ("vit-han") where they run
    # the file docs/CALIBRATION.md's example calibrates on: 64 sentences of English (this README's prose)
    prose = [s.strip() for s in re.split(r"(?<=\.) ", (ROOT / "README.md").read_text()) if len(s.split()) >= 6]
    (tmp_path / "sentences.txt").write_text("\n".join(s.replace("\n", " ") for s in prose[:64]) + "\n")
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(code, "<example>", "exec"), namespace)
    for expr, figures in QUOTED_FIGURES.findall(code):
        quoted = tuple(int(f.replace(",", "")) for f in figures.split(" -> "))
        assert eval(expr, namespace) == quoted, (expr, figures)


def test_the_examples_are_found() -> None:
    """Guards the patterns above: a change of the docs' fences would make every case vanish, not fail."""
    runnable = [p for p in _python_blocks() if not p.marks]
    assert len(runnable) >= 4, [p.id for p in _python_blocks()]
    assert any(QUOTED_FIGURES.search(p.values[0]) for p in runnable)
