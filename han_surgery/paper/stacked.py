"""Train ``R`` networks of one architecture as one batched computation.

The paper's protocols train many small networks that differ only in seed and hyper-parameters
(5 seeds x 2 learning rates per regression set and model, 4 or 9 learning rates per checkerboard
row, 16 optimiser settings x 2 targets per approximation student). Trained one after the other on
a CPU, each tiny step is dominated by per-operation overhead. :class:`StackedNet` holds ``R`` member networks with the
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

__all__ = [
    "LAST_DIM_MODULES",
    "StackedLinear",
    "StackedHouseholder",
    "MemberwiseModules",
    "StackedNet",
    "StackedAdam",
    "StackedSGD",
]

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


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    return type(a) is type(b) and a.extra_repr() == b.extra_repr()


class MemberwiseModules(nn.Module):
    """Parameter-free last-dimension modules that differ between members (e.g. ABS for some, ReLU for others).

    Each module is applied to the slice of the stack that holds its members; ``(R, B, n) -> (R, B, n)``.
    """

    def __init__(self, column: Sequence[nn.Module]) -> None:
        super().__init__()
        self.per_member = nn.ModuleList(copy.deepcopy(m) for m in column)
        self.runs: list[tuple[int, int]] = []  # [start, end) of consecutive members with the same module
        for r, module in enumerate(column):
            if self.runs and _same_module(column[self.runs[-1][0]], module):
                self.runs[-1] = (self.runs[-1][0], r + 1)
            else:
                self.runs.append((r, r + 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.per_member[start](x[start:end]) for start, end in self.runs])


class StackedNet(nn.Module):
    """``R`` ``nn.Sequential`` networks of one architecture, stacked into one batched network.

    Args:
        members: the networks (their current weights are copied; they are not modified). Every
            member must have the same sequence of layer types and parameter shapes. Supported
            layers: ``nn.Linear``; :class:`~han_surgery.layers.HouseholderLinear` and
            :class:`~han_surgery.layers.HanLayer` with ``reflections=1`` (the paper's layer); the
            parameter-free modules of :data:`LAST_DIM_MODULES`, which may differ between members
            (:class:`MemberwiseModules`: e.g. one stack of ABS and ReLU networks).

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
                if isinstance(a, LAST_DIM_MODULES) and isinstance(b, LAST_DIM_MODULES):
                    continue  # activations may differ between members
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
                same = all(_same_module(layer, m) for m in column)
                layers.append(copy.deepcopy(layer) if same else MemberwiseModules(column))
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
        for j, (stacked, layer) in enumerate(zip(self.layers, net, strict=True)):
            if isinstance(stacked, (StackedLinear, StackedHouseholder)):
                stacked.copy_to(layer, r)
            elif isinstance(stacked, MemberwiseModules):
                net[j] = copy.deepcopy(stacked.per_member[r])
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
    learning-rate schedulers scale. Updates use ``torch._foreach_*`` ops (one call per operation
    for all parameters), as ``torch.optim``'s ``foreach`` implementations do.
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
    def _per_param(values: Tensor, params: list[Tensor]) -> list[Tensor]:
        """``values`` (one per member) as a view that broadcasts against each parameter."""
        return [values.to(p.dtype).view(-1, *([1] * (p.dim() - 1))) for p in params]

    def _grads_with_decay(self, group: dict, params: list[Tensor]) -> list[Tensor]:
        """The gradients, plus ``weight_decay * p`` (L2, as ``torch.optim``'s ``weight_decay``) where it is non-zero."""
        grads = [p.grad for p in params]
        if bool((group["weight_decay"] != 0).any()):
            grads = torch._foreach_add(
                grads, torch._foreach_mul(params, self._per_param(group["weight_decay"], params))
            )
        return grads


class StackedAdam(_StackedOptimizer):
    """``torch.optim.Adam`` (L2 weight decay added to the gradient, no AMSGrad) with per-member lr and weight decay.

    Adam's step is linear in the learning rate: ``p <- p - lr * m_hat / (sqrt(v_hat) + eps)``, with
    ``m`` and ``v`` independent of ``lr``. So each step runs torch's fused Adam kernel
    (``torch._fused_adam_``, what ``Adam(fused=True)`` calls) at ``lr = 1`` and then moves every
    member from its old weights towards the result by its own learning rate,
    ``p <- p_old + lr_r * (p_1 - p_old)``: several times faster on CPU than unfused updates.

    Args:
        params: stacked parameters, leading dimension ``R`` (e.g. ``StackedNet.parameters()``).
        member_lr: ``R`` learning rates (or one for all).
        size: ``R``.
        weight_decay: ``R`` weight decays (or one for all).
    """

    def __init__(self, params, member_lr, size: int, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay=0.0):
        super().__init__(params, {"lr": 1.0, "betas": betas, "eps": eps}, member_lr, weight_decay, size)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        loss = None if closure is None else closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            for p in params:
                if not self.state[p]:
                    self.state[p].update(
                        step=torch.zeros((), dtype=torch.float32),
                        exp_avg=torch.zeros_like(p),
                        exp_avg_sq=torch.zeros_like(p),
                    )
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1)
            grads = self._grads_with_decay(group, params)
            old = [p.clone() for p in params]
            torch._fused_adam_(
                params,
                grads,
                [self.state[p]["exp_avg"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params],
                [],
                steps,
                lr=1.0,
                beta1=beta1,
                beta2=beta2,
                weight_decay=0.0,
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )
            torch._foreach_lerp_(old, params, self._per_param(group["lr"] * group["member_lr"], params))
            torch._foreach_copy_(params, old)
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
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = self._grads_with_decay(group, params)
            if group["momentum"]:
                if "momentum_buffer" not in self.state[params[0]]:
                    for p, g in zip(params, grads, strict=True):
                        self.state[p]["momentum_buffer"] = g.clone()
                    bufs = [self.state[p]["momentum_buffer"] for p in params]
                else:
                    bufs = [self.state[p]["momentum_buffer"] for p in params]
                    torch._foreach_mul_(bufs, group["momentum"])
                    torch._foreach_add_(bufs, grads)
                grads = bufs
            update = torch._foreach_mul(grads, self._per_param(group["lr"] * group["member_lr"], params))
            torch._foreach_sub_(params, update)
        return loss
