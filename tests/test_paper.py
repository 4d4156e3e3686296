"""Unit tests of han_surgery.paper: model constructors, data loaders, attacks (no shared data needed)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from han_surgery.layers import HanLayer, HouseholderLinear
from han_surgery.paper import attacks, checkerboard, common, regression
from han_surgery.paper.approximation import fc1, han3
from han_surgery.paper.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_han_net_matches_the_authors_checkerboard_net():
    net = common.han_net(2, 30, 20, 2)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    # dense + ABS, dense + ABS, 17 Han-layers (each |H x + b|), dense + ABS, dense head: in this order
    expected = ["Linear", "Abs"] * 2 + ["HanLayer"] * 17 + ["Linear", "Abs", "Linear"]
    assert [type(m).__name__ for m in net] == expected
    # 2*30+30 + 2*(30*30+30) + 17*2*30 + 30*2+2
    assert common.count_parameters(net) == 90 + 2 * 930 + 17 * 60 + 62 == 3032
    assert net(torch.randn(5, 2)).shape == (5, 2)
    w = linears[1].weight
    torch.testing.assert_close(w @ w.T, torch.eye(30), atol=1e-5, rtol=0)  # orthogonal init


def test_han_net_ablations_and_errors():
    relu = common.han_net(2, 30, 20, 2, activation="relu")
    assert sum(isinstance(m, HouseholderLinear) and not isinstance(m, HanLayer) for m in relu) == 17
    assert sum(isinstance(m, nn.ReLU) for m in relu) == 20
    dense = common.han_net(2, 30, 20, 2, householder=False)
    assert not any(isinstance(m, HouseholderLinear) for m in dense)
    assert common.count_parameters(dense) == 90 + 19 * 930 + 62
    reg = common.han_net(8, 200, 20, 1, dense_first=1, dense_last=0)
    assert sum(isinstance(m, HanLayer) for m in reg) == 19
    with pytest.raises(ValueError, match="dense_first"):
        common.han_net(3, 30, 5, 1, dense_first=0)
    with pytest.raises(ValueError, match="activation"):
        common.han_net(30, 30, 3, 1, activation="tanh")


def test_fc_net_parameter_counts():
    assert common.count_parameters(common.fc_net(2, 100, 6, 2)) == 51_002
    assert common.count_parameters(common.fc_net(784, 784, 1, 10)) == 623_290


def test_data_paths_are_overridable(tmp_path, monkeypatch):
    monkeypatch.setenv(common.DATA_ENV, str(tmp_path))
    assert common.default_data_dir() == tmp_path
    with pytest.raises(common.PaperInputError, match="--data"):
        common.resolve_data_path(None, "checkerboard")
    (tmp_path / "checkerboard").mkdir()
    assert common.resolve_data_path(None, "checkerboard") == tmp_path / "checkerboard"


def test_checkerboard_accuracy_is_the_authors_rule():
    pred = torch.tensor([[0.9, 0.3], [0.2, 0.1], [0.6, 0.6], [0.0, 0.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert checkerboard.accuracy(pred, target) == 0.5


def test_orthogonality_penalty_is_zero_for_orthogonal_weights():
    net = checkerboard.build_model("f1")
    assert checkerboard.orthogonality_penalty(net).item() < 1e-8
    with torch.no_grad():
        net[2].weight.mul_(2.0)
    assert checkerboard.orthogonality_penalty(net).item() > 1.0


def _write_csv(path, rows=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4)) * [1.0, 10.0, 0.1, 3.0] + [0.0, 5.0, -2.0, 1.0]
    const = np.full((rows, 1), 7.0)
    y = x @ [1.0, -0.2, 3.0, 0.5] + 0.1 * rng.normal(size=rows)
    np.savetxt(path, np.hstack([x[:, :2], const, x[:, 2:], y[:, None]]), delimiter=",")


def test_regression_loader_drops_constant_columns_and_standardises(tmp_path):
    path = tmp_path / "any.csv"
    _write_csv(path)
    data = regression.load_csv(path)
    assert data.dropped_columns == [2]
    assert data.x.shape == (60, 4) and data.y.shape == (60, 1)
    torch.testing.assert_close(data.x.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.x.std(0), torch.ones(4), atol=1e-4, rtol=0)
    bad = tmp_path / "bad.csv"
    np.savetxt(bad, np.ones((20, 3)), delimiter=",")  # enough rows for the split: the constant target is refused
    with pytest.raises(ValueError, match="constant"):
        regression.load_csv(bad)


def test_regression_split_is_80_12_8_and_disjoint():
    tr, te, va = regression.split(1000, torch.Generator().manual_seed(0))
    assert (len(tr), len(te), len(va)) == (800, 120, 80)
    assert len(set(torch.cat([tr, te, va]).tolist())) == 1000


def test_regression_quick_on_any_csv(tmp_path):
    path = tmp_path / "mine.csv"
    _write_csv(path, rows=400)
    args = argparse.Namespace(
        quick=True,
        out=str(tmp_path / "out"),
        data=None,
        datasets="",
        csv=[str(path)],
        models="hannet,fcnet1,fcnet2",
        epochs=300,
        lrs="0.003",
        seeds=5,
        train_fractions="1,0.5",
        schedule="epoch",
        compile=False,
        threads=None,
    )
    res = regression.run(args)
    assert [(r["train_fraction"], r["model"]) for r in res["rows"]] == [
        (f, m) for f in (1.0, 0.5) for m in ("hannet", "fcnet1", "fcnet2")
    ]
    assert all(r["dataset"] == "mine" and r["features"] == 4 and np.isfinite(r["rmse_mean"]) for r in res["rows"])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"][0]["dropped_constant_columns"] == [2]
    assert (tmp_path / "out" / "rmse.png").stat().st_size > 0


def test_regression_training_learns_a_linear_target(tmp_path):
    path = tmp_path / "lin.csv"
    _write_csv(path, rows=500)
    data = regression.load_csv(path)
    base = float(data.y.std())
    out = regression.train_one(data, "fcnet1", 1e-2, epochs=40, seed=0)
    assert out["test_rmse"] < 0.3 * base and out["test_r2"] > 0.9


@pytest.fixture(scope="module")
def trained_classifier():
    """A small MLP on two separable 2-D blobs (20-dim inputs in [0, 1])."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(400, 20, generator=gen)
    y = (x[:, :10].sum(1) > x[:, 10:].sum(1)).long()
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval(), x[:100], y[:100]


def _loss(model, x, y):
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


def test_pgd_linf_raises_the_loss_within_the_ball(trained_classifier):
    model, x, y = trained_classifier
    adv = attacks.pgd_linf(model, x, y, eps=0.1, steps=10, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert _loss(model, adv, y) > _loss(model, x, y) + 0.1
    noise = (x + 0.1 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))).clamp(0, 1)
    assert _loss(model, adv, y) > _loss(model, noise, y)  # a real attack beats random signs of the same size
    assert all(p.grad is None for p in model.parameters())


def test_pgd_l2_raises_the_loss_within_the_ball(trained_classifier):
    model, x, y = trained_classifier
    adv = attacks.pgd_l2(model, x, y, eps=0.5, steps=10, generator=torch.Generator().manual_seed(0))
    assert (adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert _loss(model, adv, y) > _loss(model, x, y) + 0.1


def test_cw_finds_small_misclassified_inputs(trained_classifier):
    model, x, y = trained_classifier
    clean_acc = attacks.robust_accuracy(model, x, y, lambda m, a, b: a)
    adv = attacks.cw_l2(model, x, y, c=10.0, steps=100, lr=0.05)
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    assert clean_acc > 0.9 and fooled.float().mean() > 0.5
    unchanged = (adv == x).all(dim=1)
    assert torch.equal(unchanged | fooled, torch.ones_like(fooled))  # every output is an adversarial or x itself
    assert attacks.robust_accuracy(model, x, y, attacks.cw_l2, c=10.0, steps=100, lr=0.05) < clean_acc


def test_approximation_models_follow_the_paper():
    """Input layer, hidden part, output layer: the hidden part has n^2 + n (FC-1) or 6n (Han-3) parameters."""
    for d, n in ((2, 30), (4, 100)):
        io = (d * n + n) + (n * d + d)
        assert common.count_parameters(fc1(d, n)) == io + n * n + n
        assert common.count_parameters(han3(d, n)) == io + 6 * n
        # input layer, the hidden part, output layer, in this order (the input and output layers are plain dense)
        assert [type(m).__name__ for m in fc1(d, n)] == ["Linear", "Linear", "ReLU", "Linear"]
        assert [type(m).__name__ for m in han3(d, n)] == ["Linear", "HanLayer", "HanLayer", "HanLayer", "Linear"]
        assert [(m.in_features, m.out_features) for m in fc1(d, n) if isinstance(m, nn.Linear)] == [
            (d, n),
            (n, n),
            (n, d),
        ]
        assert fc1(d, n)(torch.randn(3, d)).shape == han3(d, n)(torch.randn(3, d)).shape == (3, d)


def test_cw_abort_early_stops_when_the_batch_loss_rises(trained_classifier):
    """torchattacks' early abort (off by default) ends the optimisation long before ``steps``, a weaker attack."""
    model, x, y = trained_classifier
    calls = []
    counting = nn.Sequential(nn.Identity(), model)
    counting[0].register_forward_hook(lambda *_: calls.append(1))
    full = attacks.robust_accuracy(counting, x, y, attacks.cw_l2, batch_size=100, c=1.0, steps=200, lr=0.05)
    full_calls, calls[:] = len(calls), []
    early = attacks.robust_accuracy(
        counting, x, y, attacks.cw_l2, batch_size=100, c=1.0, steps=200, lr=0.05, abort_early=True
    )
    assert full_calls == 200 + 1  # 200 steps + the accuracy check
    assert len(calls) < 200 and full <= early


def test_full_runs_sh_lists_the_recorded_command_of_every_result_folder():
    """benchmarks/paper/full_runs.sh runs, for each docs/results/<name>/results.json, the command it records, with
    ``--out docs/results/<name>`` and without ``--jobs`` (an option since removed); and nothing else. Each parses."""
    recorded = []
    for path in sorted((ROOT / "docs" / "results").glob("*/results.json")):
        argv = shlex.split(json.loads(path.read_text())["command"])
        argv[argv.index("--out") + 1] = f"docs/results/{path.parent.name}"
        if "--jobs" in argv:
            del argv[argv.index("--jobs") : argv.index("--jobs") + 2]
        recorded.append(argv)
    script = (ROOT / "benchmarks" / "paper" / "full_runs.sh").read_text().replace("\\\n", " ")
    listed = [shlex.split(line)[3:] for line in script.splitlines() if line.startswith("nice -n 19 han-surgery paper")]
    assert sorted(listed) == sorted(recorded) and len(recorded) == 12
    parser = build_parser()
    for argv in listed:
        parser.parse_args(argv[2:])  # an unknown flag raises PaperInputError


def test_short_runs_train_at_the_full_lr(tmp_path, monkeypatch):
    """MultiStepLR applies a milestone <= 0 when it is built: with --epochs 1 (every regression --quick) the
    regression nets trained at 0.04x the lr, mnist at 0.2x, checkerboard --iters 1 and a one-step approximation
    fit at 0.008x / 0.04x."""
    from han_surgery.paper import approximation, mnist_robustness

    start: list[float] = []

    class Recording(torch.optim.lr_scheduler.MultiStepLR):
        def __init__(self, opt, *args, **kwargs):
            super().__init__(opt, *args, **kwargs)
            start.append(opt.param_groups[0]["lr"] / opt.param_groups[0]["initial_lr"])

    monkeypatch.setattr(torch.optim.lr_scheduler, "MultiStepLR", Recording)
    path = tmp_path / "any.csv"
    _write_csv(path)
    data = regression.load_csv(path)
    for schedule in regression.SCHEDULES:
        regression.train_one(data, "fcnet1", 1e-3, epochs=1, seed=0, schedule=schedule, max_steps=1)
        regression.train_stacked(data, "fcnet1", [(0, 1e-3)], epochs=1, schedule=schedule, max_steps=1)
    mnist_robustness.train_model("fcnet", torch.rand(8, 784), torch.arange(8) % 10, epochs=1, max_steps=1)
    y = (torch.rand(10, 1) > 0.5).float().repeat(1, 2)
    checkerboard.train_rows(["a"], (0.01,), 1, checkerboard.Checkerboard(torch.rand(10, 2), y, torch.rand(10, 2), y))
    x = torch.rand(1, 2)
    with torch.no_grad():
        y = approximation.fc1(2, 8)(x)[None]
    approximation.fit_grid("fc1", x, y, x, y, 8, epochs=1)
    assert len(start) == 4 + 1 + 1 + 2 and start == [1.0] * len(start)
    # the schedule itself is unchanged where the milestones are positive
    assert common.positive_milestones([0, 0, 3, 5.5]) == [3, 5.5]


def test_results_json_writes_null_for_nan_and_infinity(tmp_path):
    """A diverged run's loss (NaN) and the R^2 of a test split whose target is constant (-inf) were written as
    ``NaN`` / ``-Infinity``, which is not JSON: JavaScript's JSON.parse and jq --strict readers refuse the file."""
    results = {"loss": float("nan"), "rows": [{"r2": float("-inf"), "ok": 0.5}, (np.float32("inf"), np.float64(2))]}
    common.write_results(tmp_path, results, "md")
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back["loss"] is None and back["rows"] == [{"r2": None, "ok": 0.5}, [None, 2.0]]
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == back


def test_regression_constant_target_is_refused(tmp_path):
    """A CSV whose target column is constant was accepted and reported R^2 = -inf (SST = 0) with a numpy warning."""
    path = tmp_path / "const_y.csv"
    x = np.random.default_rng(0).normal(size=(40, 3))
    np.savetxt(path, np.hstack([x, np.full((40, 1), 2.5)]), delimiter=",")
    with pytest.raises(common.PaperInputError, match=r"const_y.csv: the target \(last\) column is constant \(2.5\)"):
        regression.load_csv(path)
