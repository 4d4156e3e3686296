"""Fitting one calibration site: closed-form starts, then a short Adam run; the fraction of variance unexplained.

All functions work on token rows ``x`` of shape ``(T, d)`` (float32, CPU or the
model's device) recorded at the site's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...functional import householder_affine, unit_rows
from ...layers import HanBlock
from ...utils import step_overflows
from .record import CalibrationDataError
from .site import CalibrationSite

__all__ = ["site_output", "fvu", "linear_regime_start", "closed_form_start", "fit_site", "SiteScores", "least_squares"]

_CHUNK = 8192


def _rows(fn, x: Tensor) -> Tensor:
    """``fn`` over ``x`` in row chunks (bounded activation memory)."""
    return torch.cat([fn(x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)]) if len(x) else fn(x)


def site_output(site: CalibrationSite, x: Tensor, branch: Tensor) -> Tensor:
    """What the rest of the network sees of a branch output ``b``: ``N(x + b)`` with a post-norm, else ``b`` itself
    (the residual add is the same before and after surgery, so the branch is what differs)."""
    return site.post_norm(x + branch) if site.post_norm is not None else branch


def new_branch(site: CalibrationSite, x: Tensor) -> Tensor:
    """The new block's contribution on top of the residual: ``fitted(x)``, or ``fitted(x) - x`` if the residual was dropped."""
    y = site.fitted(x)
    return y if site.residual else y - x


def fvu(pred: Tensor, target: Tensor) -> float:
    """Fraction of variance unexplained, ``sum ||target - pred||^2 / sum ||target - mean(target)||^2`` over rows.

    ``nan`` when the target rows (nearly) do not vary: too few distinct tokens to score.
    """
    den = (target - target.mean(0)).pow(2).sum().item()
    if not den > 1e-10 * target.pow(2).sum().item():
        return float("nan")
    return (target - pred).pow(2).sum().item() / den


def least_squares(x: Tensor, y: Tensor, ridge: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(W, c)`` minimising ``||x W + c - y||^2 (+ ridge)`` in float64: ``W`` is ``(d_in, d_out)``."""
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = (x - xm).double(), (y - ym).double()
    gram = xc.T @ xc
    gram.diagonal().add_(ridge * gram.diagonal().mean().clamp_min(1e-30))
    w = torch.linalg.solve(gram, xc.T @ yc).to(x.dtype)
    return w, ym - xm @ w


def _reduced_rank(x: Tensor, y: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Reduced-rank regression of ``y`` on ``x``: ``(A, B)`` with ``x A^T B^T`` the best rank-``rank`` linear fit
    of the centred ``y`` (the least-squares map projected onto the top principal directions of its fitted values)."""
    w, _ = least_squares(x, y)
    _, _, vh = torch.linalg.svd((x - x.mean(0)) @ w, full_matrices=False)
    v = vh[:rank].T  # (d_out, r)
    return (w @ v).T, v


@torch.no_grad()
def linear_regime_start(block: HanBlock, x: Tensor) -> None:
    """Put the Householder path of ``block`` in its linear regime on the rows ``x``: ``H2 |H1 s x + b1| = s x + H2 b1``.

    ``fc2`` gets ``fc1``'s reflections in reverse order (``H2 = H1^T = H1^{-1}``) and
    ``b1`` is raised one standard deviation above the most negative pre-activation,
    so no ``|.|`` kink is hit on the calibration data: the block starts as the
    diagonal map ``g * s * x`` plus constants (plus the side path), which the
    closed-form fits then set, and Adam may leave the regime where it pays.
    """
    if block.fc1.bias is None or block.final_abs:
        return
    block.fc2.u.copy_(block.fc1.u.flip(0))
    u = unit_rows(block.fc1.u)
    pre = _rows(lambda t: householder_affine(t if block.input_scale is None else t * block.input_scale, u), x)
    block.fc1.bias.copy_(pre.std(0) - pre.amin(0))


@torch.no_grad()
def closed_form_start(block: HanBlock, x: Tensor, target: Tensor, iterations: int = 3) -> None:
    """Set the linear parameters of ``block`` so that ``block(x)`` is close to ``target`` (rows ``(T, n)``).

    Block coordinate descent on the squared error, each step exact:

    1. the gain (if any) and output bias: per-channel least squares of what the
       side path leaves, ``r = target - B A x``, on the Householder path's output
       ``h = H2 |H1 (s x) + b1|``: ``g_j = cov(h_j, r_j) / var(h_j)``,
       ``b2_j = mean(r_j) - g_j mean(h_j)``; without a gain, ``b2`` is the mean of ``r - h``;
    2. the side path (if any): reduced-rank regression of what the Householder
       path leaves, ``target - g h``, on ``x`` -- the least-squares map projected
       onto the top ``r`` principal directions of its fitted values (the best
       rank-``r`` linear map in squared error);

    repeated ``iterations`` times (when there are both), then step 1 once more.

    Householder directions and ``b1`` are left as they are (see
    :func:`linear_regime_start`; Adam fits them). With ``final_abs`` the output
    bias sits inside the last ``|.|``: only the gain is set (least squares through
    the origin).
    """
    was_training = block.training
    block.eval()
    inner_bias = block.fc2.bias
    out_bias = block.bias if block.bias is not None else inner_bias
    h = _rows(lambda t: block.fc2(block.fc1(t if block.input_scale is None else t * block.input_scale)), x)
    if inner_bias is not None and not block.final_abs:
        h = h - inner_bias
    g = torch.ones_like(h[0])
    side = torch.zeros_like(target)

    def gain_and_bias() -> Tensor:
        rest = target - side
        if block.final_abs:
            return (h * rest).sum(0) / h.pow(2).sum(0).clamp_min(1e-30) if block.gain is not None else g
        hm, rm = h.mean(0), rest.mean(0)
        new_g = g
        if block.gain is not None:
            hc = h - hm
            new_g = (hc * (rest - rm)).sum(0) / hc.pow(2).sum(0).clamp_min(1e-30)
        if out_bias is not None:
            out_bias.copy_(rm - new_g * hm)
        return new_g

    g = gain_and_bias()
    if block.side is not None:
        for _ in range(iterations if block.gain is not None else 1):
            down, up = _reduced_rank(x, target - g * h, block.side.rank)
            block.side.down.weight.copy_(down)
            block.side.up.weight.copy_(up)
            side = block.side(x)
            g = gain_and_bias()
    if block.gain is not None:
        block.gain.copy_(g)
    block.train(was_training)


@dataclass
class SiteScores:
    """Held-out fraction of variance unexplained of one site's output: the fit and three baselines."""

    fit: float
    deleted: float
    mean: float
    linear: float | None


def _adam(site: CalibrationSite, x: Tensor, y: Tensor, steps: int, lr: float, batch: int, gen: torch.Generator) -> None:
    """``steps`` Adam steps on the fitted block from its closed-form start (cosine decay); the start is kept if the
    steps end worse on the training rows (a short run at the full learning rate can: 20 steps took a Gemma-2
    block's FVU from 0.65 to 29)."""
    params = [p for p in site.fitted.parameters() if p.requires_grad]
    if not params or steps == 0:
        return
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    var = (y - y.mean(0)).pow(2).sum(1).mean().clamp_min(1e-30)

    def objective() -> float:
        with torch.no_grad():
            return fvu(_rows(lambda t: site_output(site, t, new_branch(site, t)), x), y)

    site.fitted.eval()  # and so it stays: the target has no dropout, and a kept BatchNorm's statistics stay put
    start = [p.detach().clone() for p in params], objective()
    with torch.enable_grad():  # hanify may be called under torch.no_grad()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=gen).to(x.device)  # gen is a CPU one
            xb = x[idx]
            loss = (site_output(site, xb, new_branch(site, xb)) - y[idx]).pow(2).sum(1).mean() / var
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step_overflows(opt):  # the steps end here, and the check below keeps the start if they left it
                break  # worse, as at any learning rate too high for the block
            sched.step()
    if not objective() <= start[1]:  # worse, or not finite
        with torch.no_grad():
            for p, value in zip(params, start[0], strict=True):
                p.copy_(value)


def fit_site(
    site: CalibrationSite,
    x: Tensor,
    *,
    steps: int,
    lr: float,
    batch: int,
    holdout: float,
    gen: torch.Generator,
    start: str = "linear",
    x_original: Tensor | None = None,
) -> SiteScores:
    """Fit ``site.fitted`` on the rows ``x``; score it and the baselines on held-out rows.

    The target is what the original block computes on ``x`` (the ``"block"`` target),
    or, given ``x_original`` (the same tokens' inputs in the original model), what the
    original *model* computes after the block: the post-norm's output
    ``N(x_o + reference(x_o))``, or without a post-norm the branch that brings the
    residual stream there, ``x_o + reference(x_o) - x`` (the ``"model"`` target, which
    also asks the block to undo the errors of the blocks before it where it can).
    """
    perm = torch.randperm(len(x), generator=gen).to(x.device)
    n_test = max(2, int(round(holdout * len(x))))  # a fraction of variance needs two rows
    if len(x) - n_test < 2:
        raise CalibrationDataError(
            f"calibration: only {len(x)} token rows recorded at {site.input_path}, too few to fit on and to score "
            f"the fit on (at least {n_test + 2} at CalibrationConfig.holdout={holdout:g}); give more calibration data"
        )
    parts = perm[n_test:], perm[:n_test]
    (train, test) = (x[i] for i in parts)
    with torch.no_grad():
        if x_original is None:
            branch_train, branch_test = _rows(site.reference, train), _rows(site.reference, test)
        else:  # the branch that takes this residual stream to the original model's stream after the block
            xo_train, xo_test = (x_original[i] for i in parts)
            branch_train = xo_train + _rows(site.reference, xo_train) - train
            branch_test = xo_test + _rows(site.reference, xo_test) - test
        y_train = site_output(site, train, branch_train)
        y_test = site_output(site, test, branch_test)
        if isinstance(site.fitted, HanBlock):
            if start == "linear":
                linear_regime_start(site.fitted, train)
            closed_form_start(site.fitted, train, branch_train if site.residual else branch_train + train)
    _adam(site, train, y_train, steps, lr, batch, gen)
    with torch.no_grad():
        score = fvu(_rows(lambda t: site_output(site, t, new_branch(site, t)), test), y_test)
        deleted = fvu(site_output(site, test, torch.zeros_like(branch_test)), y_test)
        mean = fvu(site_output(site, test, branch_train.mean(0).expand_as(branch_test)), y_test)
        linear = None
        if train.shape[1] <= 4096 and len(train) > train.shape[1]:
            w, c = least_squares(train, branch_train)
            linear = fvu(site_output(site, test, test @ w + c), y_test)
    return SiteScores(fit=score, deleted=deleted, mean=mean, linear=linear)
