"""The compiled kernels against the PyTorch implementation, and how they are chosen and built.

* CPU kernel (``han_surgery/kernels/householder_cpu.cpp``): forward and every gradient equal the
  PyTorch path over dtypes, reflections, chain lengths, bias, and both layouts (vectors along the
  last dimension, or along a middle one, as in ``dim=-2`` token mixing).
* Fallback: a failed build logs one warning and the layers keep working; the environment
  variable switches the kernel off; importing ``han_surgery`` builds nothing.
* Triton kernels: numerics on the CPU through ``TRITON_INTERPRET=1`` (a subprocess), and on a
  GPU when there is one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _kernel_paths import kernel_path  # noqa: F401  (fixture)
from torch.utils.flop_counter import FlopCounterMode

from han_surgery import HanBlock, HanLayer, kernels
from han_surgery.functional import householder_chain, unit_rows
from han_surgery.kernels import cpu, flops
from han_surgery.layers import HanStack

ROOT = Path(__file__).resolve().parents[1]

needs_cpu_kernel = pytest.mark.skipif(os.environ.get(cpu.ENV_VAR) == "0", reason=f"{cpu.ENV_VAR}=0")


def chain_outputs(x, u, b, apply_abs, dim, grad):
    """Forward and the gradients w.r.t. x, u and b of one householder_chain call."""
    x, u = x.detach().requires_grad_(), u.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = householder_chain(x, unit_rows(u), b, apply_abs, dim=dim)
    y.backward(grad)
    return [y.detach(), x.grad, u.grad] + ([b.grad] if b is not None else [])


def layer_outputs(layer, x, grad, use_kernel, view=lambda t: t):
    """Output and the gradients w.r.t. x and the parameters of ``layer(view(x))``, on the kernel or the PyTorch path."""
    with contextlib.nullcontext() if use_kernel else kernels.disabled():
        leaf = x.detach().clone().requires_grad_()
        layer.zero_grad()
        y = layer(view(leaf))
        y.backward(grad)
    return [y.detach(), leaf.grad] + [p.grad for p in layer.parameters()]


CASES = [
    # shape, dim, k, apply_abs, bias
    ((37, 24), -1, 1, (True,), True),
    ((5, 6, 24), -1, 3, (True, False), True),
    ((4, 64, 33), -1, 2, (False, True, True), False),
    ((3, 13, 40), 1, 1, (True, True), True),  # token mixing layout: vectors along the middle
    ((2, 9, 300), -2, 4, (True,), True),  # wider than one column tile
    ((2, 3, 7, 5), 1, 2, (True, False), False),
    ((600, 16), -1, 1, (True, True), True),  # many rows: several tasks and gradient blocks
    ((203, 48), -1, 5, (True, False), True),  # k > 1 over row groups, with a partial last group
    ((19, 100), -1, 16, (True,), True),  # many reflections, a vector tail
    # k >= 16: projections from U transposed; the directions end in a partial vector (float: 20 of 32, double: 20 of 24)
    ((45, 64), -1, 20, (True, False), True),
    ((203, 48), -1, 17, (True,), True),  # one layer (saved projections), a partial last group and directions vector
    # k = 1 in row groups: short rows (forward and backward), deep chains (forward); rows end in a partial vector
    ((50, 30), -1, 1, (True, True, True), True),
    ((37, 200), -1, 1, (True, True, True, False), True),
    # one layer, k > 1, on rows: the forward saves U x and sign(z) for the backward
    ((203, 48), -1, 3, (True,), False),
    ((70, 40), -1, 4, (False,), True),  # no abs: projections only
]


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,dim,k,apply_abs,bias", CASES)
def test_cpu_kernel_matches_the_pytorch_path(shape, dim, k, apply_abs, bias, dtype):
    assert cpu.available()
    torch.manual_seed(0)
    n = shape[dim]
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    grad = torch.randn(shape, dtype=torch.float64).to(dtype)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.randn(len(apply_abs), k, n, dtype=param_dtype)
    b = torch.randn(len(apply_abs), n, dtype=param_dtype) if bias else None
    got = chain_outputs(x, u, b, apply_abs, dim, grad)
    with kernels.disabled():
        want = chain_outputs(x, u, b, apply_abs, dim, grad)
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = w.double().abs().max().clamp_min(1.0)
        assert (g.double() - w.double()).abs().max() <= tol * scale * (10 if dtype in (torch.float16,) else 1)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_single_layer_saves_projections_and_signs_and_abs_has_zero_gradient_at_zero(dtype):
    """HanLayer(k > 1): the forward keeps U x and sign(z) (int8) for the backward, which then must
    give |.| the PyTorch path's zero gradient where z is exactly 0 (zero rows, zero bias)."""
    assert cpu.available()
    torch.manual_seed(0)
    layer = HanLayer(32, reflections=4).to(dtype)
    torch.nn.init.zeros_(layer.bias)
    x = torch.randn(50, 32, dtype=dtype)
    x[::7] = 0  # z = 0 there
    grad = torch.randn(50, 32, dtype=dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x.clone().requires_grad_())
    signs = [t for t in saved if t.dtype == torch.int8]
    assert len(signs) == 1 and signs[0].shape == (50, 32) and (signs[0][::7] == 0).all()
    assert any(t.shape == (50, 4) for t in saved)
    results = [layer_outputs(layer, x, grad, use_kernel) for use_kernel in (True, False)]
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    for got, want in zip(*results, strict=True):
        scale = want.double().abs().max().clamp_min(1.0)
        assert (got.double() - want.double()).abs().max() <= tol * scale
    assert (results[0][1][::7] == 0).all() and (results[1][1][::7] == 0).all()  # sign(0) = 0 stops the gradient


@needs_cpu_kernel
@pytest.mark.parametrize("k", [1, 4])
def test_output_can_be_modified_in_place(k):
    """Models add to an FFN's output in place (``hidden += mlp(x)``): the kernel path allows it, as nn.Linear does."""
    assert cpu.available()
    layer = HanLayer(16, reflections=k)
    x = torch.randn(5, 16, requires_grad=True)
    y = layer(x)
    y += 1.0
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@needs_cpu_kernel
@pytest.mark.parametrize("k", [1, 4])
def test_non_contiguous_input_matches_the_pytorch_path(k):
    """A transposed (non-contiguous) input: the kernel's Function copies it to rows and gives dL/dx in its shape."""
    assert cpu.available()
    torch.manual_seed(0)
    layer = HanLayer(24, reflections=k).double()
    base = torch.randn(24, 30, dtype=torch.float64)
    grad = torch.randn(30, 24, dtype=torch.float64)
    results = [layer_outputs(layer, base, grad, use_kernel, view=torch.t) for use_kernel in (True, False)]
    for got, want in zip(*results, strict=True):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12)


@pytest.mark.usefixtures("kernel_path")
def test_token_mixing_dim_equals_transposing():
    torch.manual_seed(1)
    block = HanBlock(7, dim=-2, final_abs=True)
    x = torch.randn(3, 7, 10, requires_grad=True)
    ref = HanBlock(7, final_abs=True)
    ref.load_state_dict(block.state_dict())
    out = block(x)
    torch.testing.assert_close(out, ref(x.transpose(1, 2)).transpose(1, 2))
    out.sum().backward()
    assert x.grad is not None and "dim=-2" in repr(block.fc1)


@pytest.mark.usefixtures("kernel_path")
def test_fused_han_block_equals_its_layers_with_gradients():
    torch.manual_seed(2)
    block = HanBlock(20, reflections=2, drop=0.0)
    x = torch.randn(9, 20, requires_grad=True)
    assert block._fusable()
    fused = block(x)
    fused.square().sum().backward()
    fused_grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    x.grad = None
    layered = block.fc2(block.fc1(x))
    layered.square().sum().backward()
    torch.testing.assert_close(fused, layered)
    for g, w in zip(fused_grads, [x.grad] + [p.grad for p in block.parameters()], strict=True):
        torch.testing.assert_close(g, w)
    assert not HanBlock(20, drop=0.1).train()._fusable()  # active dropout runs layer by layer
    assert HanBlock(20, drop=0.1).eval()._fusable()


def flop_counts(module, x, use_kernel, backward):
    """FlopCounterMode's totals ``(forward, backward)`` for ``module(x)``, on the kernel or the PyTorch path."""
    with contextlib.nullcontext() if use_kernel else kernels.disabled():
        with FlopCounterMode(display=False) as forward:
            y = module(x)
        if not backward:
            return forward.get_total_flops(), None
        with FlopCounterMode(display=False) as backward_counter:
            y.backward(torch.ones_like(y))
    return forward.get_total_flops(), backward_counter.get_total_flops()


FLOP_CASES = [
    # module, input shape, (rows, n, k, layers, bias) of each of its chains
    (lambda: HanLayer(12), (5, 12), [(5, 12, 1, 1, True)]),
    (lambda: HanLayer(12, reflections=3), (2, 3, 12), [(6, 12, 3, 1, True)]),  # one layer, k > 1: forward_saving
    (lambda: HanBlock(12, reflections=2, bias=False), (5, 12), [(5, 12, 2, 2, False)]),
    (lambda: HanBlock(7, dim=-2, final_abs=True), (3, 7, 4), [(12, 7, 1, 2, True)]),  # vectors along the middle
    (lambda: HanStack(10, depth=3, reflections=2), (4, 10), [(4, 10, 2, 3, True)]),
]


@needs_cpu_kernel
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("make,shape,chains", FLOP_CASES)
def test_flop_counter_counts_the_kernel_as_the_pytorch_path(make, shape, chains, x_grad):
    """FlopCounterMode sees the CPU kernel's operators (registered FLOP formulas) and counts what it counts for the
    PyTorch path, forward and backward: 2 FLOPs per MAC of han_surgery.kernels.flops' formulas, not zero."""
    assert cpu.available()
    torch.manual_seed(5)
    module = make()
    x = torch.randn(shape, requires_grad=x_grad)
    want_forward = sum(2 * flops.forward_macs(rows, n, k, layers) for rows, n, k, layers, _ in chains)
    want_backward = sum(
        2 * flops.backward_macs(rows, n, k, layers, bias=bias, need_input=x_grad) for rows, n, k, layers, bias in chains
    )
    kernel, torch_path = (flop_counts(module, x, use_kernel, backward=True) for use_kernel in (True, False))
    assert kernel == torch_path == (want_forward, want_backward)
    assert want_forward > 0 and want_backward > 0
    with torch.no_grad():  # inference: the kernel's forward without autograd
        assert flop_counts(module, x, True, backward=False) == flop_counts(module, x, False, backward=False)


FAKE_CASES = [
    (lambda: HanLayer(8), 1),
    (lambda: HanLayer(8, reflections=3), 1),  # one layer, k > 1: householder_layer_forward_saving
    (lambda: HanBlock(8), 1),
    (lambda: HanBlock(8, dim=-2), 3),  # vectors along the middle: the column layout
]


@pytest.mark.usefixtures("kernel_path")
@pytest.mark.parametrize("make,columns", FAKE_CASES)
def test_fake_tensor_mode_runs_forward_and_backward_and_counts_flops(make, columns):
    """Under ``FakeTensorMode`` (shape, memory or FLOP estimation without compute) the CPU kernel's operators had no
    fake kernels: forward or backward raised ``UnsupportedOperatorException``. Now both paths run, give the real
    shapes and count the FLOPs of a real run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(6)
    module = make()
    shape = (4, 8) if columns == 1 else (2, 8, columns)

    def run():
        with FlopCounterMode(display=False) as counter:
            x = torch.randn(shape, requires_grad=True)
            y = module(x)
            y.sum().backward()
        return y.shape, x.grad.shape, [p.grad.shape for p in module.parameters()], counter.get_total_flops()

    real = run()
    module.zero_grad(set_to_none=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = run()
    assert fake == real and real[-1] > 0


def test_flop_formulas():
    """One Han-layer (k = 1) of width n: x.u and the update, 2n + 1 MACs per row (T = [[2]] is a 1 x 1 product)."""
    assert flops.forward_macs(rows=64, features=512) == 64 * (2 * 512 + 1)
    # k = 4, two layers: per row and layer 2kn + k^2, per layer the Gram matrix U U^T (k^2 n)
    assert flops.forward_macs(rows=3, features=8, reflections=4, layers=2) == 2 * (3 * (64 + 16) + 128)
    assert flops.backward_macs(rows=3, features=8, need_params=False) == 3 * (1 + 8 + 1 + 8)
    assert flops.backward_macs(rows=3, features=8, bias=False, need_input=False) == 3 * (1 + 8 + 1 + 8 + 8)


@needs_cpu_kernel
def test_flop_formulas_are_registered_before_the_kernel_is_built():
    """FlopCounterMode copies the formulas when it is created: one created before the first Householder layer runs
    (which builds or loads the kernel) counts the kernel too."""
    code = textwrap.dedent(
        """
        import torch
        from torch.utils.flop_counter import FlopCounterMode
        from han_surgery import HanLayer
        from han_surgery.kernels import cpu

        assert cpu._state == {}
        with FlopCounterMode(display=False) as counter:
            HanLayer(8)(torch.randn(3, 8))
        print(cpu.available(), counter.get_total_flops())
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", str(2 * flops.forward_macs(rows=3, features=8))]


@needs_cpu_kernel
def test_cpu_kernel_is_reproducible_and_thread_count_only_reorders_sums():
    assert cpu.available()
    torch.manual_seed(3)
    layer = HanLayer(96, reflections=2)
    x = torch.randn(2048, 96, requires_grad=True)
    results = {}
    for threads in (1, 2, 2):
        torch.set_num_threads(threads)
        layer.zero_grad()
        x.grad = None
        out = layer(x)
        out.backward(torch.ones_like(out))
        results.setdefault(threads, []).append([out, x.grad.clone(), layer.u.grad.clone(), layer.bias.grad.clone()])
    torch.set_num_threads(1)
    for a, b in zip(*results[2], strict=True):
        assert torch.equal(a, b)  # same thread count: bitwise identical
    one, two = results[1][0], results[2][0]
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])  # rows are independent
    for a, b in zip(one[2:], two[2:], strict=True):  # sums over rows: only their order differs
        torch.testing.assert_close(a, b, atol=1e-3 * b.abs().max().item(), rtol=1e-4)


@pytest.fixture
def fresh_kernel_state(monkeypatch):
    """Forget whether the CPU kernel was built (restored afterwards; the loaded ops stay loaded)."""
    monkeypatch.setattr(cpu, "_state", {})


def test_build_failure_falls_back_with_one_warning(fresh_kernel_state, monkeypatch, caplog):
    def broken_build():
        raise RuntimeError("Error building extension 'han_surgery_cpu': error: no compiler")

    monkeypatch.setattr(cpu, "_build", broken_build)
    layer = HanLayer(8)
    x = torch.randn(4, 8, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="han_surgery.kernels.cpu"):
        out = layer(x)
        out.sum().backward()
        layer(x)
    warnings = [r for r in caplog.records if r.name == "han_surgery.kernels.cpu"]
    assert len(warnings) == 1 and "could not build the CPU kernel" in warnings[0].getMessage()
    assert "error: no compiler" in warnings[0].getMessage()
    with kernels.disabled():
        torch.testing.assert_close(out, layer(x))


def test_build_failure_names_the_compiler_diagnostic():
    """torch's build error starts with the whole compiler command; the warning shows the ``error:`` line."""
    exc = RuntimeError(
        "Error building extension 'han_surgery_cpu_avx512': [1/2] c++ -MMD -O3 -c householder_cpu.cpp -o h.o\n"
        "FAILED: householder_cpu.o\n"
        "householder_cpu.cpp:1732:42: error: no match for 'operator*'\n"
        "ninja: build stopped: subcommand failed."
    )
    assert cpu._first_error_line(exc) == "RuntimeError: householder_cpu.cpp:1732:42: error: no match for 'operator*'"
    assert cpu._first_error_line(RuntimeError("no compiler found")) == "RuntimeError: no compiler found"
    no_compiler = RuntimeError(  # what torch raises on a machine without c++ (the command line came first)
        "Error building extension 'han_surgery_cpu_avx512': [1/2] c++ -MMD -MF householder_cpu.o.d "
        "-DTORCH_EXTENSION_NAME=han_surgery_cpu_avx512 -isystem /venv/torch/include -O3 -c householder_cpu.cpp\n"
        "FAILED: householder_cpu.o\n"
        "c++ -MMD -MF householder_cpu.o.d -I/venv/include -c householder_cpu.cpp -o householder_cpu.o\n"
        "/bin/sh: 1: c++: not found\n"
        "ninja: build stopped: subcommand failed."
    )
    assert cpu._first_error_line(no_compiler) == "RuntimeError: /bin/sh: 1: c++: not found"


def test_disabled_applies_to_its_own_thread_and_overlapping_blocks_restore_the_kernels():
    """A module-wide flag saved and restored left the kernels off for good when two threads' blocks overlapped
    without nesting (A enters, B enters, A leaves, B leaves), and switched them off for every thread meanwhile."""
    import threading

    steps = [threading.Event() for _ in range(4)]
    seen = {}

    def thread_a():
        with kernels.disabled():
            steps[0].set()
            steps[1].wait(5)
        steps[2].set()

    def thread_b():
        steps[0].wait(5)
        with kernels.disabled():
            steps[1].set()
            steps[2].wait(5)
        seen["b after"] = kernels.enabled()
        steps[3].set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    steps[1].wait(5)
    seen["main while both inside"] = kernels.enabled()
    for t in threads:
        t.join(5)
    assert seen == {"main while both inside": True, "b after": True} and kernels.enabled()
    with kernels.disabled(), kernels.disabled():
        assert not kernels.enabled()
    assert kernels.enabled()


def test_disabled_blocks_held_by_generators_may_close_out_of_order():
    """Two generators in one thread, each inside a disabled() block, closed in the order they opened: the context
    variable was reset to its value at entry, so the kernels came back while the second block was open and stayed
    off for good once it closed."""

    def stream():
        with kernels.disabled():
            yield
            yield

    a, b = stream(), stream()
    next(a)
    next(b)
    list(a)
    assert not kernels.enabled()  # b's block is still open
    list(b)
    assert kernels.enabled()


def test_environment_variable_switches_the_kernel_off(fresh_kernel_state, monkeypatch):
    def must_not_build():
        raise AssertionError("the kernel was built although it is switched off")

    monkeypatch.setenv(cpu.ENV_VAR, "0")
    monkeypatch.setattr(cpu, "_build", must_not_build)
    assert not cpu.available()
    assert HanLayer(4)(torch.randn(2, 4)).shape == (2, 4)


def test_importing_han_surgery_builds_nothing():
    code = "import han_surgery; from han_surgery.kernels import cpu; print(cpu._state)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "{}"


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # jit is deprecated
def test_a_traced_model_holds_standard_ops_and_loads_without_han_surgery(tmp_path):
    """A ``torch.jit.trace`` recorded the CPU operator, whose schema only han_surgery's Python defines: the saved
    file failed with "Unknown builtin op: han_surgery::householder_chain_forward" in torch alone or libtorch. Tracing
    now takes the PyTorch path, as compile and export do."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(8, 16), HanBlock(16, reflections=2), nn.Linear(16, 3)).eval()
    x = torch.randn(4, 8)
    traced = torch.jit.trace(model, x)  # gradients on (the default): traced with its checks, and saved
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
        assert "han_surgery::" not in str(torch.jit.trace(model, x).inlined_graph)  # no operator of ours
    assert "han_surgery::" not in str(traced.inlined_graph)
    traced.save(str(tmp_path / "traced.pt"))
    code = textwrap.dedent(
        f"""
        import sys, warnings; warnings.simplefilter("ignore")
        import torch
        io = torch.load({str(tmp_path / "io.pt")!r})
        loaded = torch.jit.load({str(tmp_path / "traced.pt")!r})
        with torch.no_grad():
            y = loaded(io["x"])
        torch.testing.assert_close(y, io["y"], atol=1e-6, rtol=1e-6)
        loaded(io["x"]).sum().backward()  # the trace's graph differentiates too
        assert all(p.grad is not None for p in loaded.parameters())
        assert "han_surgery" not in sys.modules
        print("OK")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr[-2000:]


@pytest.mark.parametrize("module", [HanLayer(8), HanBlock(8), HanStack(8, 3)], ids=["layer", "block", "stack"])
def test_parameters_on_another_device_than_the_input_name_the_mismatch(module):
    """Meta parameters (a model built under torch.device("meta"), not loaded yet) with a CPU input reached the
    operator's Python fallback, which called the operator again: a RecursionError. PyTorch's error now."""
    with pytest.raises(RuntimeError, match="device meta"):
        module.to("meta")(torch.randn(2, 8))


TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from han_surgery.functional import unit_rows, wy_factor
    from han_surgery.kernels import triton_gpu

    torch.manual_seed(0)
    for rows, n, k, apply_abs, bias, dtype in [
        (37, 20, 1, True, True, torch.float64),
        (70, 150, 3, False, True, torch.float64),
        (5, 9, 2, True, False, torch.float64),
        (33, 40, 4, True, True, torch.float16),
    ]:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        u = unit_rows(torch.randn(k, n, dtype=acc)).requires_grad_()
        t = wy_factor(u.detach()).requires_grad_()
        b = torch.randn(n, dtype=acc, requires_grad=True) if bias else None
        x = torch.randn(rows, n, dtype=dtype, requires_grad=True)
        params = [u, t] + ([b] if bias else [])
        y = triton_gpu.householder_rows(x, u, t, b, apply_abs)
        xr = x.detach().to(acc).requires_grad_()
        z = xr - ((xr @ u.T) @ t) @ u + (b if bias else 0)
        ref = z.abs() if apply_abs else z
        tol = 1e-9 if dtype == torch.float64 else 2e-2
        torch.testing.assert_close(y.to(acc), ref.to(dtype).to(acc), atol=tol, rtol=tol)
        grad = torch.randn(rows, n, dtype=dtype)
        got = torch.autograd.grad(y, [x] + params, grad, retain_graph=True)
        want = torch.autograd.grad(ref, [xr] + params, grad.to(acc), retain_graph=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.to(acc), w, atol=tol * 5, rtol=tol * 5)
        # create_graph=True and batched gradients (is_grads_batched) take the definition; u's gradient
        # counted the path through V = T U twice there
        got = torch.autograd.grad(y, [x] + params, grad, retain_graph=True, create_graph=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.to(acc), w, atol=tol * 5, rtol=tol * 5)
        grads = torch.randn(2, rows, n, dtype=dtype)
        got = torch.autograd.grad(y, [x] + params, grads, retain_graph=True, is_grads_batched=True)
        for i in range(2):
            want = torch.autograd.grad(ref, [xr] + params, grads[i].to(acc), retain_graph=True)
            for g, w in zip(got, want):
                torch.testing.assert_close(g[i].to(acc), w, atol=tol * 5, rtol=tol * 5)
    print("triton ok")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_numerics_in_the_interpreter():
    """The CUDA kernels, run by Triton's interpreter on CPU tensors (small shapes: it is slow)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0 and "triton ok" in out.stdout, out.stderr[-3000:]


def test_a_cuda_input_with_parameters_elsewhere_does_not_take_the_triton_kernel(monkeypatch):
    """The Triton dispatch checked the input's device only: a CUDA input with the layer's parameters still on the
    CPU went to a kernel that reads them through a pointer of the wrong device, where the PyTorch path names the
    mismatch (as the CPU kernel's dispatch already did). Checked on stand-ins: CI has no GPU."""
    from types import SimpleNamespace

    from han_surgery import functional

    asked = []
    monkeypatch.setattr(
        kernels, "triton_kernels", lambda: asked.append(1) or SimpleNamespace(supports=lambda x, k: True)
    )
    monkeypatch.setattr(functional, "_kernels_allowed", lambda: True)
    on = lambda device: SimpleNamespace(device=torch.device(device), numel=lambda: 8)  # noqa: E731
    assert functional._use_triton(on("cuda:0"), 1, on("cuda:0"), None)
    assert not functional._use_triton(on("cuda:0"), 1, on("cpu"), None)
    assert not functional._use_triton(on("cuda:0"), 1, on("cuda:0"), on("cuda:1"))
    assert asked == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layers_match_the_pytorch_path(dtype):
    torch.manual_seed(4)
    block = HanBlock(96, reflections=3, final_abs=True).cuda()
    x = torch.randn(256, 96, device="cuda", dtype=dtype, requires_grad=True)
    got = [block(x)]
    got[0].float().square().sum().backward()
    got += [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    x.grad = None
    with kernels.disabled():
        want = [block(x)]
        want[0].float().square().sum().backward()
    want += [x.grad] + [p.grad for p in block.parameters()]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=tol * w.abs().max().item(), rtol=tol)


@needs_cpu_kernel
def test_more_than_64_reflections_take_the_pytorch_path(monkeypatch):
    """Beyond 64 reflections per layer the kernel's scalar compact-WY set-up and k-term row updates lose to the
    PyTorch path's matrix products (10x at k = n = 768), so the dispatch takes the latter; results agree."""
    from han_surgery import functional
    from han_surgery.layers import HouseholderLinear

    calls = []
    chain_cpu = functional._chain_cpu
    monkeypatch.setattr(functional, "_chain_cpu", lambda x, u, *a: calls.append(u.shape[1]) or chain_cpu(x, u, *a))
    x = torch.randn(6, 80, dtype=torch.float64)
    for k in (64, 65):
        layer = HouseholderLinear(80, reflections=k).double()
        y = layer(x)
        with kernels.disabled():
            torch.testing.assert_close(y, layer(x))
    assert calls == [64]


def test_each_installed_copy_builds_its_kernel_under_its_own_name(monkeypatch, tmp_path) -> None:
    """A checkout and an installed copy shared one extension folder, and each one's build (its command names its own
    source path) invalidated the other's: a two-process accelerate run recompiled the kernel ten times."""
    from han_surgery.kernels import cpu

    here = cpu.extension_name("AVX512")
    assert here.startswith("han_surgery_cpu_avx512_") and cpu.extension_name("AVX512") == here
    monkeypatch.setattr(cpu, "SOURCE", tmp_path / "householder_cpu.cpp")
    assert cpu.extension_name("AVX512") != here
