"""Householder layers: the building blocks of Yu & Zhang, "A Lightweight and
Gradient-Stable Neural Layer" (Neural Networks, 2024).

Every layer here acts on one dimension (by default the last) of a tensor of shape ``(..., n)``.

* :class:`HouseholderLinear` -- ``y = H_k ... H_1 x + b`` with
  ``H_i = I - 2 u_i u_i^T / ||u_i||^2``. Orthogonal, so ``||dy/dx||`` is exactly 1
  in every direction. ``k = 1`` (default) is the paper's layer: ``2n`` parameters
  (``u`` and ``b``) and ``O(n)`` compute per row instead of ``n^2 + n``.
* :class:`Abs` -- element-wise ``|x|``, the paper's activation: its Jacobian is a
  diagonal of signs, so it is orthogonal too (almost everywhere).
* :class:`HanLayer` -- ``|H x + b|``: orthogonal Jacobian and 1-Lipschitz.
* :class:`HanBlock` -- the paper's FFN replacement ``H2 |H1 x + b1| + b2`` (the
  Han-Mixer form adds a final ``|.|``), ``4n`` parameters; optionally with a
  per-channel gain, a per-channel input scale and a low-rank linear side path
  (:class:`LowRankLinear`), the extra degrees of freedom calibrated surgery fits.
* :class:`HanStack` -- ``depth`` Han-layers in sequence (the hidden stack of the paper's
  HanNet) as one module: one kernel call and two parameter tensors for the whole stack.

``dim`` (default ``-1``) is the dimension the reflections act on: ``HanBlock(N, dim=-2)``
mixes the ``N`` tokens of a ``(B, N, C)`` tensor without transposing it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .functional import householder_chain, householder_dense, unit_rows

__all__ = ["HouseholderLinear", "Abs", "HanLayer", "HanBlock", "HanStack", "LowRankLinear", "stack_han_layers"]

HouseholderInit = Literal["orthogonal", "normal"]
BiasInit = Literal["uniform", "zeros"]


def _as_int(name: str, arg: str, value: Any) -> int:
    """``value`` as an ``int``: an ``int`` or a NumPy integer, never a ``bool``, a float or a tensor."""
    if isinstance(value, (bool, torch.Tensor)) or (hasattr(value, "ndim") and value.ndim != 0):
        raise ValueError(f"{name}: {arg} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: {arg} must be an int, got {value!r}") from None


def _check_arguments(name: str, features: int, reflections: int, init: str, bias_init: str) -> None:
    if features < 1:
        raise ValueError(f"{name}: features must be >= 1, got {features}")
    if not 1 <= reflections <= features:
        raise ValueError(f"{name}: reflections must be in [1, features={features}], got {reflections}")
    if init not in ("orthogonal", "normal"):
        raise ValueError(f"{name}: init must be 'orthogonal' or 'normal', got {init!r}")
    if bias_init not in ("uniform", "zeros"):
        raise ValueError(f"{name}: bias_init must be 'uniform' or 'zeros', got {bias_init!r}")


@torch.no_grad()
def _init_householder(u: Tensor, bias: Tensor | None, init: str, bias_init: str) -> None:
    """Initialise one layer's ``u`` ``(k, n)`` and ``bias`` ``(n,)`` (see :class:`HouseholderLinear`)."""
    if init == "orthogonal" and u.dtype in (torch.float16, torch.bfloat16):
        # torch's QR has no half-precision kernels: draw in float32, then round (a model built under
        # ``torch.set_default_dtype(torch.bfloat16)`` or ``from_config(..., dtype=torch.bfloat16)``)
        u.copy_(nn.init.orthogonal_(torch.empty(u.shape, dtype=torch.float32, device=u.device)))
    elif init == "orthogonal":
        nn.init.orthogonal_(u)
    else:
        nn.init.normal_(u)
    if bias is not None:
        if bias_init == "uniform":
            bound = 1.0 / math.sqrt(u.shape[-1])
            nn.init.uniform_(bias, -bound, bound)
        else:
            nn.init.zeros_(bias)


class HouseholderLinear(nn.Module):
    """A product of ``reflections`` Householder reflections plus a bias.

    ``y = H_k ... H_1 x + b``, ``H_i = I - 2 u_i u_i^T / ||u_i||^2``.

    Args:
        features: ``n``, the size of the dimension the layer acts on (input and
            output: a reflection is square).
        bias: learn ``b`` (shape ``(n,)``).
        reflections: ``k``, the number of reflections. ``1`` is the paper's layer
            (``n`` direction parameters); ``k = n`` can express any orthogonal
            matrix with determinant ``(-1)^n``. Costs ``O(n k)`` per row and is
            computed in compact WY form, never as an ``n x n`` matrix.
        init: ``"orthogonal"`` (the authors' code; ``u`` rows are random orthonormal
            directions) or ``"normal"`` (i.i.d. Gaussian directions). With orthonormal
            rows the product is ``I - 2 U^T U``, the reflection through a random
            ``k``-dimensional subspace (symmetric, eigenvalues +-1); for ``k = n`` that is
            ``-I`` whatever the seed, so use ``"normal"`` for a random orthogonal start.
        bias_init: ``"uniform"`` (the authors' code; ``U(-1/sqrt(n), 1/sqrt(n))``, as
            ``nn.Linear``) or ``"zeros"``.
        dim: the dimension of the input the layer acts on (default: the last).

    Shapes:
        input ``(..., n)`` -> output ``(..., n)`` (``n`` at ``dim``), in the input's dtype
        (float32, float64, bfloat16 or float16).

    Parameters:
        ``u``: ``(k, n)`` Householder vectors (any non-zero scale; a zero row is
        the identity). ``bias``: ``(n,)``.
    """

    apply_abs: bool = False

    def __init__(
        self,
        features: int,
        bias: bool = True,
        reflections: int = 1,
        init: HouseholderInit = "orthogonal",
        bias_init: BiasInit = "uniform",
        dim: int = -1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        features = _as_int(type(self).__name__, "features", features)
        reflections = _as_int(type(self).__name__, "reflections", reflections)
        dim = _as_int(type(self).__name__, "dim", dim)
        _check_arguments(type(self).__name__, features, reflections, init, bias_init)
        factory = {"device": device, "dtype": dtype}
        self.features = features
        self.reflections = reflections
        self.init = init
        self.bias_init = bias_init
        self.dim = dim
        self.u = nn.Parameter(torch.empty(reflections, features, **factory))
        self.bias = nn.Parameter(torch.empty(features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise ``u`` and ``bias`` as set by ``init`` and ``bias_init``."""
        _init_householder(self.u, self.bias, self.init, self.bias_init)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.unsqueeze(0) if self.bias is not None else None
        return householder_chain(x, self.u.unsqueeze(0), bias, (self.apply_abs,), dim=self.dim, normalize=True)

    @torch.no_grad()
    def to_dense(self) -> Tensor:
        """The equivalent dense weight ``M = H_k ... H_1`` of shape ``(n, n)``, in the layer's dtype (computed in
        float32 for a half-precision layer).

        ``HouseholderLinear`` computes ``x @ M.T + bias``, exactly like an
        ``nn.Linear`` whose ``weight`` is ``M``.
        """
        return householder_dense(unit_rows(self.u)).to(self.u.dtype)

    def extra_repr(self) -> str:
        dim = f", dim={self.dim}" if self.dim != -1 else ""
        return f"features={self.features}, reflections={self.reflections}, bias={self.bias is not None}{dim}"


class Abs(nn.Module):
    """Element-wise absolute value ``|x|``, the activation of a Han-layer. Any shape."""

    def forward(self, x: Tensor) -> Tensor:
        return x.abs()


class HanLayer(HouseholderLinear):
    """A Han-layer: ``|H_k ... H_1 x + b|`` (Yu & Zhang, Eq. 3), with ``|.|`` fused into one pass.

    Same arguments, parameters and shapes as :class:`HouseholderLinear`. Its
    Jacobian ``diag(sign(z)) H`` is orthogonal almost everywhere and the map is
    1-Lipschitz: ``||f(x) - f(y)|| <= ||x - y||``.
    """

    apply_abs = True


class _ZeroInitLinear(nn.Linear):
    """An ``nn.Linear`` whose ``reset_parameters`` zeroes it: :class:`LowRankLinear`'s ``up``, which a
    re-initialisation (``reset_parameters()`` on every module, parents first, after ``to_empty``) resets after
    its parent. Built, it draws ``nn.Linear``'s random numbers before zeroing, so that what is built after it gets
    the seeded weights it always got."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._zero = False  # nn.Linear.__init__ calls reset_parameters: its init first, as ever
        super().__init__(*args, **kwargs)
        self._zero = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self._zero:
            super().reset_parameters()
            return
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class LowRankLinear(nn.Module):
    """A rank-``r`` linear map without bias: ``y = B (A x)``, ``A: (r, n)``, ``B: (n_out, r)``.

    ``r (n + n_out)`` parameters and ``O((n + n_out) r)`` compute per row instead of
    ``n n_out``. ``B`` starts at zero, so a fresh side path adds nothing (also after
    :meth:`reset_parameters`, or ``up.reset_parameters()``).

    Shapes: ``(..., n) -> (..., n_out)``. Parameters: ``down.weight`` ``(r, n)``,
    ``up.weight`` ``(n_out, r)``.
    """

    def __init__(
        self,
        features: int,
        rank: int,
        out_features: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        features, rank = _as_int(name, "features", features), _as_int(name, "rank", rank)
        out_features = features if out_features is None else _as_int(name, "out_features", out_features)
        if not 1 <= rank <= min(features, out_features):
            raise ValueError(
                f"{type(self).__name__}: rank must be in [1, min(features, out_features)="
                f"{min(features, out_features)}], got {rank}"
            )
        self.rank = rank
        self.down = nn.Linear(features, rank, bias=False, device=device, dtype=dtype)
        self.up = _ZeroInitLinear(rank, out_features, bias=False, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """Re-initialise ``A`` as ``nn.Linear`` does and ``B`` to zero."""
        self.down.reset_parameters()
        self.up.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class HanBlock(nn.Module):
    """The paper's FFN replacement: ``H2 |H1 x + b1| + b2`` (optionally ``|...|`` again).

    ``x -> HanLayer -> drop1 -> HouseholderLinear (or HanLayer) -> drop2``

    With the optional extras (all off by default; then the block, its
    parameters and its ``state_dict`` keys are exactly the paper's)::

        y = g * (H2 |H1 (s * x) + b1|) + b2 + B A x

    ``s`` is a per-channel input scale (``input_scale``), ``g`` a per-channel
    output gain (``gain``) and ``B A`` a rank-``r`` linear side path
    (``side``, a :class:`LowRankLinear`). With a gain, ``b2`` moves out of
    ``fc2`` to the block's own ``bias`` so that it is added after the gain
    (with ``final_abs`` it stays inside: ``g * |H2 z + b2|``). A Householder
    product is orthogonal, so the plain block's Jacobian has every singular
    value 1 away from the kinks of ``|.|``; the extras let it express the small,
    near-linear maps that the FFNs of pretrained models compute (see
    ``docs/CALIBRATION.md``).

    Without extras, and when neither dropout is active (``p = 0`` or eval mode), both layers run as one chain
    (:func:`~han_surgery.functional.householder_chain`): one pass over memory for the block
    and only the block's input saved for backward.

    Args:
        features: ``n`` (the block is square, ``(..., n) -> (..., n)``).
        reflections: reflections per Householder layer (1 = paper).
        bias: learn ``b1`` and ``b2``.
        final_abs: end with ``|.|``, the Han-Mixer block of the paper's
            Section 5.3 (``|H2 |H1 x + b1| + b2|``; the gain and side path
            apply after it).
        drop: dropout probability after each layer, a float or a
            ``(drop1, drop2)`` pair, placed as in timm's ``Mlp`` (``H1, |.|,
            Dropout, H2, Dropout``).
        init, bias_init: passed to both layers (see :class:`HouseholderLinear`).
        gain: learn ``g`` (shape ``(n,)``, starts at 1): ``n`` parameters.
        input_scale: learn ``s`` (shape ``(n,)``, starts at 1): ``n`` parameters.
        side_rank: ``r > 0`` adds the side path ``B A x`` (``2 n r`` parameters,
            starts at 0).
        dim: the dimension of the input the block acts on (default: the last; the extras need
            the last).

    ``4n`` parameters for ``reflections=1`` and ``bias=True`` (plus ``n`` per
    gain or input scale and ``2 n r`` for the side path), against
    ``2 n h + n + h`` for a ``n -> h -> n`` MLP.
    """

    def __init__(
        self,
        features: int,
        reflections: int = 1,
        bias: bool = True,
        final_abs: bool = False,
        drop: float | tuple[float, float] = 0.0,
        init: HouseholderInit = "orthogonal",
        bias_init: BiasInit = "uniform",
        gain: bool = False,
        input_scale: bool = False,
        side_rank: int = 0,
        dim: int = -1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(drop, (int, float)):
            drop1, drop2 = drop, drop
        elif isinstance(drop, (tuple, list)) and len(drop) == 2:
            drop1, drop2 = drop
        else:
            raise ValueError(f"{name}: drop must be a probability or a (drop1, drop2) pair, got {drop!r}")
        side_rank = _as_int(name, "side_rank", side_rank)
        kwargs = dict(
            bias=bias, reflections=reflections, init=init, bias_init=bias_init, dim=dim, device=device, dtype=dtype
        )
        factory = {"device": device, "dtype": dtype}
        if side_rank < 0:
            raise ValueError(f"{type(self).__name__}: side_rank must be >= 0, got {side_rank}")
        if (gain or input_scale or side_rank) and dim not in (-1,):
            raise ValueError(
                f"{type(self).__name__}: gain, input_scale and side_rank act on the last dimension; dim={dim}"
            )
        self.features = features
        self.final_abs = final_abs
        self.bias_init = bias_init
        # Registered before the layers only when enabled, so that the default block's
        # state_dict keys (fc1.*, fc2.*) are exactly those of the paper's block.
        self.input_scale = nn.Parameter(torch.ones(features, **factory)) if input_scale else None
        self.fc1 = HanLayer(features, **kwargs)
        self.drop1 = nn.Dropout(drop1)
        bias_after_gain = gain and bias and not final_abs
        if bias_after_gain:
            kwargs["bias"] = False
        self.fc2 = (HanLayer if final_abs else HouseholderLinear)(features, **kwargs)
        self.gain = nn.Parameter(torch.empty(features, **factory)) if gain else None
        self.bias = nn.Parameter(torch.empty(features, **factory)) if bias_after_gain else None
        HanBlock.reset_parameters(self)  # before the side path draws its weights, as fc2's bias would be drawn
        self.side = LowRankLinear(features, side_rank, **factory) if side_rank else None
        self.drop2 = nn.Dropout(drop2)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise the block's own parameters: ``gain`` and ``input_scale`` to 1, the bias after the gain
        as ``fc2``'s would be (``bias_init``). Not the layers' nor the side path's: each module has its own
        ``reset_parameters`` (``side``'s up-projection resets to 0), so a meta-device model materialises with
        ``to_empty`` and ``reset_parameters()`` on every module."""
        for scale in (self.input_scale, self.gain):
            if scale is not None:
                nn.init.ones_(scale)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.features) if self.bias_init == "uniform" else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if not self._fusable():
            # the extras work in the layers' dtype: under autocast, a float32 gain would promote z to float32
            z = self.fc2(self.drop1(self.fc1(x if self.input_scale is None else x * self.input_scale.to(x.dtype))))
            if self.gain is not None:
                z = z * self.gain.to(z.dtype)
            if self.bias is not None:
                z = z + self.bias.to(z.dtype)
            if self.side is not None:
                z = z + self.side(x).to(z.dtype)
            return self.drop2(z)
        fc1, fc2 = self.fc1, self.fc2
        bias = torch.stack([fc1.bias, fc2.bias]) if fc1.bias is not None else None
        return householder_chain(
            x, torch.stack([fc1.u, fc2.u]), bias, (True, fc2.apply_abs), dim=fc1.dim, normalize=True
        )

    def _fusable(self) -> bool:
        """Both layers can run as one chain: no extras, no active dropout, nothing swapped in or hooked on them
        (torch hooks, forward or backward, or a ``forward`` patched on the instance as accelerate's offloading
        does): the chain calls none of the four sub-modules."""
        # read from _modules directly: this runs on every forward, and nn.Module.__getattr__ is slow
        modules = self._modules
        fc1, fc2, drop1, drop2 = modules["fc1"], modules["fc2"], modules["drop1"], modules["drop2"]
        if not (
            self.input_scale is None
            and self.gain is None
            and self.bias is None
            and self.side is None
            and type(fc1) is HanLayer
            and type(fc2) in (HanLayer, HouseholderLinear)
            and self._passes_through(drop1)
            and self._passes_through(drop2)
            and fc1.dim == fc2.dim
        ):
            return False
        for m in (fc1, fc2, drop1, drop2):
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return False
            # a forward patched on the instance: accelerate's offloading loads the weights there
            if "forward" in m.__dict__:
                return False
        u1, u2 = fc1._parameters["u"], fc2._parameters["u"]
        return (
            u1.shape == u2.shape
            and u1.dtype == u2.dtype
            and (fc1._parameters.get("bias") is None) == (fc2._parameters.get("bias") is None)
        )

    def _passes_through(self, drop: nn.Module) -> bool:
        """``drop`` returns its input as it is: ``nn.Identity`` (a dropout removed), or an ``nn.Dropout``
        in eval mode or of probability 0."""
        return type(drop) is nn.Identity or (type(drop) is nn.Dropout and (not self.training or drop.p == 0))

    def extra_repr(self) -> str:
        extras = [name for name in ("input_scale", "gain") if getattr(self, name) is not None]
        return f"features={self.features}, final_abs={self.final_abs}" + "".join(f", {e}=True" for e in extras)


class HanStack(nn.Module):
    """``depth`` Han-layers of width ``n`` in sequence, ``a <- |H_{l,k} ... H_{l,1} a + b_l|``, as one chain.

    The same function as ``nn.Sequential(*[HanLayer(n) for _ in range(depth)])`` with the same
    parameters (:meth:`from_layers` converts), computed by one
    :func:`~han_surgery.functional.householder_chain` call: one pass over memory forward, one
    backward, only the input saved, and two parameter tensors for the whole stack instead of
    ``2 * depth``. For deep stacks of narrow layers (the paper's HanNet: 19 Han-layers of width
    200 at batch 100) the per-layer overhead of separate modules, autograd nodes and optimizer
    updates is most of a training step.

    Args:
        features: ``n``.
        depth: the number of Han-layers.
        reflections, bias, init, bias_init, dim: as for :class:`HouseholderLinear`, for every layer.

    Parameters:
        ``u``: ``(depth, k, n)``; ``bias``: ``(depth, n)``.

    Shapes: input ``(..., n)`` -> output ``(..., n)`` (``n`` at ``dim``).
    """

    def __init__(
        self,
        features: int,
        depth: int,
        reflections: int = 1,
        bias: bool = True,
        init: HouseholderInit = "orthogonal",
        bias_init: BiasInit = "uniform",
        dim: int = -1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        features = _as_int(type(self).__name__, "features", features)
        reflections = _as_int(type(self).__name__, "reflections", reflections)
        depth, dim = _as_int(type(self).__name__, "depth", depth), _as_int(type(self).__name__, "dim", dim)
        _check_arguments(type(self).__name__, features, reflections, init, bias_init)
        if depth < 1:
            raise ValueError(f"HanStack: depth must be >= 1, got {depth}")
        factory = {"device": device, "dtype": dtype}
        self.features, self.depth, self.reflections = features, depth, reflections
        self.init, self.bias_init, self.dim = init, bias_init, dim
        self.u = nn.Parameter(torch.empty(depth, reflections, features, **factory))
        self.bias = nn.Parameter(torch.empty(depth, features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every layer as :class:`HanLayer` does."""
        for layer in range(self.depth):
            bias = self.bias[layer] if self.bias is not None else None
            _init_householder(self.u[layer], bias, self.init, self.bias_init)

    def forward(self, x: Tensor) -> Tensor:
        return householder_chain(x, self.u, self.bias, (True,) * self.depth, dim=self.dim, normalize=True)

    @classmethod
    def from_layers(cls, layers: Sequence[nn.Module]) -> HanStack:
        """A stack with the parameters of consecutive :class:`HanLayer` s (same width, reflections, dim and bias)."""
        layers = list(layers)
        if not layers or any(type(m) is not HanLayer for m in layers):
            raise ValueError("HanStack.from_layers: expects a non-empty sequence of HanLayer modules")
        first = layers[0]
        key = (first.features, first.reflections, first.dim, first.bias is not None, first.u.dtype, first.u.device)
        for m in layers:
            if (m.features, m.reflections, m.dim, m.bias is not None, m.u.dtype, m.u.device) != key:
                raise ValueError(
                    "HanStack.from_layers: every layer needs the same features, reflections, dim, bias, dtype "
                    f"and device; got {m} after {first}"
                )
        stack = cls(
            first.features,
            len(layers),
            reflections=first.reflections,
            bias=first.bias is not None,
            init=first.init,
            bias_init=first.bias_init,
            dim=first.dim,
            device=first.u.device,
            dtype=first.u.dtype,
        )
        with torch.no_grad():
            stack.u.copy_(torch.stack([m.u for m in layers]))
            if stack.bias is not None:
                stack.bias.copy_(torch.stack([m.bias for m in layers]))
        return stack

    def extra_repr(self) -> str:
        dim = f", dim={self.dim}" if self.dim != -1 else ""
        return (
            f"features={self.features}, depth={self.depth}, reflections={self.reflections}, "
            f"bias={self.bias is not None}{dim}"
        )


def stack_han_layers(modules: Iterable[nn.Module]) -> nn.Sequential:
    """``modules`` as an ``nn.Sequential`` in which each run of consecutive :class:`HanLayer` s is one :class:`HanStack`.

    The function computed is unchanged (:meth:`HanStack.from_layers` copies the parameters); a HanNet
    such as ``han_net(2, 30, 20, 2)`` then runs its Han-layers as one operator per direction. The layers
    of a run must share width, reflections, dim, bias, dtype and device (``ValueError`` otherwise).
    """
    out: list[nn.Module] = []
    run: list[nn.Module] = []
    for module in modules:
        if type(module) is HanLayer:
            run.append(module)
            continue
        if run:
            out.append(HanStack.from_layers(run))
            run = []
        out.append(module)
    if run:
        out.append(HanStack.from_layers(run))
    return nn.Sequential(*out)
