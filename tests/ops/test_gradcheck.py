"""torch.autograd.gradcheck (float64) of the fused functionals w.r.t. x and all six parameters.

gradcheck compares the analytic backward (the fused backward kernel) with central finite
differences of the fused forward kernel, so it checks the backward against the forward
independently of the reference implementation. Parameters are random (see conftest.randomize_).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    VARIANTS,
    functional,
    make_fused_like,
    make_input,
    make_ref,
    params_in_op_order,
    ref_functional,
)

# (B, C, H, W), groups -> m = C / (2 * groups)
CASES = [
    pytest.param((2, 8, 3, 4), 2, id="m2-2x8x3x4-g2"),
    pytest.param((1, 12, 2, 3), 3, id="m2-1x12x2x3-g3"),
    pytest.param((1, 12, 3, 2), 2, id="m3-1x12x3x2-g2"),
    pytest.param((2, 4, 3, 3), 2, id="m1-2x4x3x3-g2"),
    pytest.param((2, 8, 1, 1), 2, id="hw1-2x8x1x1-g2"),
    pytest.param((2, 6, 2, 5), 1, id="g1-m3-2x6x2x5"),
]


def _inputs(variant, shape, groups, seed=0):
    ref = make_ref(variant, shape[1], groups, seed=seed, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_(True) for p in params_in_op_order(variant, ref)]
    x = make_input(shape, seed=seed + 1, dtype=torch.float64).requires_grad_(True)
    return x, params


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(variant, shape, groups, layout):
    """channels_last: x is read in NHWC by the CPU kernels (gradcheck's grad_out is NCHW, so the
    backward also meets a mixed pair)."""
    x, params = _inputs(variant, shape, groups)
    if layout == "channels_last":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    fn = functional(variant)

    def f(x, *params):
        return fn(x, groups, *params)

    # The forward itself must be the reference function (else gradcheck would certify the gradient
    # of a wrong function).
    torch.testing.assert_close(
        f(x, *params), ref_functional(variant)(x, groups, *params), rtol=1e-10, atol=1e-10
    )
    assert torch.autograd.gradcheck(
        f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=False
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_flat_parameter_shapes(variant):
    """The functionals also accept (m,) vectors and (m, m) matrices; gradients keep those shapes."""
    shape, groups = (2, 12, 3, 2), 2
    x, params = _inputs(variant, shape, groups, seed=5)
    m = shape[1] // (2 * groups)
    matrices = (0, 2) if variant == "shuffle_attention" else ()
    flat = [
        p.detach().reshape((m, m) if i in matrices else (m,)).clone().requires_grad_(True)
        for i, p in enumerate(params)
    ]
    fn = functional(variant)

    def f(x, *ps):
        return fn(x, groups, *ps)

    out = f(x, *flat)
    torch.testing.assert_close(out, f(x, *params), rtol=0, atol=0)
    gy = make_input(shape, seed=9, dtype=torch.float64)
    grads = torch.autograd.grad(out, [x, *flat], gy)
    for g, p in zip(grads, [x, *flat]):
        assert g.shape == p.shape
    assert torch.autograd.gradcheck(f, (x, *flat), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_partial_requires_grad(variant):
    """Only some inputs require grad: those get the same gradients as when all do, the others
    get none (ShuffleAttentionFunction honours needs_input_grad)."""
    shape, groups = (2, 8, 3, 4), 2
    x, params = _inputs(variant, shape, groups, seed=2)
    fn = functional(variant)
    gy = make_input(shape, seed=3, dtype=torch.float64)
    full = torch.autograd.grad(fn(x, groups, *params), [x, *params], gy)

    x2 = x.detach()
    p2 = [p.detach().requires_grad_(i in (1, 4)) for i, p in enumerate(params)]
    out = fn(x2, groups, *p2)
    out.backward(gy)
    assert x2.grad is None
    for i, p in enumerate(p2):
        if i in (1, 4):
            torch.testing.assert_close(p.grad, full[1 + i], rtol=0, atol=0)
        else:
            assert p.grad is None


@pytest.mark.parametrize("how", ["squared-loss", "grad-out-requires-grad"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_double_backward_raises(variant, how):
    """The backward is a fused kernel: differentiating a gradient of the fused op must raise, not
    silently give a second derivative without the kernel's part. create_graph=True alone works and
    gives the right first derivative (torch.func.grad runs that way); a plain backward's gradient
    has no graph."""
    ref = make_ref(variant, 16, 2, seed=1)
    fused = make_fused_like(variant, ref)
    x = make_input((2, 16, 5, 6), seed=2).requires_grad_(True)
    y = fused(x)
    if how == "squared-loss":
        (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        (want,) = torch.autograd.grad((y * y).sum(), x, retain_graph=True)
    else:
        gy = make_input(y.shape, seed=3).requires_grad_(True)
        (g,) = torch.autograd.grad(y, x, gy, create_graph=True)
        (want,) = torch.autograd.grad(y, x, gy.detach())
    torch.testing.assert_close(g.detach(), want, rtol=0, atol=0)
    assert want.grad_fn is None
    with pytest.raises(RuntimeError, match="double backward"):
        g.pow(2).sum().backward()


@pytest.mark.parametrize("variant", VARIANTS)
def test_double_backward_never_silently_wrong(variant):
    """A gradient penalty (WGAN-GP style: grad of y.sum() with create_graph=True, its norm added to
    the loss) needs the second derivative. The fused op must raise, never return a gradient that
    silently has no graph (the penalty's parameter gradient would then be dropped without a word)."""
    ref = make_ref(variant, 16, 2, seed=1)
    fused = make_fused_like(variant, ref)
    x = make_input((2, 16, 5, 6), seed=2).requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward"):
        y = fused(x)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (y.mean() + g.pow(2).sum()).backward()
