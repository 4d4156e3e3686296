"""White-box adversarial attacks for the robustness experiment: FGSM, PGD (L-inf, L2), Carlini-Wagner L2.

Written after the reference algorithms (Madry et al. 2018; Carlini & Wagner 2017) and the
defaults of torchattacks 3.5.1 (``PGD``, ``PGDL2``, ``CW``); torchattacks itself is not a dependency
because it pins ``requests~=2.25``. Every attack takes a classifier returning logits, inputs ``x``
in ``[0, 1]`` of any shape ``(N, ...)`` and integer labels ``y`` of shape ``(N,)``, and returns
adversarial inputs of the same shape, still in ``[0, 1]``. The model is put in eval mode and its
parameters receive no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["fgsm", "pgd_linf", "pgd_l2", "trades_kl_linf", "cw_l2", "robust_accuracy"]


def _flat_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """One signed-gradient step on the cross-entropy (Goodfellow et al. 2015): ``clip(x + eps sign(grad), 0, 1)``.

    Leaves the model's mode (train / eval) as it is, so it can make training samples.
    """
    return (x.detach() + eps * _grad(model, x, y).sign()).clamp(0, 1).detach()


def trades_kl_linf(
    model: nn.Module,
    x: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """TRADES' inner maximisation (Zhang et al. 2019): PGD on ``KL(f(x) || f(x'))`` in the L-inf ball.

    Starts at ``x + 0.001 N(0, I)`` and takes ``steps`` signed steps of ``alpha``, projecting to
    ``||x' - x||_inf <= eps`` and ``[0, 1]``, as the authors' reference code does. The model's
    mode is left as it is; its parameters receive no gradient.
    """
    x0 = x.detach()
    with torch.no_grad():
        p_clean = F.softmax(model(x0), dim=1)
    adv = x0 + 0.001 * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(adv), dim=1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(kl, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = (x0 + (adv - x0).clamp(-eps, eps)).clamp(0, 1)
    return adv.detach()


def pgd_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float | None = None,
    steps: int = 20,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on the cross-entropy in the L-inf ball ``||delta||_inf <= eps``.

    ``alpha`` (step size) defaults to ``2.5 * eps / steps`` (Madry et al.).
    """
    model.eval()
    alpha = 2.5 * eps / steps if alpha is None else alpha
    x0 = x.detach()
    adv = x0.clone()
    if random_start:
        adv = (adv + (torch.rand(adv.shape, generator=generator, dtype=adv.dtype) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        adv = adv + alpha * _grad(model, adv, y).sign()
        adv = (x0 + (adv - x0).clamp(-eps, eps)).clamp(0, 1).detach()
    return adv


def pgd_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float | None = None,
    steps: int = 20,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on the cross-entropy in the L2 ball ``||delta||_2 <= eps`` (per example).

    Steps along the L2-normalised gradient; ``alpha`` defaults to ``2.5 * eps / steps``.
    """
    model.eval()
    alpha = 2.5 * eps / steps if alpha is None else alpha
    x0 = x.detach()
    adv = x0.clone()
    if random_start:
        delta = torch.randn(adv.shape, generator=generator, dtype=adv.dtype)
        n = delta[0].numel()
        radius = torch.rand((adv.shape[0],), generator=generator, dtype=adv.dtype).view(-1, *([1] * (adv.dim() - 1)))
        delta = delta / _flat_norm(delta).clamp_min(1e-12) * radius ** (1.0 / n) * eps
        adv = (x0 + delta).clamp(0, 1)
    for _ in range(steps):
        g = _grad(model, adv, y)
        adv = adv + alpha * g / _flat_norm(g).clamp_min(1e-12)
        delta = adv - x0
        delta = delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        adv = (x0 + delta).clamp(0, 1).detach()
    return adv


def cw_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    c: float = 1.0,
    kappa: float = 0.0,
    steps: int = 100,
    lr: float = 0.01,
    abort_early: bool = False,
) -> Tensor:
    """Carlini-Wagner L2 attack (untargeted, fixed ``c``, no binary search, as torchattacks' ``CW``).

    Optimises ``w`` with Adam where ``x' = (tanh(w) + 1) / 2``, minimising
    ``||x' - x||_2^2 + c * max(Z_y - max_{j != y} Z_j, -kappa)``; returns, per example, the
    successful (misclassified) ``x'`` of smallest L2 distance found, or ``x`` itself if none.

    ``abort_early`` stops, as torchattacks' ``CW`` does by default, at the first check (every
    ``steps // 10`` steps) where the batch's total loss is not below 0.9999 x the previous check's.
    Once most of a batch is misclassified its distance term grows and the total rises, so this
    stops long before ``steps``: a much weaker attack. Off by default (all ``steps`` run).
    """
    model.eval()
    x0 = x.detach()
    w = torch.atanh((x0 * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6)).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    best = x0.clone()
    best_dist = torch.full((x0.shape[0],), float("inf"), dtype=x0.dtype)
    onehot: Tensor | None = None
    check_every, prev_loss = max(steps // 10, 1), float("inf")
    for step in range(steps):
        adv = (torch.tanh(w) + 1) / 2
        logits = model(adv)
        if onehot is None:
            onehot = F.one_hot(y, num_classes=logits.shape[1]).bool()
        real = logits[onehot]
        other = logits.masked_fill(onehot, float("-inf")).amax(dim=1)
        f = (real - other).clamp(min=-kappa)
        dist = (adv - x0).flatten(1).pow(2).sum(dim=1)
        loss = dist.sum() + c * f.sum()
        (w.grad,) = torch.autograd.grad(loss, w)
        opt.step()
        with torch.no_grad():
            success = logits.argmax(dim=1) != y
            improved = success & (dist < best_dist)
            best_dist = torch.where(improved, dist, best_dist)
            best[improved] = adv.detach()[improved]
        if abort_early and step % check_every == 0:
            if loss.item() > 0.9999 * prev_loss:
                break
            prev_loss = loss.item()
    return best


@torch.no_grad()
def _acc(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, attack, batch_size: int = 500, **kwargs) -> float:
    """Accuracy of ``model`` on ``attack(model, x, y, **kwargs)``, computed in batches."""
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        adv = attack(model, xb, yb, **kwargs)
        correct += _acc(model, adv, yb) * xb.shape[0]
    return correct / x.shape[0]
