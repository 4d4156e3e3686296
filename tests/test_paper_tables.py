"""The paper's numbers and protocols as the repository quotes and runs them.

* Every table constant in ``han_surgery.paper`` (the "paper" columns of docs/RESULTS.md) equals the
  paper's table in ``../shared/paper/README.md`` (skipped where that file is absent).
* The Han-Mixer rows have the paper's parameter counts (Table 12, to its precision).
* Without ``--quick``, every experiment's defaults are the paper's stated protocol.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm

import han_surgery  # noqa: F401  (registers the han_* models)
from han_surgery.paper import approximation, checkerboard, han_mixer, han_mobilevit, mnist_robustness, regression
from han_surgery.paper.cli import build_parser

PAPER_README = Path(__file__).resolve().parents[2] / "shared" / "paper" / "README.md"


@pytest.fixture(scope="module")
def paper_text() -> str:
    if not PAPER_README.exists():
        pytest.skip(f"the paper's tables are not at {PAPER_README}")
    return PAPER_README.read_text()


def _table(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the markdown table whose header line starts with ``header_start``."""
    lines = text[text.index(header_start) :].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert rows, header_start
    return rows


def test_table2_mutual_approximation(paper_text):
    rows = _table(paper_text, "| target (trained model)")
    assert len(rows) == len(approximation.TABLE2) == 3
    for row in rows:
        d = int(row[0].split()[-1])
        assert [float(v) for v in row[1:]] == [approximation.TABLE2[d][pair] for pair in approximation.PAIRS]


def test_table3_checkerboard_ablation(paper_text):
    rows = _table(paper_text, "| row | layers |")
    assert len(rows) == 7
    for row in rows:
        assert checkerboard.TABLE3[row[0].strip("()")] == float(row[3].rstrip("%")), row


def test_table6_mnist_robustness(paper_text):
    rows = _table(paper_text, "| attack | HanNet VT")
    assert len(rows) == len(mnist_robustness.TABLE6) == 10
    models = ("hannet", "fcnet", "fcnet-trades", "fcnet-at")
    for row in rows:
        key = {"clean": "clean"}.get(row[0]) or (
            f"cw@{float(row[0].removeprefix('CW c=')):.1f}"
            if row[0].startswith("CW")
            else "pgd " + re.sub(r"\s*\(lost\)", "", row[0].removeprefix("PGD "))
        )
        assert [float(v) for v in row[1:]] == [mnist_robustness.TABLE6[key][m] for m in models], row


def test_table9_regression(paper_text):
    rows = _table(paper_text, "| set | metric |")
    assert len(rows) == 2 * len(regression.PAPER["full"]) == 10
    models = ("hannet", "fcnet1", "fcnet2")
    for row in rows:
        name, metric = row[0].lower(), 0 if row[1] == "RMSE" else 1
        ours = [regression.PAPER[group][name][m][metric] for group in ("full", "fewer") for m in models]
        assert [float(v) for v in row[2:]] == ours, row


@pytest.mark.parametrize(
    ("header", "table"),
    [("| model | params | STL10", han_mixer.TABLE12), ("| MobileViT | block", han_mobilevit.TABLE14)],
)
def test_tables_12_and_14_vision(paper_text, header, table):
    rows = _table(paper_text, header)
    assert len(rows) == len(table)
    for row in rows:
        label = row[0] if header.startswith("| model") else f"{row[0]}, {row[1]}"
        cells = row[1:] if header.startswith("| model") else row[2:]
        quoted = table[label]
        assert [cells[0], *map(float, cells[1:])] == [quoted[k] for k in ("params", "stl10", "cifar10", "cifar100")]


@pytest.mark.parametrize(("name", "label"), han_mixer.ROWS)
def test_han_mixer_rows_have_the_papers_parameter_counts(name, label):
    params = sum(p.numel() for p in timm.create_model(name, pretrained=False, num_classes=10).parameters())
    assert f"{params / 1e6:.2f}M" == han_mixer.TABLE12[label]["params"]


def test_full_runs_default_to_the_papers_protocols():
    parser = build_parser()

    def defaults(*argv: str) -> dict:
        return vars(parser.parse_args(list(argv)))

    approx = defaults("approximation")
    assert (approx["epochs"], approx["n_train"], approx["n_test"]) == (1000, 2000, 10000)
    assert (approximation.OPTIMIZERS, approximation.LRS, approximation.WEIGHT_DECAYS) == (
        ("sgd", "adam"),
        (1e-4, 1e-3, 1e-2, 1e-1),
        (0.0, 1e-3),
    )
    assert defaults("checkerboard")["iters"] == 40_000
    mnist = defaults("mnist")
    assert (mnist["epochs"], mnist["lr"], mnist["weight_decay"], mnist["batch_size"]) == (100, 1e-3, 1e-3, 256)
    assert (mnist["pgd_steps"], mnist["cw_steps"], mnist["cw_c"]) == (30, 1000, "1.0,3.0,5.0")
    reg = defaults("regression")
    assert (reg["epochs"], reg["seeds"], reg["lrs"]) == (300, 5, "0.001,0.003")
    for experiment, module, recipes in (
        ("mixer", han_mixer, {("cifar10", 32): (600, 256), ("stl10", 96): (300, 64)}),
        ("mobilevit", han_mobilevit, {("cifar10", 32): (300, 128), ("stl10", 96): (300, 64)}),
    ):
        args = parser.parse_args([experiment, "--data", "unused"])
        assert (args.lr, args.weight_decay) == (1e-3, 0.1)
        for (dataset, size), (epochs, batch) in recipes.items():
            recipe = module._recipe(SimpleNamespace(name=dataset, image_size=size), args)
            assert (recipe.epochs, recipe.batch_size, recipe.lr, recipe.weight_decay) == (epochs, batch, 1e-3, 0.1)
