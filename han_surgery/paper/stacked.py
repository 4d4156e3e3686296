"""Train ``R`` networks of one architecture as one batched computation.

The paper's protocols train many small networks that differ only in seed and hyper-parameters
(5 seeds x 2 learning rates per regression set, 10 learning rates per checkerboard row, 16
optimiser settings per approximation cell). Trained one after the other on a CPU, each tiny step
is dominated by per-operation overhead. :class:`StackedNet` holds ``R`` member networks with the
same layer sequence as *stacked* parameters (a leading dimension of size ``R`` on every weight)
and runs them in lockstep on an input of shape ``(R, B, features)``: one batched operation per
layer for all ``R`` members. :class:`StackedAdam` and :class:`StackedSGD` are ``torch.optim``'s
Adam and SGD with one learning rate and weight decay per member.

The stack is built from ordinary ``nn.Sequential`` members (made by the experiment's own
constructor and seed, hence the same initial weights as a single run) and gives each trained
member back as an ordinary network (:meth:`StackedNet.member`). Up to float rounding, training
the stack is training each member alone (``tests/test_paper_stacked.py``).

Batched math for member ``r`` (row vectors; ``x_r`` is ``(B, n)``):

* :class:`StackedLinear`: ``y_r = x_r W_r^T + b_r`` (``torch.baddbmm``).
* :class:`StackedHouseholder`: the paper's one-reflection layer,
  ``y_r = x_r - 2 (x_r u_r) u_r^T + b_r`` with ``u_r`` normalised by
  :func:`~han_surgery.functional.unit_rows`, then ``|.|`` for a Han-layer: the math of
  :func:`~han_surgery.functional.householder_affine` for ``k = 1``.
* Parameter-free modules acting on the last dimension (:data:`LAST_DIM_MODULES`) are applied to
  the whole stack as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..functional import unit_rows
from ..layers import Abs, HouseholderLinear
from .activations import GroupSort

__all__ = ["LAST_DIM_MODULES", "StackedLinear", "StackedHouseholder", "StackedNet", "StackedAdam", "StackedSGD"]

# Parameter-free modules that act element-wise or on the last dimension only, so that applying
# them to an (R, B, n) stack is applying them to each member's (B, n) input.
LAST_DIM_MODULES: tuple[type[nn.Module], ...] = (Abs, nn.ReLU, nn.Identity, nn.Tanh, GroupSort)


def _stack(tensors: Iterable[Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).clone())


class StackedLinear(nn.Module):
    """``R`` ``nn.Linear`` layers: ``weight (R, out, in)``, ``bias (R, out)``; ``(R, B, in) -> (R, B, out)``."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.weight = _stack(m.weight for m in layers)
        self.bias = _stack(m.bias for m in layers) if layers[0].bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight.transpose(1, 2))
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    @torch.no_grad()
    def copy_to(self, layer: nn.Linear, r: int) -> None:
        """Write member ``r``'s weights into ``layer``."""
        layer.weight.copy_(self.weight[r])
        if self.bias is not None:
            layer.bias.copy_(self.bias[r])


class _StackedReflection(torch.autograd.Function):
    """``z_r = x_r - 2 p_r u_r^T + b_r`` with ``p_r = x_r u_r`` (then ``|z_r|``), with a hand-written backward.

    ``x: (R, B, n)``, ``u: (R, n)`` unit rows, ``b: (R, n)``. With ``g = dL/dz`` (times ``sign(z)``
    after ``|.|``) and ``q_r = g_r u_r``::

        dL/dx_r = g_r - 2 q_r u_r^T      (the reflection is symmetric)
        dL/du_r = -2 (p_r^T g_r + q_r^T x_r)
        dL/db_r = sum_rows g_r

    The row-vector products ``u^T x^T`` are written as ``(R, 1, n) @ (R, n, B)`` batched products,
    which run several times faster on CPU than ``(R, B, n) @ (R, n, 1)``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, u: Tensor, b: Tensor, apply_abs: bool) -> Tensor:  # type: ignore[override]
        u_row = u.unsqueeze(1)  # (R, 1, n)
        p = torch.bmm(u_row, x.transpose(1, 2))  # (R, 1, B)
        z = torch.addcmul(x, p.transpose(1, 2), u_row, value=-2.0).add_(b.unsqueeze(1))
        ctx.apply_abs = apply_abs
        ctx.save_for_backward(x, u, p, z if apply_abs else None)
        return z.abs() if apply_abs else z

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, u, p, z = ctx.saved_tensors
        g = z.sign().mul_(grad) if ctx.apply_abs else grad
        u_row = u.unsqueeze(1)
        q = torch.bmm(u_row, g.transpose(1, 2))  # (R, 1, B)
        gx = torch.addcmul(g, q.transpose(1, 2), u_row, value=-2.0)
        gu = torch.bmm(p, g).add_(torch.bmm(q, x)).mul_(-2.0).squeeze(1)
        return gx, gu, g.sum(1), None


class StackedHouseholder(nn.Module):
    """``R`` one-reflection Householder layers: ``u (R, n)``, ``bias (R, n)``; ``(R, B, n) -> (R, B, n)``.

    ``y_r = x_r - 2 (x_r u_hat_r) u_hat_r^T + b_r`` (``u_hat_r = u_r / ||u_r||``), then ``|y_r|`` when
    the members are :class:`~han_surgery.layers.HanLayer`.
    """

    def __init__(self, layers: Sequence[HouseholderLinear]) -> None:
        super().__init__()
        self.apply_abs = layers[0].apply_abs
        self.u = _stack(m.u[0] for m in layers)
        self.bias = _stack(m.bias for m in layers) if layers[0].bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias if self.bias is not None else self.u.new_zeros(self.u.shape)
        return _StackedReflection.apply(x, unit_rows(self.u), bias, self.apply_abs)

    @torch.no_grad()
    def copy_to(self, layer: HouseholderLinear, r: int) -> None:
        """Write member ``r``'s weights into ``layer``."""
        layer.u.copy_(self.u[r : r + 1])
        if self.bias is not None:
            layer.bias.copy_(self.bias[r])


class StackedNet(nn.Module):
    """``R`` ``nn.Sequential`` networks of one architecture, stacked into one batched network.

    Args:
        members: the networks (their current weights are copied; they are not modified). Every
            member must have the same sequence of layer types and parameter shapes. Supported
            layers: ``nn.Linear``; :class:`~han_surgery.layers.HouseholderLinear` and
            :class:`~han_surgery.layers.HanLayer` with ``reflections=1`` (the paper's layer); the
            parameter-free modules of :data:`LAST_DIM_MODULES`.

    Shapes:
        ``(R, B, in_features) -> (R, B, out_features)``: row ``r`` goes through member ``r``. A
        ``(B, in_features)`` input is fed to every member.
    """

    def __init__(self, members: Sequence[nn.Sequential]) -> None:
        super().__init__()
        if not members:
            raise ValueError("StackedNet: needs at least one member network")
        first = members[0]
        for r, member in enumerate(members):
            if not isinstance(member, nn.Sequential) or len(member) != len(first):
                raise ValueError(
                    f"StackedNet: member {r} must be an nn.Sequential of {len(first)} layers like member 0, got "
                    f"{type(member).__name__}"
                )
            for j, (a, b) in enumerate(zip(first, member, strict=True)):
                shapes_a, shapes_b = [p.shape for p in a.parameters()], [p.shape for p in b.parameters()]
                if type(a) is not type(b) or shapes_a != shapes_b:
                    raise ValueError(
                        f"StackedNet: layer {r}.{j} is {type(b).__name__} {shapes_b} but layer 0.{j} is "
                        f"{type(a).__name__} {shapes_a}; stack only networks of one architecture"
                    )
        layers: list[nn.Module] = []
        for j, layer in enumerate(first):
            column = [m[j] for m in members]
            if isinstance(layer, HouseholderLinear):
                if layer.reflections != 1:
                    raise ValueError(
                        f"StackedNet: layer 0.{j} has reflections={layer.reflections}; only the paper's "
                        "one-reflection layer is batched here"
                    )
                layers.append(StackedHouseholder(column))
            elif isinstance(layer, nn.Linear):
                layers.append(StackedLinear(column))
            elif isinstance(layer, LAST_DIM_MODULES):
                layers.append(copy.deepcopy(layer))
            else:
                raise TypeError(
                    f"StackedNet: layer 0.{j} ({type(layer).__name__}) is not supported; use nn.Linear, "
                    f"HouseholderLinear/HanLayer or one of {[m.__name__ for m in LAST_DIM_MODULES]}"
                )
        self.size = len(members)
        self.layers = nn.Sequential(*layers)
        # A plain copy of member 0 (held in a tuple, so that its parameters are not part of the stack's).
        self._template: tuple[nn.Sequential] = (copy.deepcopy(first),)

    def __len__(self) -> int:
        return self.size

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.size, *x.shape)
        if x.dim() != 3 or x.shape[0] != self.size:
            raise ValueError(
                f"StackedNet: input must be (R={self.size}, B, features) or (B, features), got {tuple(x.shape)}"
            )
        return self.layers(x)

    def member(self, r: int) -> nn.Sequential:
        """Member ``r`` with its current weights, as a fresh ``nn.Sequential`` of the original layer types."""
        net = copy.deepcopy(self._template[0])
        for stacked, layer in zip(self.layers, net, strict=True):
            if isinstance(stacked, (StackedLinear, StackedHouseholder)):
                stacked.copy_to(layer, r)
        return net


def _per_member(value: float | Sequence[float] | Tensor, size: int, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(size)
    if t.numel() != size:
        raise ValueError(f"stacked optimizer: {name} needs 1 or {size} values (one per member), got {t.numel()}")
    return t.clone()


class _StackedOptimizer(torch.optim.Optimizer):
    """Base of the per-member optimizers: parameters have a leading member dimension of size ``R``.

    ``member_lr`` and ``weight_decay`` hold one value per member. The step of member ``r`` uses the
    learning rate ``lr * member_lr[r]``; ``lr`` (a float, 1 by default) is what ``torch.optim``'s
    learning-rate schedulers scale.
    """

    def __init__(self, params, defaults: dict, member_lr, weight_decay, size: int) -> None:
        defaults = dict(defaults, member_lr=_per_member(member_lr, size, "member_lr"))
        defaults["weight_decay"] = _per_member(weight_decay, size, "weight_decay")
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() == 0 or p.shape[0] != size:
                    raise ValueError(f"stacked optimizer: parameter of shape {tuple(p.shape)} has no member dim {size}")

    @staticmethod
    def _bcast(values: Tensor, like: Tensor) -> Tensor:
        return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class StackedAdam(_StackedOptimizer):
    """``torch.optim.Adam`` (L2 weight decay added to the gradient, no AMSGrad) with per-member lr and weight decay.

    Args:
        params: stacked parameters, leading dimension ``R`` (e.g. ``StackedNet.parameters()``).
        member_lr: ``R`` learning rates (or one for all).
        weight_decay: ``R`` weight decays (or one for all).
        size: ``R``.
    """

    def __init__(self, params, member_lr, size: int, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay=0.0):
        super().__init__(params, {"lr": 1.0, "betas": betas, "eps": eps}, member_lr, weight_decay, size)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                grad = p.grad
                wd = group["weight_decay"]
                if bool((wd != 0).any()):
                    grad = grad + self._bcast(wd, p) * p
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1 ** state["step"]
                bias_correction2_sqrt = (1 - beta2 ** state["step"]) ** 0.5
                denom = (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(group["eps"])
                step_size = self._bcast(group["lr"] * group["member_lr"] / bias_correction1, p)
                p.sub_(step_size * state["exp_avg"] / denom)
        return loss


class StackedSGD(_StackedOptimizer):
    """``torch.optim.SGD`` (momentum, L2 weight decay, no dampening or Nesterov) with per-member lr and weight decay.

    Args as :class:`StackedAdam`, plus ``momentum``.
    """

    def __init__(self, params, member_lr, size: int, momentum: float = 0.0, weight_decay=0.0):
        super().__init__(params, {"lr": 1.0, "momentum": momentum}, member_lr, weight_decay, size)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                wd = group["weight_decay"]
                if bool((wd != 0).any()):
                    grad = grad + self._bcast(wd, p) * p
                if group["momentum"]:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = grad.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                    grad = state["momentum_buffer"]
                p.sub_(self._bcast(group["lr"] * group["member_lr"], p) * grad)
        return loss
