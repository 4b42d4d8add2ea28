"""The residual epilogue: ``out = relu(SA(x) + identity)`` in one pass (the tail of a bottleneck),
``<variant>_residual_forward`` / ``_residual_backward`` on every kernel path of both backends
(the C++ CPU kernels; the CUDA source, emulated, and on a GPU where there is one).

* Values: out and every gradient (x, identity, the six parameters) against the float64 reference
  ``relu(reference(x) + identity)``, within sa_cuda.testing.accuracy_bound (relative to eager's
  own error in the same dtype). relu's mask is a step: where SA(x) + identity lies within a
  rounding of 0, fused and reference may disagree on it, so both backwards take the mask of the
  fused out (which is the op's contract: the gradient passes where out > 0).
* The backward exactly: ``residual_backward(gy, out, ...)`` is, bit for bit, the plain backward of
  ``threshold_backward(gy, out, 0)`` (PyTorch's relu backward: NaN passes, 0 does not) with that
  masked gradient as grad_identity, for any out, on every path.
* Layouts: x channels_last or not, identity in the other format or at a misaligned storage offset
  (the CUDA pack width must then drop to one element).
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import (
    DTYPE_IDS,
    DTYPES,
    PARAM_KEYS,
    VARIANTS,
    clone_as,
    input_at_offset,
    make_input,
    make_ref,
    misaligned_copy,
    params_in_op_order,
)

import sa_cuda
from sa_cuda.ops import SA_CUDA_LIBRARY
from sa_cuda.testing import assert_close_to_reference

# (B, C, H, W), groups: the CPU kernels' paths (NCHW planes and branches; channels_last tiles,
# rows and columns, tests/kernels/test_channels_last.py) and the CUDA launch paths
# (tests/kernels/test_emulated_kernels.py), small enough to emulate.
SHAPES = [
    pytest.param((2, 32, 7, 9), 4, id="tiles-N63"),
    pytest.param((2, 24, 7, 7), 3, id="planes-N49"),  # sizes compiled in (with_plane_size)
    pytest.param((1, 16, 7, 28), 2, id="planes-N196"),
    pytest.param((2, 96, 7, 7), 3, id="branch-m16-N49"),  # with_branch_shape: m and N compiled in
    pytest.param((1, 48, 14, 14), 3, id="branch-m8-N196"),
    pytest.param((2, 24, 5, 3), 3, id="tail-half12"),
    pytest.param((3, 16, 1, 1), 4, id="hw1"),
    pytest.param((2, 16, 8, 8), 4, id="warp-vector"),
    pytest.param((1, 8, 30, 32), 2, id="block-vector"),
    pytest.param((1, 4, 65, 67), 1, id="streamed-scalar"),
    pytest.param((2, 16, 5, 7), 8, id="m1"),
    pytest.param((1, 64, 9, 7), 1, id="m32"),
    pytest.param((2, 64, 24, 25), 8, id="columns-m4"),
    pytest.param((2, 256, 7, 7), 8, id="columns-m16"),
    pytest.param((1, 48, 30, 31), 3, id="rows-m8"),
    pytest.param((2, 72, 20, 30), 12, id="rows-m3"),
]
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def _inputs(shape, dtype, x_format, identity_format, identity_offset=0):
    x = make_input(shape, seed=1, dtype=dtype).contiguous(memory_format=FORMATS[x_format])
    identity = input_at_offset(shape, identity_offset, dtype, 3)
    if identity_offset == 0:
        identity = identity.contiguous(memory_format=FORMATS[identity_format])
    gy = make_input(shape, seed=2, dtype=dtype).contiguous(memory_format=FORMATS[x_format])
    return x, identity, gy


def _fused_run(backend, variant, module, x, identity, gy):
    """{"out", "x", "identity", <parameter>...}: the fused layer with the epilogue and all its
    gradients for gy, through the functionals' path (autograd) of the backend."""
    groups = module.groups
    xl = x.detach().clone().requires_grad_(True)
    il = identity.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params_in_op_order(variant, module)]
    out = backend.apply(variant, xl, groups, params, module.gn.eps, identity=il)
    grads = torch.autograd.grad(out, [xl, il, *params], gy)
    result = {"out": out.detach(), "x": grads[0], "identity": grads[1]}
    result.update(zip(PARAM_KEYS[variant], grads[2:]))
    return result


def _reference_run(module, x, identity, gy, mask):
    """The reference module's tail, relu(module(x) + identity), with relu's mask given: the
    gradient gy * mask goes to identity and through the layer."""
    module.zero_grad(set_to_none=True)
    xl = x.detach().clone().requires_grad_(True)
    sa = module(xl)
    out = torch.relu(sa + identity)
    masked = gy * mask
    sa.backward(masked)
    result = {"out": out.detach(), "x": xl.grad, "identity": masked}
    result.update({n: p.grad for n, p in module.named_parameters()})
    return result


@pytest.mark.parametrize("backend", ["cpu", "emulated", "cuda"], indirect=True)
@pytest.mark.parametrize(
    "x_format,identity_format", [("nchw", "nchw"), ("cl", "cl"), ("cl", "nchw")]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_values(backend, variant, shape, groups, dtype, x_format, identity_format):
    _assert_residual_values(backend, variant, shape, groups, dtype, x_format, identity_format)


def _assert_residual_values(backend, variant, shape, groups, dtype, x_format, identity_format):
    """out and every gradient of the fused tail against the float64 reference tail."""
    dev = backend.device
    ref = make_ref(variant, shape[1], groups, seed=5, dtype=dtype, device=dev)
    x, identity, gy = (t.to(dev) for t in _inputs(shape, dtype, x_format, identity_format))
    F = _fused_run(backend, variant, ref, x, identity, gy)
    assert F["out"].is_contiguous(memory_format=FORMATS[x_format])
    mask = F["out"] > 0
    R = _reference_run(
        clone_as(ref, torch.float64), x.double(), identity.double(), gy.double(), mask
    )
    E = R if dtype == torch.float64 else _reference_run(ref, x, identity, gy, mask)
    assert_close_to_reference(F, R, dtype, eager=E)


@pytest.mark.parametrize("backend", ["cpu", "emulated", "cuda"], indirect=True)
@pytest.mark.parametrize("x_format", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_backward_is_masked_backward(backend, variant, shape, groups, dtype, x_format):
    """residual_backward(gy, out) == (plain backward of g, g) with g = threshold_backward(gy,
    out, 0), bit for bit, for an out holding positive values, zeros, negatives and NaN."""
    _assert_masked_backward(backend, variant, shape, groups, dtype, x_format)


def _assert_masked_backward(backend, variant, shape, groups, dtype, x_format, misaligned=()):
    """misaligned: the names among "grad_out", "out" to pass one element past an aligned address."""
    dev = backend.device
    ref = make_ref(variant, shape[1], groups, seed=5, dtype=dtype, device=dev)
    params = [p.detach() for p in params_in_op_order(variant, ref)]
    x, _, gy = (t.to(dev) for t in _inputs(shape, dtype, x_format, x_format))
    _, mean, rstd = backend.forward_op(variant)(x, groups, *params, 1e-5)
    out = make_input(shape, seed=4, dtype=dtype, device=dev)
    out[out.abs() < 0.3] = 0.0
    out.view(-1)[::7] = float("nan")
    out = out.contiguous(memory_format=FORMATS[x_format])
    masked = torch.ops.aten.threshold_backward(gy, out, 0.0)
    if "grad_out" in misaligned:
        gy = misaligned_copy(gy)
    if "out" in misaligned:
        out = misaligned_copy(out)
    got = backend.residual_backward_op(variant)(gy, out, x, mean, rstd, groups, *params)
    # A misaligned tensor drops the CUDA kernels to one element a pack, whose sums run in another
    # order: the plain backward then reads a misaligned gradient too, which takes the same path.
    plain_grad = misaligned_copy(masked) if misaligned else masked
    want = backend.backward_op(variant)(plain_grad, x, mean, rstd, groups, *params)
    assert torch.equal(got[1], masked)
    assert got[1].is_contiguous(memory_format=FORMATS[x_format])
    for i, (g, w) in enumerate(zip((got[0], *got[2:]), want)):
        assert g.dtype == w.dtype and torch.equal(g, w), f"result {i}"


# SALayer's NCHW residual backward on float and double planes of 128 values and more makes relu's
# masked gradient in the plane body's first pass (MaskedGradPlane, backward_cpu.cpp:
# masks_in_body), on smaller planes in a pass of its own (as ShuffleAttention's does on every
# plane): both sides of that bound, a plane size compiled in on each side (49, 196), and planes
# whose last values are a scalar tail (N % 8 = 1) or a vector that overlaps the one before
# (N % 8 = 7).
MASK_PATH_SHAPES = [
    pytest.param((2, 8, 127, 1), 2, id="N127"),
    pytest.param((2, 8, 8, 16), 2, id="N128"),
    pytest.param((2, 8, 3, 43), 2, id="N129-scalar-tail"),
    pytest.param((2, 8, 11, 13), 2, id="N143-vector-tail"),
    pytest.param((2, 16, 7, 7), 4, id="N49-compiled"),
    pytest.param((2, 16, 14, 14), 4, id="N196-compiled"),
]


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape,groups", MASK_PATH_SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_backward_mask_paths(backend, variant, shape, groups, dtype):
    """Where the residual backward masks the gradient (in the body's first pass or before it):
    bit for bit the plain backward of the masked gradient, and every value of the tail against the
    float64 reference."""
    _assert_masked_backward(backend, variant, shape, groups, dtype, "nchw")
    _assert_residual_values(backend, variant, shape, groups, dtype, "nchw", "nchw")


@pytest.mark.parametrize("backend", ["cpu", "emulated", "cuda"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_misaligned_identity(backend, variant, dtype):
    """identity one element past an aligned address (the CUDA kernels' packs must not read it as
    wide accesses) and x aligned, on the vector paths."""
    shape, groups = (1, 8, 30, 32), 2
    dev = backend.device
    ref = make_ref(variant, shape[1], groups, seed=5, dtype=dtype, device=dev)
    x, identity, gy = (t.to(dev) for t in _inputs(shape, dtype, "nchw", "nchw", identity_offset=1))
    assert identity.data_ptr() % 16 != 0
    F = _fused_run(backend, variant, ref, x, identity, gy)
    mask = F["out"] > 0
    R = _reference_run(
        clone_as(ref, torch.float64), x.double(), identity.double(), gy.double(), mask
    )
    assert_close_to_reference(F, R, dtype, eager=_reference_run(ref, x, identity, gy, mask))


@pytest.mark.parametrize("backend", ["cpu", "emulated", "cuda"], indirect=True)
@pytest.mark.parametrize("misaligned", ["grad_out", "out"])
@pytest.mark.parametrize("x_format", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_backward_misaligned(backend, variant, dtype, x_format, misaligned):
    """grad_out or out one element past an aligned address, x aligned, on the vector paths: the
    CUDA kernels read out with grad_out and write grad_identity beside them (sa_grad.cuh), so a
    misaligned one must drop the packs to one element (the emulator faults on a misaligned
    pack). Bit for bit the plain backward of the masked gradient."""
    shape, groups = (1, 8, 30, 32), 2
    _assert_masked_backward(backend, variant, shape, groups, dtype, x_format, (misaligned,))


@pytest.mark.parametrize("backend", ["cpu", "emulated", "cuda"], indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_all_or_nothing(backend, variant):
    """identity far above every SA(x): out = SA(x) + identity and the plain op's gradients, bit for
    bit; far below: out and every gradient exactly zero."""
    shape, groups = (2, 32, 7, 9), 4
    dev = backend.device
    ref = make_ref(variant, shape[1], groups, seed=5, device=dev)
    params = [p.detach() for p in params_in_op_order(variant, ref)]
    x = make_input(shape, seed=1, device=dev)
    gy = make_input(shape, seed=2, device=dev)
    plain, mean, rstd = backend.forward_op(variant)(x, groups, *params, 1e-5)
    plain_grads = backend.backward_op(variant)(gy, x, mean, rstd, groups, *params)
    for level in (1e4, -1e4):
        identity = torch.full(shape, level, device=dev)
        out, mean_r, rstd_r = backend.residual_forward_op(variant)(
            x, identity, groups, *params, 1e-5
        )
        assert torch.equal(mean_r, mean) and torch.equal(rstd_r, rstd)
        grads = backend.residual_backward_op(variant)(gy, out, x, mean, rstd, groups, *params)
        if level > 0:
            assert torch.equal(out, plain + identity)
            assert torch.equal(grads[1], gy)
            for g, w in zip((grads[0], *grads[2:]), plain_grads):
                assert torch.equal(g, w)
        else:
            assert torch.equal(out, torch.zeros_like(out))
            for g in grads:
                assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_gradcheck(variant):
    """float64 gradcheck of the autograd.Function with the epilogue (x, identity, parameters); the
    inputs keep SA(x) + identity away from relu's kink."""
    shape, groups = (2, 8, 3, 4), 2
    ref = make_ref(variant, shape[1], groups, seed=5, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_(True) for p in params_in_op_order(variant, ref)]
    x = make_input(shape, seed=1, dtype=torch.float64).requires_grad_(True)
    identity = make_input(shape, seed=3, dtype=torch.float64)
    with torch.no_grad():
        sa = ref(x)
        identity += torch.where(sa + identity > 0, 0.5, -0.5)  # |SA(x) + identity| > 0.5
    identity.requires_grad_(True)

    def fn(x, identity, *params):
        return SA_CUDA_LIBRARY.apply(variant, x, groups, params, 1e-5, identity)

    assert torch.autograd.gradcheck(fn, (x, identity, *params), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_result_dtype(variant):
    """The functional returns what eager's relu(layer(x) + identity) returns: a float32 identity
    promotes a bfloat16 layer's output outside autocast, and the values follow."""
    shape, groups = (2, 16, 5, 4), 2
    ref = make_ref(variant, shape[1], groups, seed=5).to(torch.bfloat16)
    fused = sa_cuda.SALayer if variant == "sa_layer" else sa_cuda.ShuffleAttention
    module = fused(shape[1], groups).to(torch.bfloat16)
    module.load_state_dict(ref.state_dict())
    x = make_input(shape, seed=1, dtype=torch.bfloat16)
    identity = make_input(shape, seed=3, dtype=torch.float32)
    eager = torch.relu(ref(x) + identity)
    got = module(x, identity=identity)
    assert got.dtype == eager.dtype == torch.float32
    want = torch.relu(clone_as(ref, torch.float64)(x.double()) + identity.double())
    assert (got.double() - want).abs().max() <= 2 * (eager.double() - want).abs().max() + 1e-6


# ------------------------------------------------------------------------------------------------
# The residual ops as ops: opcheck (schema, fake kernels, AOT dispatch), torch.compile, bad inputs
# ------------------------------------------------------------------------------------------------
def _op_args(variant, shape, groups, dtype, memory_format=torch.contiguous_format):
    ref = make_ref(variant, shape[1], groups, seed=7, dtype=dtype)
    params = [p.detach() for p in params_in_op_order(variant, ref)]
    x, identity, gy = (
        make_input(shape, seed=s, dtype=dtype).contiguous(memory_format=memory_format)
        for s in (8, 10, 9)
    )
    return x, identity, gy, params


@pytest.mark.parametrize("backend", ["cpu", "emulated"], indirect=True)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_opcheck(backend, variant, dtype, memory_format):
    x, identity, gy, params = _op_args(variant, (2, 48, 5, 3), 4, dtype, memory_format)
    forward, backward = backend.residual_forward_op(variant), backend.residual_backward_op(variant)
    torch.library.opcheck(forward, (x, identity, 4, *params, 1e-5))
    out, mean, rstd = forward(x, identity, 4, *params, 1e-5)
    torch.library.opcheck(backward, (gy, out, x, mean, rstd, 4, *params))
    x0, identity0, gy0, out0 = x[:0], identity[:0], gy[:0], out[:0]  # an empty batch
    torch.library.opcheck(forward, (x0, identity0, 4, *params, 1e-5))
    _, mean0, rstd0 = forward(x0, identity0, 4, *params, 1e-5)
    torch.library.opcheck(backward, (gy0, out0, x0, mean0, rstd0, 4, *params))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_residual_compile_fullgraph(memory_format):
    """A bottleneck tail through torch.compile(fullgraph=True), training and inference: one
    graph, the compiled values equal the eager fused ones."""
    torch._dynamo.reset()
    shape, groups = (2, 32, 5, 7), 4
    layer = sa_cuda.SALayer(shape[1], groups)
    layer.load_state_dict(make_ref("sa_layer", shape[1], groups, seed=5).state_dict())
    conv = torch.nn.Conv2d(shape[1], shape[1], 1)

    def tail(x, identity):
        return layer(conv(x), identity=identity)

    x, identity, gy, _ = _op_args("sa_layer", shape, groups, torch.float32, memory_format)
    compiled = torch.compile(tail, fullgraph=True)
    runs = []
    for fn in (tail, compiled):
        xl, il = x.clone().requires_grad_(True), identity.clone().requires_grad_(True)
        out = fn(xl, il)
        out.backward(gy)
        with torch.no_grad():
            inference = fn(x, identity)
        runs.append((out.detach(), xl.grad, il.grad, conv.weight.grad.clone(), inference))
        conv.weight.grad = None
        layer.zero_grad()
    for got, want in zip(*reversed(runs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_bad_inputs(variant):
    """identity (forward) and out (backward) of another shape or dtype, or not a dense kernel-dtype
    tensor: a clear error naming the argument from the raw op (the C++ check), the meta device
    (the fake kernel) and the functional, never a crash."""
    shape, groups = (2, 16, 3, 4), 2
    x, identity, gy, params = _op_args(variant, shape, groups, torch.float32)
    forward = SA_CUDA_LIBRARY.residual_forward_op(variant)
    backward = SA_CUDA_LIBRARY.residual_backward_op(variant)
    out, mean, rstd = forward(x, identity, groups, *params, 1e-5)
    wrong_shape = make_input((2, 16, 4, 3))
    cases = [
        (wrong_shape, r"identity must have x's shape \[2, 16, 3, 4\], got \[2, 16, 4, 3\]"),
        (identity.double(), r"identity must have x's dtype"),
        (identity.int(), r"identity must be float64, float32, float16 or bfloat16"),
    ]
    for bad, message in cases:
        for device in ("cpu", "meta"):
            args = [t.to(device) for t in (x, bad, *params)]
            with pytest.raises((RuntimeError, ValueError), match=message):
                forward(args[0], args[1], groups, *args[2:], 1e-5)
    for bad, message in cases[:2]:
        message = message.replace("identity", "out")
        with pytest.raises((RuntimeError, ValueError), match=message):
            backward(gy, bad, x, mean, rstd, groups, *params)
        with pytest.raises(ValueError, match=message):
            backward(*(t.to("meta") for t in (gy, bad, x, mean, rstd)), groups, *params)
    fused = SA_CUDA_LIBRARY.apply
    with pytest.raises(ValueError, match=re.escape("identity must have x's shape")):
        fused(variant, x, groups, tuple(params), 1e-5, wrong_shape)
    with pytest.raises(ValueError, match="identity must be a torch.Tensor"):
        fused(variant, x, groups, tuple(params), 1e-5, 1.0)
    with pytest.raises((RuntimeError, ValueError), match="identity is on meta but x is on cpu"):
        forward(x, identity.to("meta"), groups, *params, 1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_create_graph(variant):
    """create_graph=True: first-order gradients as without it (torch.func.grad needs them);
    differentiating them again raises instead of dropping the kernel's second derivative."""
    shape, groups = (2, 16, 3, 4), 2
    x, identity, gy, params = _op_args(variant, shape, groups, torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, identity, *params)]

    def grads(create_graph):
        out = SA_CUDA_LIBRARY.apply(variant, leaves[0], groups, leaves[2:], 1e-5, leaves[1])
        return torch.autograd.grad(out, leaves, gy, create_graph=create_graph)

    plain, graphed = grads(False), grads(True)
    for g, w in zip(graphed, plain):
        assert torch.equal(g.detach(), w)
    for g in (graphed[0], graphed[1]):  # grad_x, and grad_identity: hung on x's graph
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(g.sum(), leaves[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_negative_views_read_as_their_values(variant):
    """identity and out given as torch._neg_view(-t) (t's values, negated memory) give the results
    of the materialized tensors, not of their raw memory."""
    shape, groups = (2, 8, 5, 3), 2
    x, identity, gy, params = _op_args(variant, shape, groups, torch.float64)
    forward = SA_CUDA_LIBRARY.residual_forward_op(variant)
    backward = SA_CUDA_LIBRARY.residual_backward_op(variant)
    want = forward(x, identity, groups, *params, 1e-5)
    got = forward(x, torch._neg_view(-identity), groups, *params, 1e-5)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    out, mean, rstd = want
    want = backward(gy, out, x, mean, rstd, groups, *params)
    got = backward(gy, torch._neg_view(-out), x, mean, rstd, groups, *params)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
