"""The C++/OpenMP CPU kernel, compiled on first use with :func:`torch.utils.cpp_extension.load`.

``householder_cpu.cpp`` implements three operators, ``torch.ops.han_surgery.householder_chain_forward``
(differentiable: its autograd is C++ too), ``householder_layer_forward_saving`` (the forward of one layer
with ``k > 1`` that also returns what its backward reuses) and ``householder_chain_backward`` (see the
source for the math). Their schemas are defined here, at import, so that
:mod:`han_surgery.kernels.flops` can register their FLOP formulas before the extension is built; the
extension adds their implementations. Code that needs the implementations registered first (an autograd
formula) passes a callback to :func:`on_load`. Nothing is compiled when
``han_surgery`` is imported: the first Householder layer that runs on a CPU tensor calls
:func:`available`, which builds the extension once (about a minute with g++ and ninja; then cached in
torch's extensions directory, ``TORCH_EXTENSIONS_DIR``) and loads it. Without a compiler, or when
the build fails, :func:`available` logs one warning and returns ``False``, and the layers use
their PyTorch implementation.

The build targets the instruction set PyTorch itself uses on this machine
(``torch.backends.cpu.get_cpu_capability()``), and that name is part of the extension's name, so
a cache directory shared by different machines keeps one build per instruction set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["available", "on_load", "define_fallback", "SOURCE", "ENV_VAR"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("householder_cpu.cpp")
ENV_VAR = "HAN_SURGERY_CPU_KERNEL"
"""Set to ``0`` to never build or use the CPU kernel (the PyTorch implementation runs instead)."""

_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}

# The operators' schemas (householder_cpu.cpp registers their CPU and autograd kernels when it is loaded).
_LIBRARY = torch.library.Library("han_surgery", "DEF")
_LIBRARY.define("householder_chain_forward(Tensor x, Tensor u, Tensor b, int[] abs, bool normalize) -> Tensor")
_LIBRARY.define("householder_layer_forward_saving(Tensor x, Tensor u, Tensor b, int[] abs, bool normalize) -> Tensor[]")
_LIBRARY.define(
    "householder_chain_backward(Tensor grad, Tensor x, Tensor u, Tensor b, int[] abs, bool normalize, "
    "bool need_input, bool need_params, Tensor saved_p, Tensor saved_sign) -> Tensor[]"
)


# Fake kernels (torch._subclasses.fake_tensor.FakeTensorMode: shapes, memory and FLOPs without compute; fake tensors
# report device "cpu", so the layers pick these operators): the outputs' shapes and dtypes, as the C++ kernels make them.
@torch.library.register_fake("han_surgery::householder_chain_forward", lib=_LIBRARY)
def _chain_forward_fake(x, u, b, abs, normalize):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("han_surgery::householder_layer_forward_saving", lib=_LIBRARY)
def _layer_forward_saving_fake(x, u, b, abs, normalize):
    rows, k, n = x.shape[0], u.shape[1], u.shape[2]
    projections = x.new_empty(rows, k, dtype=torch.promote_types(x.dtype, torch.float32))  # the accumulation dtype
    signs = x.new_empty(rows if abs[0] else 0, n, dtype=torch.int8)
    return [torch.empty_like(x, memory_format=torch.contiguous_format), projections, signs]


@torch.library.register_fake("han_surgery::householder_chain_backward", lib=_LIBRARY)
def _chain_backward_fake(grad, x, u, b, abs, normalize, need_input, need_params, saved_p, saved_sign):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_input else x.new_empty(0)
    du = torch.empty_like(u, memory_format=torch.contiguous_format) if need_params else u.new_empty(0)
    db = b.new_empty(u.shape[0], u.shape[2]) if need_params and b.numel() > 0 else b.new_empty(0)
    return [dx, du, db]


@torch.library.register_vmap("han_surgery::householder_chain_backward", lib=_LIBRARY)
def _chain_backward_vmap(info, in_dims, grad, x, u, b, abs, normalize, need_input, need_params, saved_p, saved_sign):
    """The backward operator under ``torch.func.vmap``: one call per element of the batch, stacked. Only a vmapped
    backward of a graph recorded outside the transform gets here (``torch.func.vmap`` over ``autograd.grad``): the
    layers never call the kernel inside ``torch.func`` transforms. The legacy vmap of
    ``autograd.grad(is_grads_batched=True)``, ``jacobian``/``hessian(vectorize=True)`` and ``gradcheck`` has its own
    kernel (``functional._chain_backward_batched``). Calls without a batched argument never see either."""
    tensors = (grad, x, u, b, saved_p, saved_sign)
    dims = (*in_dims[:4], *in_dims[8:10])
    outputs = []
    for i in range(info.batch_size):
        grad_i, x_i, u_i, b_i, p_i, sign_i = (
            t if d is None else t.select(d, i).contiguous() for t, d in zip(tensors, dims, strict=True)
        )
        outputs.append(
            torch.ops.han_surgery.householder_chain_backward(
                grad_i, x_i, u_i, b_i, abs, normalize, need_input, need_params, p_i, sign_i
            )
        )
    return [torch.stack(list(out)) for out in zip(*outputs, strict=True)], [0, 0, 0]


def define_fallback(name: str, fn: Callable[..., object], dispatch_key: str = "CompositeExplicitAutograd") -> None:
    """Register ``fn`` as operator ``name``'s kernel for ``dispatch_key``: by default ``CompositeExplicitAutograd``,
    what runs while the extension (whose CPU kernel takes precedence) is not loaded."""
    _LIBRARY.impl(name, fn, dispatch_key)


_lock = threading.Lock()
_state: dict[str, bool] = {}
_on_load: list[Callable[[], None]] = []


def on_load(callback: Callable[[], None]) -> None:
    """Run ``callback()`` once the kernel is loaded: now if it already is, else right after the build."""
    if _state.get("ready"):
        callback()
    else:
        _on_load.append(callback)


def extension_name(isa: str) -> str:
    """The name torch builds the extension under (its folder in torch's extension cache): one per CPU capability
    and per installed copy of han-surgery (a short hash of this source's path). Two copies, a checkout and a pip
    install, sharing one name rebuilt each other's kernel (a minute each) on every first use: each build command
    names its own source file."""
    digest = hashlib.sha1(str(SOURCE.resolve()).encode()).hexdigest()[:8]
    return f"han_surgery_cpu_{isa.lower()}_{digest}"


def _build() -> None:
    # torch's extension logger is quieted for the import and the build: on a CUDA build of torch without a GPU its
    # import warns "No CUDA runtime is found" (this kernel is CPU-only), and without a C++ compiler it prints a
    # banner about an incompatible compiler before the build fails; the one warning of available() says why.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load

        isa = torch.backends.cpu.get_cpu_capability()
        logger.info("han_surgery: compiling the CPU kernel for %s (first use only, about a minute)", isa)
        load(
            name=extension_name(isa),
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS.get(isa, [])],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            with_cuda=False,
            verbose=False,
        )
    finally:
        cpp_logger.setLevel(level)


#: What a build's output says when a tool or a file is missing or cannot be written (``/bin/sh: 1: c++: not found``).
_MISSING = ("not found", "no such file", "permission denied", "read-only file system", "no space left")


def _first_error_line(exc: Exception) -> str:
    """The line of a failed build worth showing: the compiler's first ``error:`` diagnostic if there is one, else
    the shell's line naming a missing tool or file (torch's message starts with the whole compiler command, which
    also contains "error" in its wording)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    diagnostics = [line for line in lines if "error:" in line.lower()]
    missing = [line for line in lines if any(m in line.lower() for m in _MISSING) and " -I" not in line]
    errors = [line for line in lines if "error" in line.lower()]
    return f"{type(exc).__name__}: {(diagnostics or missing or errors or lines or [''])[0][:300]}"


def available() -> bool:
    """Whether the CPU kernel is loaded, building it on the first call; ``False`` (after one warning) if it cannot be."""
    ready = _state.get("ready")
    if ready is not None:
        return ready
    with _lock:
        if "ready" in _state:
            return _state["ready"]
        if os.environ.get(ENV_VAR, "1") == "0":
            _state["ready"] = False
            return False
        try:
            _build()
            while _on_load:  # each once, even if the state is reset and the kernel loaded again
                _on_load.pop(0)()
            _state["ready"] = True
        except Exception as exc:  # no compiler, no ninja, a read-only cache, ...: fall back, once
            logger.warning(
                "han_surgery: could not build the CPU kernel (%s); Householder layers use their PyTorch "
                "implementation (set %s=0 to skip the build)",
                _first_error_line(exc),
                ENV_VAR,
            )
            _state["ready"] = False
        return _state["ready"]
