"""The drop-in modules: state_dict compatibility, default init, the ShuffleAttention(256) example, memory layouts
and dtype conversions -- always compared with the reference modules."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DEVICES,
    VARIANTS,
    clone_as,
    forward_backward,
    fused_class,
    make_fused_like,
    make_input,
    make_pair,
    make_ref,
    randomize_,
    ref_class,
)

import sa_cuda
from sa_cuda import reference
from sa_cuda.testing import assert_close_to_reference

CONFIGS = [(256, 64), (2048, 64), (64, 8), (16, 8), (12, 3), (128, 2)]


# ------------------------------------------------------------------------------------------------
# state_dict and init
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,groups", CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_and_shapes(variant, channels, groups):
    ref = ref_class(variant)(channels, groups)
    fused = fused_class(variant)(channels, groups)
    ref_sd, fused_sd = ref.state_dict(), fused.state_dict()
    assert list(fused_sd) == list(ref_sd)
    for key in ref_sd:
        assert fused_sd[key].shape == ref_sd[key].shape, key
        assert fused_sd[key].dtype == ref_sd[key].dtype, key
    assert isinstance(fused, ref_class(variant))
    assert fused.groups == ref.groups == groups


@pytest.mark.parametrize("variant", VARIANTS)
def test_strict_load_both_ways(variant):
    channels, groups = 64, 8
    shape = (2, channels, 6, 5)
    x = make_input(shape, seed=1)
    gy = make_input(shape, seed=2)

    # reference -> fused
    ref = make_ref(variant, channels, groups, seed=3)
    fused = fused_class(variant)(channels, groups)
    fused.load_state_dict(ref.state_dict(), strict=True)
    assert_close_to_reference(
        forward_backward(fused, x, gy),
        forward_backward(clone_as(ref, torch.float64), x.double(), gy.double()),
        torch.float32,
    )

    # fused -> reference
    fused2 = randomize_(fused_class(variant)(channels, groups), seed=4)
    ref2 = ref_class(variant)(channels, groups)
    ref2.load_state_dict(fused2.state_dict(), strict=True)
    for key, value in fused2.state_dict().items():
        assert torch.equal(ref2.state_dict()[key], value), key
    assert_close_to_reference(
        forward_backward(fused2, x, gy),
        forward_backward(clone_as(ref2, torch.float64), x.double(), gy.double()),
        torch.float32,
    )

    # a state_dict of another m is refused (strict shapes)
    other = ref_class(variant)(channels * 2, groups)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fused.load_state_dict(other.state_dict(), strict=True)


@pytest.mark.parametrize("channels,groups", CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_default_init_identical(variant, channels, groups):
    torch.manual_seed(1234)
    ref = ref_class(variant)(channels, groups)
    torch.manual_seed(1234)
    fused = fused_class(variant)(channels, groups)
    for (k1, v1), (k2, v2) in zip(ref.state_dict().items(), fused.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    m = channels // (2 * groups)
    if variant == "sa_layer":  # SA-Net's init: gates start as constants
        expected = {
            "cweight": 0.0,
            "cbias": 1.0,
            "sweight": 0.0,
            "sbias": 1.0,
            "gn.weight": 1.0,
            "gn.bias": 0.0,
        }
        for key, value in expected.items():
            t = fused.state_dict()[key]
            assert t.shape == ((1, m, 1, 1) if "." not in key else (m,))
            assert torch.equal(t, torch.full_like(t, value)), key
    else:  # PyTorch defaults of Conv2d / GroupNorm
        assert fused.affine1.weight.shape == (m, m, 1, 1)
        assert torch.equal(fused.gn.weight, torch.ones(m))
        assert torch.equal(fused.gn.bias, torch.zeros(m))
        bound = 1.0 / m**0.5  # kaiming_uniform(a=sqrt(5)) and bias bounds for fan_in = m
        for w in (
            fused.affine1.weight,
            fused.affine2.weight,
            fused.affine1.bias,
            fused.affine2.bias,
        ):
            assert w.abs().max() <= bound
        assert not torch.equal(fused.affine1.weight, fused.affine2.weight)


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_init_forward(variant):
    """With the default init (SALayer: constant gates sigmoid(1)), fused == reference too."""
    torch.manual_seed(7)
    ref = ref_class(variant)(64, 8)
    fused = make_fused_like(variant, ref)
    x, gy = make_input((2, 64, 5, 7), seed=1), make_input((2, 64, 5, 7), seed=2)
    assert_close_to_reference(
        forward_backward(fused, x, gy),
        forward_backward(clone_as(ref, torch.float64), x.double(), gy.double()),
        torch.float32,
    )


# ------------------------------------------------------------------------------------------------
# The seed's example: ShuffleAttention(256) (groups=64) on torch.ones((32, 256, 24, 24))
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("input_kind", ["ones", "randn"])
def test_seed_example(input_kind, device):
    torch.manual_seed(0)
    ref = reference.ShuffleAttention(256).to(device)  # the seed's own default init, groups=64
    assert ref.groups == 64
    fused = make_fused_like("shuffle_attention", ref)
    shape = (32, 256, 24, 24)
    x = (
        torch.ones(shape, device=device)
        if input_kind == "ones"
        else make_input(shape, seed=3, device=device)
    )
    out = fused(x)
    assert out.shape == (32, 256, 24, 24) and out.dtype == torch.float32
    ref64 = clone_as(ref, torch.float64)
    with torch.no_grad():
        expected = ref64(x.double())
        eager = ref(x)
    assert_close_to_reference({"out": out}, {"out": expected}, torch.float32, eager={"out": eager})


@pytest.mark.slow
def test_seed_example_random_params_backward():
    """The seed's shape with random parameters, forward and backward (batch 32 kept: this is the
    one test of the full seed shape with gradients)."""
    ref, fused = make_pair("shuffle_attention", 256, 64, seed=9)
    shape = (32, 256, 24, 24)
    x, gy = make_input(shape, seed=4), make_input(shape, seed=5)
    got = forward_backward(fused, x, gy)
    ref64 = forward_backward(clone_as(ref, torch.float64), x.double(), gy.double())
    assert_close_to_reference(got, ref64, torch.float32)


# ------------------------------------------------------------------------------------------------
# Memory layouts
# ------------------------------------------------------------------------------------------------
def _layout_case(variant, make_view, grad_layout=None, device="cpu"):
    """make_view(base) -> x, a view of a leaf `base`; compares out, d base and parameter grads."""
    channels, groups = 64, 8
    ref, fused = make_pair(variant, channels, groups, seed=13, device=device)
    ref64 = clone_as(ref, torch.float64)
    base = make_input((2, channels, 6, 10), seed=1, device=device)

    def run(module, dtype):
        module.zero_grad(set_to_none=True)
        b = base.detach().to(dtype).requires_grad_(True)
        x = make_view(b)
        out = module(x)
        gy = make_input(out.shape, seed=2, device=device, dtype=dtype)
        if grad_layout is not None:
            gy = grad_layout(gy)
        out.backward(gy)
        res = {"out": out.detach(), "x": b.grad}
        res.update({n: p.grad for n, p in module.named_parameters()})
        return res, x

    got, x = run(fused, torch.float32)
    expected, _ = run(ref64, torch.float64)
    assert_close_to_reference(got, expected, torch.float32)
    return x, got


LAYOUTS = {
    "sliced-w": lambda b: b[..., ::2],  # non-dense view
    "transposed-hw": lambda b: b.transpose(2, 3),  # permuted, dense
    "channels_last": lambda b: b.contiguous(memory_format=torch.channels_last),
    "sliced-c": lambda b: torch.cat([b, b], 1)[:, 32:96],  # storage offset
    "permuted-batch": lambda b: b.transpose(0, 1).contiguous().transpose(0, 1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_non_contiguous_input(variant, layout, device):
    x, got = _layout_case(variant, LAYOUTS[layout], device=device)
    assert not x.is_contiguous()
    assert got["out"].shape == x.shape


@pytest.mark.parametrize("grad_kind", ["channels_last", "expanded", "transposed"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_non_contiguous_grad_out(variant, grad_kind):
    layouts = {
        "channels_last": lambda g: g.contiguous(memory_format=torch.channels_last),
        "expanded": lambda g: g[:, :, :1, :1].expand(g.shape),  # stride-0 gradient
        "transposed": lambda g: g.transpose(2, 3).contiguous().transpose(2, 3),
    }
    _layout_case(variant, lambda b: b, grad_layout=layouts[grad_kind])


# ------------------------------------------------------------------------------------------------
# dtype conversions, devices (empty batches: tests/kernels/test_edge_inputs.py)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_module_double(variant, device):
    ref, fused = make_pair(variant, 64, 8, seed=17, device=device)
    fused = fused.double()
    assert all(p.dtype == torch.float64 for p in fused.parameters())
    x, gy = (
        make_input((2, 64, 7, 9), seed=1, device=device),
        make_input((2, 64, 7, 9), seed=2, device=device),
    )
    got = forward_backward(fused, x.double(), gy.double())
    assert got["out"].dtype == torch.float64
    ref64 = forward_backward(clone_as(ref, torch.float64), x.double(), gy.double())
    assert_close_to_reference(got, ref64, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_module_bfloat16(variant, device):
    """module.to(torch.bfloat16): bf16 output and gradients, and the low-precision
    criterion against the float64 reference with the same (bf16-rounded) parameters."""
    ref, fused = make_pair(variant, 64, 8, seed=19, device=device)
    fused = fused.to(torch.bfloat16)
    eager = clone_as(ref, torch.bfloat16)
    ref64 = clone_as(eager, torch.float64)  # the same bf16 parameter values, exactly
    x = make_input((2, 64, 7, 9), seed=1, device=device, dtype=torch.bfloat16)
    gy = make_input((2, 64, 7, 9), seed=2, device=device, dtype=torch.bfloat16)
    got = forward_backward(fused, x, gy)
    base = forward_backward(eager, x, gy)
    exact = forward_backward(ref64, x.double(), gy.double())
    assert_close_to_reference(got, exact, torch.bfloat16, eager=base)


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_device(variant):
    """On the meta device the module runs the op's fake kernel: shapes and dtypes only (bf16 x
    with fp32 parameters promotes to fp32, as eager does outside autocast)."""
    fused = fused_class(variant)(64, 8).to("meta")
    x = torch.empty((2, 64, 5, 7), device="meta", dtype=torch.bfloat16)
    out = fused.to(torch.float32)(x)
    assert out.device.type == "meta" and out.shape == x.shape and out.dtype == torch.float32
    out = fused.to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16


def test_fused_available():
    """CPU kernels are always built; the meta device has the fake kernels; device types without
    a kernel (or without a dispatch key of the upper-cased name) answer False, never raise."""
    assert sa_cuda.fused_available("cpu") is True
    assert sa_cuda.fused_available(torch.device("meta")) is True
    for device_type in ("mps", "xpu", "privateuseone", "hpu"):
        assert isinstance(sa_cuda.fused_available(device_type), bool)


# ------------------------------------------------------------------------------------------------
# Construction, dtype promotion, package layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [None, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", [None, "cpu", "meta"])
def test_factory_kwargs(variant, dtype, device):
    """device= and dtype= as PyTorch's own modules take them (timm passes them to attention
    layers): parameters on that device in that dtype, same keys and shapes as the reference."""
    torch.manual_seed(0)
    layer = fused_class(variant)(64, 4, device=device, dtype=dtype)
    torch.manual_seed(0)
    ref = ref_class(variant)(64, 4)
    assert list(layer.state_dict()) == list(ref.state_dict())
    for (name, p), (_, q) in zip(layer.named_parameters(), ref.named_parameters()):
        assert p.shape == q.shape, name
        assert p.dtype == (dtype or torch.get_default_dtype()), name
        assert p.device.type == (device or "cpu"), name
    if device != "meta":
        for p, q in zip(layer.parameters(), ref.parameters()):  # the reference's init, converted
            torch.testing.assert_close(p, q.to(p.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_factory_dtype_must_be_a_kernel_dtype(variant):
    for dtype in (torch.int32, torch.complex64, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match="dtype must be one of"):
            fused_class(variant)(64, 4, dtype=dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "x_dtype, p_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float64),
    ],
)
def test_mixed_dtypes_promote_like_eager(variant, x_dtype, p_dtype):
    """Outside autocast, x of one dtype and parameters of another compute in the promoted dtype,
    as the eager SALayer does (bf16 x, fp32 parameters -> fp32 result), with the result of the
    reference run on the promoted input."""
    ref, fused = make_pair(variant, 32, 4, dtype=p_dtype)
    x = make_input((2, 32, 5, 6), dtype=x_dtype).requires_grad_(True)
    out = fused(x)
    promoted = torch.promote_types(x_dtype, p_dtype)
    assert out.dtype == promoted
    if variant == "sa_layer" and p_dtype == torch.float32:
        assert ref(x).dtype == promoted  # eager's own promotion (other pairs: eager refuses them)
    want = ref(x.detach().to(promoted))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.backward(torch.ones_like(out))
    assert x.grad.dtype == x_dtype


@pytest.mark.parametrize("variant", VARIANTS)
def test_autocast_keeps_x_dtype(variant):
    """Under autocast the layer keeps x's dtype (documented; the next autocast op wants it)."""
    _, fused = make_pair(variant, 32, 4)
    x = make_input((2, 32, 5, 6), dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(x).dtype == torch.bfloat16


def test_fresh_import_gives_the_models_and_leaves_dynamo_unloaded():
    """In a fresh interpreter, `import sa_cuda` exposes sa_cuda.models and loads no part of Dynamo
    (torch.compiler.assume_constant_result imported it: a third of the import's time, paid by every
    user and every child process of this suite; sa_cuda.ops.library marks its trace-time constants
    itself)."""
    import subprocess
    import sys

    code = (
        "import sys, sa_cuda; print(type(sa_cuda.models.sa_resnet50(num_classes=10)).__name__); "
        "print(sorted(name for name in sys.modules if name.startswith('torch._dynamo')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SAResNet", "[]"]
