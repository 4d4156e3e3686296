"""The math of the Householder layers: orthogonality, gradient stability, Lipschitz bound, exactness.

Every test runs twice: on the compiled CPU kernel and on the PyTorch implementation (``kernel_path``).
"""

from __future__ import annotations

import math

import pytest
import torch
from _kernel_paths import kernel_path  # noqa: F401  (fixture)
from torch import nn

from han_surgery import Abs, HanBlock, HanLayer, HanStack, HouseholderLinear, stack_han_layers
from han_surgery.functional import householder_affine, unit_rows, wy_factor
from han_surgery.layers import LowRankLinear

pytestmark = pytest.mark.usefixtures("kernel_path")  # every test, on both implementations

REFLECTIONS = [1, 2, 8]


def explicit_product(layer: HouseholderLinear) -> torch.Tensor:
    """H_k ... H_1 built reflection by reflection, straight from the definition."""
    n = layer.features
    out = torch.eye(n, dtype=torch.float64)
    for u in layer.u.detach().double():
        h = torch.eye(n, dtype=torch.float64) - 2 * torch.outer(u, u) / u.dot(u)
        out = h @ out
    return out


@pytest.mark.parametrize("k", REFLECTIONS)
@pytest.mark.parametrize("cls", [HouseholderLinear, HanLayer])
def test_jacobian_is_orthogonal(cls, k):
    torch.manual_seed(k)
    n = 16
    layer = cls(n, reflections=k).double()
    x = torch.randn(n, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(layer, x)
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(jac @ jac.T, eye, atol=1e-13, rtol=0)
    assert torch.allclose(jac.T @ jac, eye, atol=1e-13, rtol=0)


@pytest.mark.parametrize("k", REFLECTIONS)
def test_to_dense_matches_forward_and_definition(k):
    torch.manual_seed(0)
    layer = HouseholderLinear(12, reflections=k).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    dense = layer.to_dense()
    assert dense.shape == (12, 12)
    torch.testing.assert_close(layer(x), x @ dense.T + layer.bias, atol=1e-13, rtol=0)
    torch.testing.assert_close(dense, explicit_product(layer), atol=1e-13, rtol=0)
    # nn.Linear with that weight is the same map
    linear = nn.Linear(12, 12).double()
    with torch.no_grad():
        linear.weight.copy_(dense)
        linear.bias.copy_(layer.bias)
    torch.testing.assert_close(linear(x), layer(x), atol=1e-13, rtol=0)
    for dtype in (torch.bfloat16, torch.float16):  # it was float32 for a half-precision layer
        half = HouseholderLinear(12, reflections=k).to(dtype)
        assert half.to_dense().dtype == dtype
        single = HouseholderLinear(12, reflections=k)
        single.load_state_dict(half.state_dict())  # the same (rounded) u, in float32
        torch.testing.assert_close(half.to_dense(), single.to_dense().to(dtype), atol=0, rtol=0)


def test_gradient_norm_is_preserved_through_200_han_layers_but_not_relu():
    torch.manual_seed(0)
    n, depth = 32, 200
    han = nn.Sequential(*[HanLayer(n) for _ in range(depth)]).double()
    relu = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(n, n), nn.ReLU())]).double()
    ratios = {}
    for name, net in (("han", han), ("relu", relu)):
        x = torch.randn(8, n, dtype=torch.float64, requires_grad=True)
        out = net(x)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        # per sample: each row's Jacobian is orthogonal, so each row's norm is preserved
        ratios[name] = x.grad.norm(dim=1) / grad_out.norm(dim=1)
    torch.testing.assert_close(ratios["han"], torch.ones(8, dtype=torch.float64), atol=1e-10, rtol=0)
    relu_ratio = ratios["relu"].max().item()
    assert relu_ratio < 1e-3 or relu_ratio > 1e3, f"ReLU MLP gradient neither vanished nor exploded: {relu_ratio}"


@pytest.mark.parametrize(
    "make",
    [
        lambda n: HanLayer(n),
        lambda n: HanLayer(n, reflections=4),
        lambda n: HanBlock(n),
        lambda n: HanBlock(n, final_abs=True, reflections=3),
        lambda n: nn.Sequential(*[HanLayer(n) for _ in range(10)]),
    ],
    ids=["han", "han-k4", "block", "mixer-block", "stack10"],
)
def test_one_lipschitz_on_random_pairs(make):
    torch.manual_seed(1)
    net = make(24).double()
    x, y = (
        torch.randn(2, 2000, 24, dtype=torch.float64)
        * torch.tensor([0.01, 1.0, 100.0]).repeat_interleave(667)[:2000, None].double()
    )
    dist_in = (x - y).norm(dim=1)
    dist_out = (net(x) - net(y)).norm(dim=1)
    assert (dist_out <= dist_in * (1 + 1e-12)).all()


def test_householder_linear_is_an_isometry():
    torch.manual_seed(2)
    layer = HouseholderLinear(24, reflections=5).double()
    x, y = torch.randn(2, 500, 24, dtype=torch.float64)
    torch.testing.assert_close((layer(x) - layer(y)).norm(dim=1), (x - y).norm(dim=1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("apply_abs", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(k, apply_abs, bias):
    torch.manual_seed(3)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(k, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True) if bias else None

    def f(x, u, *b):
        return householder_affine(x, unit_rows(u), b[0] if b else None, apply_abs=apply_abs)

    assert torch.autograd.gradcheck(f, (x, u) + ((b,) if bias else ()), check_batched_grad=True)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30])
def test_zero_tiny_and_huge_u_stay_finite(k, scale):
    layer = HanLayer(8, reflections=k)
    with torch.no_grad():
        layer.u.mul_(scale)
    x = torch.randn(3, 8, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.u.grad).all() and torch.isfinite(layer.bias.grad).all()
    if scale == 0.0:  # a zero direction is the identity reflection
        torch.testing.assert_close(out, (x + layer.bias).abs())
    else:  # the reflection does not depend on the scale of u
        ref = HanLayer(8, reflections=k)
        with torch.no_grad():
            ref.u.copy_(layer.u / scale)
            ref.bias.copy_(layer.bias)
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_close_to_fp32(dtype):
    torch.manual_seed(4)
    layer = HanBlock(256, reflections=2)
    x = torch.randn(64, 256)
    ref = layer(x)
    low = layer.to(dtype)(x.to(dtype))
    assert low.dtype == dtype
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layers_build_under_a_half_precision_default_dtype(dtype):
    # transformers' from_config(..., dtype=torch.bfloat16) builds every module under that default
    # dtype, and torch's QR (behind orthogonal_) has no half-precision kernel on CPU
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(7)
        block = HanBlock(64, reflections=3, gain=True, side_rank=4)
    finally:
        torch.set_default_dtype(previous)
    u = block.fc1.u
    assert u.dtype == dtype and all(p.dtype == dtype for p in block.parameters())
    torch.testing.assert_close(u.float() @ u.float().T, torch.eye(3), atol=2e-2, rtol=0)  # orthonormal, rounded
    assert torch.isfinite(block(torch.randn(2, 64, dtype=dtype))).all()


def test_low_precision_input_with_fp32_parameters_backward():
    layer = HanLayer(64)
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.u.grad.dtype == torch.float32


def test_any_leading_shape_and_non_contiguous_input():
    torch.manual_seed(5)
    layer = HanLayer(10, reflections=2)
    x = torch.randn(2, 3, 4, 10)
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(-1, 10), layer(x.reshape(-1, 10)))
    xt = torch.randn(10, 6).T  # (6, 10), non-contiguous
    torch.testing.assert_close(layer(xt), layer(xt.contiguous()))
    assert layer(torch.randn(10)).shape == (10,)


@pytest.mark.parametrize("shape, dim", [((2, 5, 0), 1), ((0, 5), -1), ((2, 5, 0, 3), 1), ((2, 0, 5), -1)])
def test_empty_inputs_on_every_path(shape, dim):
    """An input with a zero-size dimension after ``dim`` killed the process (SIGFPE) in the CPU kernel."""
    layer = HanBlock(5, dim=dim)
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and layer.fc1.u.grad.abs().sum() == 0


def test_float64_stays_float64_under_autocast_and_meta_tensors_run():
    """Autocast never casts float64 (``nn.Linear``'s output stays float64); the layer cast it to bfloat16. A forward
    on the ``meta`` device (shape inference) failed asking autocast about that device."""
    layer = HanLayer(8).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float64 and torch.equal(out, layer(x))
    meta = HanBlock(8, reflections=2, device="meta")
    assert meta(torch.empty(3, 8, device="meta")).shape == (3, 8)


def test_float64_input_with_float32_parameters_under_autocast_is_exact():
    """A float64 input is not cast, so autocast stayed on around the k x k algebra of the float32 directions: on
    the PyTorch path ``U U^T`` ran in bfloat16 and the output was off by about 1e-2 (k > 1)."""
    torch.manual_seed(0)
    layer = HanLayer(16, reflections=4)
    x = torch.randn(8, 16, dtype=torch.float64)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)


def test_a_dim_outside_the_input_is_an_error_and_the_output_is_contiguous():
    """``dim=2`` on a 2-D input was wrapped to ``dim=0`` (the wrong axis, silently); with ``dim`` not last the
    PyTorch path returned a non-contiguous view where the kernel's output is contiguous (``.view`` failed on one)."""
    with pytest.raises(IndexError, match="out of range"):
        HanLayer(4, dim=2)(torch.randn(4, 4))
    with pytest.raises(IndexError, match="out of range"):
        HanBlock(4, dim=-3)(torch.randn(5, 4))
    out = HanBlock(8, dim=-2)(torch.randn(2, 8, 16))
    assert out.is_contiguous() and out.view(2, -1).shape == (2, 128)


def test_forward_mode_ad_with_dual_tensors():
    """``torch.autograd.forward_ad`` raised on both paths (custom autograd Functions without a jvp); inside a dual
    level the layers run their plain definition, as inside ``torch.func`` transforms."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    block = HanBlock(6, reflections=2).double()
    x, tangent = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    _, expected = torch.func.jvp(block, (x,), (tangent,))
    with fwAD.dual_level():
        out = fwAD.unpack_dual(block(fwAD.make_dual(x, tangent)))
    torch.testing.assert_close(out.primal, block(x))
    torch.testing.assert_close(out.tangent, expected)


def test_a_han_block_whose_layers_accelerate_hooks_runs_them(tmp_path):
    """accelerate's offloading (``device_map`` with ``"disk"``, or ``"cpu"`` beside a GPU) patches each module's
    ``forward`` (no torch hook): the block's fused path read ``fc1.u`` / ``fc2.u`` itself, so their weights stayed
    on ``meta`` and the forward failed. Disk-offload a block's layers and compare."""
    from accelerate import disk_offload

    torch.manual_seed(0)
    block = HanBlock(8).eval()
    x = torch.randn(3, 8)
    expected = block(x)
    disk_offload(block, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    assert block.fc1.u.device.type == "meta"
    torch.testing.assert_close(block(x), expected)


def test_hooks_on_a_han_blocks_layers_fire_and_an_identity_dropout_trains():
    """The fused chain calls neither layer: it checked their forward hooks only, so a backward hook on ``fc1`` or a
    backward pre-hook on ``fc2`` never fired (nor hooks on the dropouts); and a ``drop1`` swapped for
    ``nn.Identity`` (a way to remove dropout) failed in training on ``Identity.p``."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, requires_grad=True)
    for layer, register in (
        ("fc1", "register_full_backward_hook"),
        ("fc2", "register_full_backward_pre_hook"),
        ("drop2", "register_forward_hook"),
    ):
        block, calls = HanBlock(8).eval(), []
        getattr(getattr(block, layer), register)(lambda *args, layer=layer: calls.append(layer))
        block(x).sum().backward()
        assert calls == [layer], (layer, calls)
    block = HanBlock(8).train()
    block.drop1 = torch.nn.Identity()
    expected = block.fc2(block.fc1(x))
    torch.testing.assert_close(block(x), expected)  # drop=0 (the default): fused, as the two layers compute


def test_inference_path_equals_autograd_path():
    torch.manual_seed(6)
    layer = HanLayer(32, reflections=3)
    x = torch.randn(16, 32)
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, layer(x.requires_grad_()), atol=0, rtol=0)


@pytest.mark.parametrize("n,k", [(8, 1), (768, 1), (64, 8)])
def test_parameter_counts(n, k):
    assert sum(p.numel() for p in HouseholderLinear(n, reflections=k).parameters()) == n * k + n
    assert sum(p.numel() for p in HanLayer(n).parameters()) == 2 * n
    assert sum(p.numel() for p in HanBlock(n).parameters()) == 4 * n
    assert sum(p.numel() for p in HouseholderLinear(n, bias=False).parameters()) == n


def test_initialisation_options():
    torch.manual_seed(7)
    layer = HouseholderLinear(100, reflections=6)
    torch.testing.assert_close(layer.u @ layer.u.T, torch.eye(6), atol=1e-5, rtol=0)  # orthonormal directions
    assert layer.bias.abs().max() <= 1 / math.sqrt(100)
    assert HouseholderLinear(100, bias_init="zeros").bias.abs().max() == 0
    normal = HouseholderLinear(100, init="normal")
    assert 5 < normal.u.norm() < 15  # i.i.d. N(0, 1): norm about sqrt(100)
    with pytest.raises(ValueError, match="init must be"):
        HouseholderLinear(4, init="xavier")
    with pytest.raises(ValueError, match="bias_init must be"):
        HouseholderLinear(4, bias_init="ones")


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match=r"reflections must be in \[1, features=4\]"):
        HouseholderLinear(4, reflections=5)
    with pytest.raises(ValueError, match="features must be >= 1"):
        HanLayer(0)
    for bad in (True, 2.0):  # a TypeError from torch.empty, deep inside, before
        with pytest.raises(ValueError, match=rf"HanLayer: reflections must be an int, got {bad!r}"):
            HanLayer(8, reflections=bad)
    np = pytest.importorskip("numpy")
    layer = HanLayer(np.int64(8), reflections=np.int64(2))  # NumPy integers are integers, stored as ints
    assert layer.u.shape == (2, 8) and type(layer.features) is int and type(layer.reflections) is int
    for bad in (np.array(8.0), torch.tensor(8)):
        with pytest.raises(ValueError, match="features must be an int"):
            HanLayer(bad)
    with pytest.raises(ValueError, match="input has 5 features but the Householder vectors have 4"):
        HanLayer(4)(torch.randn(2, 5))
    # sizes that skipped the check: a TypeError from torch.empty, a tuple index error in the first forward, or
    # "not enough values to unpack"
    for build, message in (
        (lambda: HanStack(4, depth=2.0), "HanStack: depth must be an int, got 2.0"),
        (lambda: HanStack(4, depth=True), "HanStack: depth must be an int, got True"),
        (lambda: HanBlock(4, side_rank=2.0), "HanBlock: side_rank must be an int, got 2.0"),
        (lambda: LowRankLinear(4, 2.5), "LowRankLinear: rank must be an int, got 2.5"),
        (lambda: HanLayer(4, dim=1.5), "HanLayer: dim must be an int, got 1.5"),
        (lambda: HanBlock(4, drop=(0.1,)), r"HanBlock: drop must be a probability or a \(drop1, drop2\) pair"),
    ):
        with pytest.raises(ValueError, match=message):
            build()
    for k in (1, 2):  # token ids by mistake: the kernel said '"householder_chain_forward" not implemented for Long'
        with pytest.raises(TypeError, match="input must be a floating-point tensor, got torch.int64"):
            HanLayer(4, reflections=k)(torch.ones(2, 4, dtype=torch.long))


def test_han_block_structure_and_dropout_placement():
    block = HanBlock(16, drop=(0.1, 0.2))
    assert isinstance(block.fc1, HanLayer) and type(block.fc2) is HouseholderLinear
    assert block.drop1.p == 0.1 and block.drop2.p == 0.2
    mixer = HanBlock(16, final_abs=True)
    assert isinstance(mixer.fc2, HanLayer)
    x = torch.randn(4, 16)
    assert (mixer(x) >= 0).all()
    expected = block.fc2(block.fc1(x))
    block.eval()
    torch.testing.assert_close(block(x), expected)
    assert "features=16" in repr(block) and "reflections=1" in repr(block.fc1)
    assert torch.equal(Abs()(torch.tensor([-1.0, 2.0])), torch.tensor([1.0, 2.0]))


def test_wy_factor_is_the_product_of_reflections():
    torch.manual_seed(8)
    u = unit_rows(torch.randn(5, 9, dtype=torch.float64))
    t = wy_factor(u)
    assert torch.equal(t, torch.triu(t))
    q = torch.eye(9, dtype=torch.float64) - u.T @ t @ u
    ref = torch.eye(9, dtype=torch.float64)
    for row in u:
        ref = ref @ (torch.eye(9, dtype=torch.float64) - 2 * torch.outer(row, row))
    torch.testing.assert_close(q, ref, atol=1e-13, rtol=0)


def test_state_dict_round_trip():
    a, b = HanBlock(12, reflections=2), HanBlock(12, reflections=2)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"fc1.u", "fc1.bias", "fc2.u", "fc2.bias"}
    x = torch.randn(3, 12)
    assert torch.equal(a(x), b(x))


def test_torch_compile_matches_eager():
    torch.manual_seed(9)
    block = HanBlock(32, reflections=2)
    x = torch.randn(8, 32, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    ref = block(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_compiled, x.grad, atol=1e-5, rtol=1e-5)


def test_torch_export_matches_eager():
    torch.manual_seed(10)
    block = HanBlock(32, reflections=3).eval()
    x = torch.randn(4, 32)
    exported = torch.export.export(block, (x,))
    torch.testing.assert_close(exported.module()(x), block(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(11)
    layer = HanLayer(64, reflections=4)
    x = torch.randn(16, 64)
    torch.testing.assert_close(layer.cuda()(x.cuda()).cpu(), layer.cpu()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_backward(dtype):
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(16, 32), HanBlock(32, reflections=2), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=dtype):
        out = net(x)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in net.parameters()
    )
    ref = net(x)
    assert (out.float() - ref).norm() / ref.norm() < 3e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_dtype_of_a_block_with_extras_is_the_plain_blocks(dtype):
    """Under autocast a block with a gain, an input scale, a bias after the gain or a side path gave float32 (its
    float32 parameters promoted the product), where the plain block and an ``nn.Linear`` give the autocast dtype."""
    torch.manual_seed(13)
    x = torch.randn(8, 16)
    for extras in (dict(gain=True), dict(input_scale=True), dict(side_rank=2), dict(gain=True, side_rank=2)):
        block = HanBlock(16, reflections=2, **extras)
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.1 * torch.randn_like(p))  # the side path's up-projection starts at 0
        with torch.autocast("cpu", dtype=dtype):
            out = block(x)
        assert out.dtype == dtype, extras
        out.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in block.parameters()), extras
        ref = block(x)
        assert (out.float() - ref).norm() / ref.norm() < 3e-2, extras


def test_torch_compile_under_autocast_trains():
    """A compiled training step under CPU autocast: the backward ran in mixed bfloat16/float32 and raised."""
    torch.manual_seed(13)
    net = nn.Sequential(nn.Linear(16, 32), HanBlock(32, reflections=2), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(net, backend="aot_eager")(x)
    out.float().sum().backward()
    grads = [p.grad for p in net.parameters()]
    net.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).float().sum().backward()  # eager, the same dtypes
    for compiled, eager in zip(grads, (p.grad for p in net.parameters()), strict=True):
        torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)


def test_parameter_gradients_have_the_parameters_layout():
    """DDP's gradient buckets expect each gradient laid out like its parameter."""
    layer = HanLayer(16, reflections=3)
    layer(torch.randn(4, 16)).sum().backward()
    for p in layer.parameters():
        assert p.grad.stride() == p.stride() and p.grad.is_contiguous()


def test_han_stack_is_a_sequence_of_han_layers():
    torch.manual_seed(13)
    layers = [HanLayer(12, reflections=2) for _ in range(5)]
    stack = HanStack.from_layers(layers)
    assert stack.u.shape == (5, 2, 12) and stack.bias.shape == (5, 12)
    assert sum(p.numel() for p in stack.parameters()) == 5 * (2 * 12 + 12)
    x = torch.randn(7, 12, requires_grad=True)
    out = stack(x)
    ref = nn.Sequential(*layers)(x)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), [x, stack.u, stack.bias])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x] + [m.u for m in layers] + [m.bias for m in layers])
    torch.testing.assert_close(grads[0], ref_grads[0])
    torch.testing.assert_close(grads[1], torch.stack(ref_grads[1:6]))
    torch.testing.assert_close(grads[2], torch.stack(ref_grads[6:]))
    assert "depth=5" in repr(stack)


def test_stack_han_layers_turns_each_run_into_one_stack():
    torch.manual_seed(5)
    modules = [nn.Linear(3, 8), Abs(), *(HanLayer(8) for _ in range(4)), nn.Linear(8, 8), HanLayer(8), HanLayer(8)]
    stacked = stack_han_layers(modules)
    assert [type(m) for m in stacked] == [nn.Linear, Abs, HanStack, nn.Linear, HanStack]
    assert [m.depth for m in stacked if isinstance(m, HanStack)] == [4, 2]
    x = torch.randn(5, 3)
    torch.testing.assert_close(stacked(x), nn.Sequential(*modules)(x))


def test_han_stack_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        HanStack(4, depth=0)
    with pytest.raises(ValueError, match="expects a non-empty sequence of HanLayer"):
        HanStack.from_layers([HouseholderLinear(4)])
    with pytest.raises(ValueError, match="same features, reflections"):
        HanStack.from_layers([HanLayer(4), HanLayer(4, reflections=2)])


BATCHED_BACKWARD_MODULES = [
    lambda: HanLayer(6),
    lambda: HanLayer(6, reflections=3),  # one layer, k > 1: the kernel's saved projections and signs
    lambda: HanBlock(6, reflections=2),  # a fused chain
    lambda: HanBlock(6, gain=True, input_scale=True, side_rank=2),  # the extras: layer by layer
    lambda: HanStack(6, depth=3),
    lambda: HanLayer(3, dim=0),  # vectors along the first dimension: the kernel's column layout
]


@pytest.mark.parametrize("make", BATCHED_BACKWARD_MODULES)
def test_batched_backward_jacobian_and_hessian_match_the_loop(make):
    """``autograd.grad(is_grads_batched=True)``, ``jacobian``/``hessian(vectorize=True)`` and ``torch.func.vmap`` over
    ``autograd.grad`` vmap only the backward (the forward runs outside any transform): they raised on both paths (the
    kernel's backward operator had no batching rule, the PyTorch backward updated the incoming gradient in place and
    with ``addmm(out=)``)."""
    torch.manual_seed(11)
    module = make().double()
    x = (
        torch.randn(3, 4, dtype=torch.float64)
        if getattr(module, "dim", -1) == 0
        else torch.randn(2, 6, dtype=torch.float64)
    )
    functional = torch.autograd.functional
    torch.testing.assert_close(functional.jacobian(module, x, vectorize=True), functional.jacobian(module, x))

    def energy(v):
        return module(v).square().sum()

    torch.testing.assert_close(functional.hessian(energy, x, vectorize=True), functional.hessian(energy, x))
    params = list(module.parameters())
    leaf = x.clone().requires_grad_()
    y = module(leaf)
    cotangents = torch.randn(4, *y.shape, dtype=torch.float64)
    batched = torch.autograd.grad(y, [leaf, *params], cotangents, retain_graph=True, is_grads_batched=True)
    # torch.func.vmap over autograd.grad: the same, through functorch's batching (the kernel: its vmap rule)
    vmapped = torch.func.vmap(lambda c: torch.autograd.grad(y, [leaf, *params], c, retain_graph=True))(cotangents)
    for i, cotangent in enumerate(cotangents):
        looped = torch.autograd.grad(y, [leaf, *params], cotangent, retain_graph=True)
        for got, got_func, want in zip(batched, vmapped, looped, strict=True):
            torch.testing.assert_close(got[i], want)
            torch.testing.assert_close(got_func[i], want)


def test_meta_materialisation_with_reset_parameters_restores_the_initialisation():
    """Meta-device construction, ``to_empty`` and ``reset_parameters()`` on every module in ``modules()`` order (what
    FSDP's materialisation and many training scripts do) left a block's gain, input scale and bias-after-gain as
    uninitialised memory (``HanBlock`` had no ``reset_parameters``) and the side path's up-projection at ``nn.Linear``'s
    random init, so a fresh side path added up to 0.8 instead of nothing."""
    for bias_init in ("uniform", "zeros"):
        kwargs = dict(gain=True, input_scale=True, side_rank=2, bias_init=bias_init)
        with torch.device("meta"):
            block = HanBlock(16, **kwargs)
        block.to_empty(device="cpu")
        with torch.no_grad():
            for p in block.parameters():
                p.fill_(float("nan"))  # whatever to_empty left
        for module in block.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        assert bool((block.gain == 1).all()) and bool((block.input_scale == 1).all())
        bound = 1 / math.sqrt(16) if bias_init == "uniform" else 0.0
        assert block.bias.abs().max() <= bound and not block.bias.isnan().any()
        if bias_init == "uniform":
            assert block.bias.abs().max() > 0
        assert bool((block.side.up.weight == 0).all()) and block.side.down.weight.abs().max() > 0
        assert not any(p.isnan().any() for p in block.parameters())
        assert list(block.state_dict()) == list(HanBlock(16, **kwargs).state_dict())  # checkpoints still load
        x = torch.randn(3, 16)
        torch.testing.assert_close(block(x), block.fc2(block.fc1(x)) + block.bias)  # g = s = 1, side path 0


def test_han_mix_ffn_refuses_an_even_kernel_size():
    """An even ``kernel_size`` with ``padding = kernel_size // 2`` grew the token grid ((2, 12, 8) came back as
    (2, 20, 8)) without an error, and its Dirac start was off-centre."""
    from han_surgery.surgery.modules import HanMixFfn

    for kernel_size in (2, 4):
        with pytest.raises(ValueError, match="kernel_size must be odd"):
            HanMixFfn(8, kernel_size=kernel_size)
    x = torch.randn(2, 12, 8)
    assert HanMixFfn(8, kernel_size=5)(x, 3, 4).shape == x.shape


def test_a_side_path_draws_the_random_numbers_it_always_drew() -> None:
    """Its zero-initialised up-projection skipped nn.Linear's draw, so every module built after a side path (the
    later Han-blocks of hanify(side_rank=...), a head) got other seeded weights than in earlier versions."""
    from han_surgery.layers import LowRankLinear

    torch.manual_seed(0)
    LowRankLinear(16, 2)
    after_side = torch.rand(4)
    torch.manual_seed(0)
    nn.Linear(16, 2, bias=False), nn.Linear(2, 16, bias=False)
    assert torch.equal(after_side, torch.rand(4))


@pytest.mark.parametrize("final_abs", [False, True])
def test_han_block_extras_compute_the_documented_formula(final_abs):
    """``y = g * (H2 |H1 (s * x) + b1|) + b2 + B A x`` (``g * |H2 z + b2|`` with ``final_abs``), with the input scale,
    gain and side path away from their starting values (``s = g = 1`` and ``B = 0`` hide a forward that ignores them)."""
    torch.manual_seed(5)
    n, r = 10, 3
    block = HanBlock(n, reflections=2, final_abs=final_abs, gain=True, input_scale=True, side_rank=r).double()
    with torch.no_grad():
        block.input_scale.uniform_(0.5, 2.0)
        block.gain.uniform_(-2.0, 2.0)
        block.side.up.weight.normal_()
    x = torch.randn(4, n, dtype=torch.float64)
    h1, h2 = explicit_product(block.fc1), explicit_product(block.fc2)
    s, g, a, b = block.input_scale, block.gain, block.side.down.weight, block.side.up.weight
    z = torch.abs((s * x) @ h1.T + block.fc1.bias) @ h2.T
    if final_abs:
        expected = g * torch.abs(z + block.fc2.bias) + x @ a.T @ b.T
    else:
        assert block.fc2.bias is None  # b2 is the block's own, added after the gain
        expected = g * z + block.bias + x @ a.T @ b.T
    y = block(x)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)
    extras = [s, g, a, b]
    weights = torch.randn_like(y)
    got = torch.autograd.grad((y * weights).sum(), extras)
    want = torch.autograd.grad((expected * weights).sum(), extras)
    for name, mine, theirs in zip(("input_scale", "gain", "side.down", "side.up"), got, want, strict=True):
        assert mine.abs().max() > 0, name
        torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=0, msg=name)
