"""Parameters in their own dtypes: the kernels read each of the six parameters in its dtype
(csrc/sa_math.h: ParamView) instead of the host casting them to the compute dtype on every call,
which cost a cast kernel per parameter and pass on the GPU (docs/gpu.md, section 8).

The conversion on read must be exactly the cast it replaces: every output of the raw ops with the
parameters in four different dtypes equals, bit for bit, the output with the parameters cast
first."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, make_input, make_ref, params_in_op_order

PARAM_DTYPES = (torch.float64, torch.bfloat16, torch.float16, torch.float32)


def _params(variant, C, groups, dtypes, device):
    ref = make_ref(variant, C, groups, seed=3, dtype=torch.float64, device=device)
    return [p.detach().to(d) for p, d in zip(params_in_op_order(variant, ref), dtypes)]


def _acc(x_dtype):
    return torch.float64 if x_dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("rotation", range(4))
@pytest.mark.parametrize(
    "x_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str
)
@pytest.mark.parametrize(
    "shape,groups",
    [
        pytest.param((2, 48, 5, 3), 4, id="warp-team"),
        pytest.param((1, 8, 20, 20), 2, id="block-team"),
    ],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_parameter_dtypes_equal_the_cast_parameters(
    backend, variant, shape, groups, x_dtype, rotation
):
    dtypes = [PARAM_DTYPES[(i + rotation) % 4] for i in range(6)]
    params = _params(variant, shape[1], groups, dtypes, backend.device)
    cast = [p.to(_acc(x_dtype)) for p in params]
    x = make_input(shape, seed=4, dtype=x_dtype, device=backend.device)
    gy = make_input(shape, seed=5, dtype=x_dtype, device=backend.device)
    fwd, bwd = backend.forward_op(variant), backend.backward_op(variant)

    outs = fwd(x, groups, *params, 1e-5)
    outs_cast = fwd(x, groups, *cast, 1e-5)
    for got, want in zip(outs, outs_cast):
        assert torch.equal(got, want)

    _, mean, rstd = outs
    grads = bwd(gy, x, mean, rstd, groups, *params)
    grads_cast = bwd(gy, x, mean, rstd, groups, *cast)
    assert torch.equal(grads[0], grads_cast[0])
    for p, got, want in zip(params, grads[1:], grads_cast[1:]):
        assert got.dtype == p.dtype and got.shape == p.shape
        # Both are the same double total, stored once in the parameter's dtype (got) or in acc_t
        # (want): rounded through acc_t and then to the parameter's dtype, they are the same bits.
        acc = want.dtype
        assert torch.equal(got.to(acc).to(p.dtype), want.to(p.dtype))


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_parameters_launch_no_cast(variant):
    """A bfloat16 model's forward and backward copy no parameter: before, the host cast each of
    the six to float32 on every call (12 aten::copy_ per forward + backward)."""
    shape, groups = (2, 48, 5, 3), 4
    params = _params(variant, shape[1], groups, [torch.bfloat16] * 6, "cpu")
    x = make_input(shape, seed=4, dtype=torch.bfloat16)
    gy = make_input(shape, seed=5, dtype=torch.bfloat16)
    fwd = getattr(torch.ops.sa_cuda, f"{variant}_forward")
    bwd = getattr(torch.ops.sa_cuda, f"{variant}_backward")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _, mean, rstd = fwd(x, groups, *params, 1e-5)
        bwd(gy, x, mean, rstd, groups, *params)
    names = [e.name for e in prof.events()]
    assert f"sa_cuda::{variant}_forward" in names and f"sa_cuda::{variant}_backward" in names
    copies = [n for n in names if n in ("aten::copy_", "aten::_to_copy", "aten::to")]
    assert copies == []
