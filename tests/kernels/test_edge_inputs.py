"""Edge inputs, on every backend (cpu, emulated, cuda: the ``backend`` fixture): empty batches,
single-pixel and very large planes, constant planes (variance 0, with eps > 0 and eps = 0), large
magnitudes with a small spread, and NaN / +-Inf in x or in a parameter, for both variants.

Accuracy: sa_cuda.testing.assert_close_to_reference (fp32/fp64 against the float64 reference);
where the reference has NaN/Inf, the fused result must have them at exactly the same entries.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    VARIANTS,
    all_grads,
    make_input,
    make_ref,
    params_in_op_order,
    ref_functional,
    run_high_precision,
)

from sa_cuda.reference import _merge
from sa_cuda.testing import (
    TEST_FP32_REL,
    accuracy_bound,
    assert_close_to_reference,
    max_abs,
    max_err,
)


# ================================================================================================
# Edge inputs
# ================================================================================================
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"]
)
@pytest.mark.parametrize("channels,groups", [(16, 2), (64, 8)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_batch(backend, variant, channels, groups, dtype):
    """B = 0: an empty result of the right shape and dtype (module, functional, raw op), an empty
    grad_x, and every parameter gradient present and exactly zero (the reference itself cannot run
    B = 0: its reshape(b * groups, -1, h, w) is ambiguous)."""
    dev = backend.device
    ref = make_ref(variant, channels, groups, seed=3, device=dev)
    fused = backend.module_like(variant, ref, dtype=dtype)
    shape = (0, channels, 5, 6)
    x = torch.randn(shape, dtype=dtype, device=dev, requires_grad=True)
    y = fused(x)
    assert y.shape == shape and y.dtype == dtype
    y.backward(torch.randn(shape, dtype=dtype, device=dev))
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == dtype
    for name, p in fused.named_parameters():
        assert p.grad is not None, name
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype, name
        assert torch.count_nonzero(p.grad) == 0, name
    params = [p.detach() for p in params_in_op_order(variant, ref)]
    assert backend.apply(variant, x.detach(), groups, params).shape == shape
    out, mean, rstd = backend.forward_op(variant)(x.detach(), groups, *params, 1e-5)
    assert out.shape == x.shape and mean.shape == (0, channels) and rstd.shape == (0, channels)
    with torch.no_grad():
        assert fused(x).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "shape,groups",
    [((3, 16, 1, 1), 4), ((2, 4, 1, 1), 2), ((4, 64, 1, 1), 8)],
    ids=["m2", "m1", "m4"],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_single_pixel_planes(backend, variant, shape, groups, dtype):
    """H * W = 1: variance 0, rstd = 1 / sqrt(eps), xh = 0, d gn.weight = 0 exactly."""
    Fu, E, R = run_high_precision(variant, backend, shape, groups, dtype=dtype)
    assert_close_to_reference(Fu, R, dtype, eager=E)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_large_plane_512x512(backend, variant):
    """One 512 x 512 plane per channel (B = 1, C = 4, G = 1): 262144-element reductions, against
    the float64 reference with the fp32 criterion."""
    Fu, E, R = run_high_precision(variant, backend, (1, 4, 512, 512), 1)
    assert_close_to_reference(Fu, R, torch.float32, eager=E)


# ------------------------------------------------------------------------------------------------
# Constant planes (variance 0)
# ------------------------------------------------------------------------------------------------
CONST_SHAPES = [
    pytest.param((2, 16, 6, 5), 2, id="warp-2x16x6x5"),
    pytest.param((2, 16, 40, 40), 2, id="block-2x16x40x40"),
    pytest.param((1, 8, 72, 64), 2, id="streamed-1x8x72x64"),
    # the CPU's channels_last backward by rows (m = 4, C / 2 = 16)
    pytest.param((2, 32, 9, 10), 4, id="rows-2x32x9x10"),
]
CONSTANTS = (0.5, -2.0, 3.0, 0.0, 1.25, -0.75, 7.0, 100.0)


def constant_planes_input(shape, groups):
    """Random x with constant planes: batch item 0's group 0 entirely constant (both branches,
    values 0.5, -2, 3, 0, ...: exactly representable, so the true variance is exactly 0), and
    in batch item 1 (if any) every channel-branch plane all zeros (a dead ReLU channel), and the
    spatial plane k = 0 of every group set to 3."""
    B, C, H, W = shape
    m = C // (2 * groups)
    x = make_input(shape, seed=1)
    for j in range(2 * m):
        x[0, j] = CONSTANTS[j % len(CONSTANTS)]
    if B > 1:
        v = x[1].view(groups, 2, m, H, W)
        v[:, 0] = 0.0
        v[:, 1, 0] = 3.0
    const = torch.zeros(B, C, dtype=torch.bool)
    const[0, : 2 * m] = True
    if B > 1:
        const[1].view(groups, 2, m)[:, 0] = True
        const[1].view(groups, 2, m)[:, 1, 0] = True
    return x, const


def check_masks_and_values(Fu, R, E=None, what="reference"):
    """NaN and +-Inf exactly where ``R`` has them; the finite entries within the fp32
    accuracy_bound (TEST_FP32_REL; eager's error measured on the entries where eager is finite)."""
    problems = []
    for key in Fu:
        f, r = Fu[key].double(), R[key].double()
        if not torch.equal(f.isnan(), r.isnan()):
            differ = int((f.isnan() != r.isnan()).sum())
            problems.append(
                f"{key}: NaN at {int(f.isnan().sum())} entries, {what} at "
                f"{int(r.isnan().sum())} (differ at {differ})"
            )
            continue
        if not (
            torch.equal(f == math.inf, r == math.inf)
            and torch.equal(f == -math.inf, r == -math.inf)
        ):
            problems.append(
                f"{key}: +-Inf at {int(f.isinf().sum())} entries, {what} at {int(r.isinf().sum())}"
            )
            continue
        fin = torch.isfinite(r)
        if not fin.any():
            continue
        err = max_err(f[fin], r[fin])
        err_eager = None
        if E is not None:
            e = E[key].double()[fin]
            ok = torch.isfinite(e)
            if ok.any():
                err_eager = max_err(e[ok], r[fin][ok])
        bound = accuracy_bound(torch.float32, max_abs(r[fin]), err_eager, rel=TEST_FP32_REL)
        if not err <= bound:
            problems.append(f"{key}: finite entries max|fused - {what}| = {err:.3g} > {bound:.3g}")
    return problems


# Every backend reads channels_last as it is, with NHWC kernels of its own (statistics summed in
# their own order): the edge cases run in both layouts.
LAYOUTS = [
    pytest.param(torch.contiguous_format, id="nchw"),
    pytest.param(torch.channels_last, id="channels_last"),
]


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("eps", [1e-5, 0.0], ids=["eps1e-5", "eps0"])
@pytest.mark.parametrize("shape,groups", CONST_SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_constant_planes(backend, variant, shape, groups, eps, memory_format):
    """Variance 0 behaves as in the reference: with eps > 0, rstd = 1 / sqrt(eps) and every output
    and gradient is finite and matches the float64 reference (fp32 criterion); with eps = 0 (allowed
    by the API), NaN/Inf appear exactly where the reference has them (the spatial branch of a
    constant plane, 0 * inf) and the rest matches. The channel branch never uses rstd, so a
    constant channel-branch plane gives finite results for any eps."""
    x, const = constant_planes_input(shape, groups)
    Fu, E, R = run_high_precision(
        variant, backend, shape, groups, x=x, eps=eps, memory_format=memory_format
    )
    if eps > 0:
        for key, t in Fu.items():
            assert torch.isfinite(t).all(), f"{key}: {int((~torch.isfinite(t)).sum())} non-finite"
        assert_close_to_reference(Fu, R, torch.float32, eager=E)
        ref = make_ref(variant, shape[1], groups, seed=11, device=backend.device)
        params = [p.detach() for p in params_in_op_order(variant, ref)]
        x = x.to(backend.device).contiguous(memory_format=memory_format)
        _, mean, rstd = backend.forward_op(variant)(x, groups, *params, eps)
        B, C = shape[:2]
        const = const.to(backend.device)
        assert torch.equal(mean[const], x.view(B, C, -1)[..., 0][const]), "mean of a constant plane"
        torch.testing.assert_close(
            rstd[const], torch.full_like(rstd[const], 1.0 / math.sqrt(eps)), rtol=1e-6, atol=0
        )
    else:
        problems = check_masks_and_values(Fu, R, E)
        assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# Large magnitude, small spread: x = 1e4 + randn
# ------------------------------------------------------------------------------------------------
# backend, (B, C, H, W), groups: the CUDA kernels (emulated, cuda) on their warp and streamed paths
MAGNITUDE_CASES = [
    pytest.param("cpu", (2, 64, 16, 16), 8, id="cpu-2x64x16x16"),
    pytest.param("cpu", (3, 16, 1, 1), 4, id="cpu-hw1"),
] + [
    pytest.param(b, shape, g, id=f"{b}-{path}")
    for b in ("emulated", "cuda")
    for shape, g, path in (
        ((2, 16, 7, 9), 2, "warp-2x16x7x9"),
        ((1, 4, 64, 72), 1, "streamed-1x4x64x72"),
        # 1x1 planes: xh = 0 and dy = mean(dy), so the input gradient's spatial term is a pure
        # cancellation (dy - d1) times a large alpha (r = 1 / sqrt(eps)).
        ((3, 16, 1, 1), 4, "hw1"),
    )
]


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("backend,shape,groups", MAGNITUDE_CASES, indirect=["backend"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_large_magnitude_small_spread(backend, variant, shape, groups, memory_format):
    """x = 1e4 + randn in float32 (ulp(1e4) ~ 1e-3 = 1e-3 of the spread): the fused result's
    error against the float64 reference must be no worse than 2x the eager float32 reference's.

    The comparison is pooled over 4 independent draws (sum of max errors per output/gradient):
    at this magnitude every float32 implementation's error is dominated by the rounding of the
    per-plane mean to float32 (up to ~5e-4 of the spread), so for ONE draw the ratio of two
    implementations' errors on a parameter gradient (a sum over planes, where those per-plane
    errors cancel by chance) ranges over 0.1..2.5 (measured over 6 draws); the sum over draws
    estimates the typical error. One float32 unit at the largest magnitude is added per draw (for
    gradients the eager reference gets exactly, e.g. 0)."""
    err_fused, err_eager, unit = {}, {}, {}
    for s in range(4):
        Fu, E, R = run_high_precision(
            variant,
            backend,
            shape,
            groups,
            seeds=(s, 100 + s, 200 + s),
            offset=1e4,
            memory_format=memory_format,
        )
        for key in Fu:
            assert torch.isfinite(Fu[key]).all(), key
            err_fused[key] = err_fused.get(key, 0.0) + max_err(Fu[key], R[key])
            err_eager[key] = err_eager.get(key, 0.0) + max_err(E[key], R[key])
            unit[key] = unit.get(key, 0.0) + torch.finfo(torch.float32).eps * max_abs(R[key])
    bad = [
        f"{k}: sum of max|fused - ref64| = {err_fused[k]:.3g} > 2 * eager {err_eager[k]:.3g} "
        f"+ {unit[k]:.3g}"
        for k in err_fused
        if not err_fused[k] <= 2 * err_eager[k] + unit[k]
    ]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------------
# NaN / Inf propagation
# ------------------------------------------------------------------------------------------------
def literal_layer(variant, x, groups, p0, p1, p2, p3, gn_weight, gn_bias, eps=1e-5):
    """The published layer evaluated literally, op by op (GroupNorm written out as
    (x - mean) / sqrt(var + eps) * gamma + beta). Same function as sa_cuda.reference; it differs
    only in how non-finite values propagate where torch's group_norm kernel folds gamma * rstd
    into one scale (gamma = inf: inf * x - inf * mean = NaN, where the literal form gives +-inf)."""
    b, c, h, w = x.shape
    x0, x1 = x.reshape(b * groups, -1, h, w).chunk(2, dim=1)
    m = x0.shape[1]

    def gate(v, weight, bias):
        if variant == "sa_layer":
            return weight.reshape(1, m, 1, 1) * v + bias.reshape(1, m, 1, 1)
        return F.conv2d(v, weight.reshape(m, m, 1, 1), bias.reshape(m))

    mu0 = x0.mean((2, 3), keepdim=True)
    xn = x0 * torch.sigmoid(gate(mu0, p0, p1))
    mu1 = x1.mean((2, 3), keepdim=True)
    var1 = ((x1 - mu1) ** 2).mean((2, 3), keepdim=True)
    y = (x1 - mu1) / torch.sqrt(var1 + eps) * gn_weight.reshape(1, m, 1, 1) + gn_bias.reshape(
        1, m, 1, 1
    )
    return _merge(xn, x1 * torch.sigmoid(gate(y, p2, p3)), b)


def nonfinite_check(variant, backend, x, groups, params, gy):
    """The fused result must have the NaN/Inf pattern of the reference (sa_cuda.reference) or of the
    literal evaluation of the same formula, and the finite entries must match that oracle
    (against float64, bound 2x the float32 oracle's own error or 1e-5 relative)."""
    dev = backend.device
    x, gy, params = x.to(dev), gy.to(dev), [p.to(dev) for p in params]
    Fu = all_grads(lambda x_, *p: backend.apply(variant, x_, groups, p), x, params, gy)
    reports = []
    for name, fn in (
        ("reference", ref_functional(variant)),
        ("literal formula", lambda x_, g, *p: literal_layer(variant, x_, g, *p)),
    ):
        O32 = all_grads(lambda x_, *p: fn(x_, groups, *p), x, params, gy)
        O64 = all_grads(
            lambda x_, *p: fn(x_, groups, *p), x.double(), [p.double() for p in params], gy.double()
        )
        # the NaN/Inf pattern of the float32 oracle (float64 can round differently at saturation)
        problems = [
            p for p in check_masks_and_values(Fu, O32, what=name) if "finite entries" not in p
        ]
        if not problems:
            for key in O64:  # values: float64 oracle where both oracles are finite
                keep = torch.isfinite(O32[key])
                O64[key] = torch.where(keep, O64[key], O32[key].double())
            problems = check_masks_and_values(Fu, O64, O32, what=name + " (fp64)")
        if not problems:
            return
        reports.append(f"vs the {name}:\n  " + "\n  ".join(problems))
    pytest.fail("fused result matches neither oracle\n" + "\n".join(reports))


NONFINITE_X_CASES = [
    pytest.param((2, 16, 5, 6), "first", id="warp-first"),
    pytest.param((2, 16, 5, 6), "middle", id="warp-middle"),
    pytest.param((1, 16, 40, 40), "first", id="block-first"),
    pytest.param((1, 16, 40, 40), "middle", id="block-middle"),
    pytest.param((1, 16, 72, 64), "middle", id="streamed-middle"),
    pytest.param((2, 16, 1, 1), "first", id="hw1"),
    # C = 32, G = 4: the CPU's channels_last backward by rows (m = 4, C / 2 = 16)
    pytest.param((2, 32, 5, 6), "middle", id="rows-middle"),
    pytest.param((1, 32, 40, 40), "first", id="rows-first"),
]
VALUES = [
    pytest.param(math.nan, id="nan"),
    pytest.param(math.inf, id="inf"),
    pytest.param(-math.inf, id="-inf"),
]


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("shape,where", NONFINITE_X_CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_nonfinite_x_propagates_like_reference(
    backend, variant, shape, where, value, memory_format
):
    """NaN / +-Inf in x (m = 4: G = C / 8): one value in a channel-branch plane (batch 0, channel
    3) and one in a spatial-branch plane (last batch item, channel 12), at the plane's first or
    middle element.
    The reference: a NaN poisons its plane's mean (and, ShuffleAttention, its group's gate); an Inf
    makes the channel-branch mean +-Inf, which saturates the gate (s = 0 or 1: the plane's other
    outputs stay finite), and the spatial-branch variance NaN (whole plane NaN)."""
    groups = shape[1] // 8
    ref = make_ref(variant, shape[1], groups, seed=1)
    params = [p.detach() for p in params_in_op_order(variant, ref)]
    x = make_input(shape, seed=0)
    idx = 0 if where == "first" else (shape[2] * shape[3]) // 2
    x[0, 3].view(-1)[idx] = value
    x[-1, 12].view(-1)[idx] = value
    x = x.contiguous(memory_format=memory_format)
    gy = make_input(shape, seed=1).contiguous(memory_format=memory_format)
    nonfinite_check(variant, backend, x, groups, params, gy)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize(
    "index",
    range(6),
    ids=["p0-channel_w", "p1-channel_b", "p2-spatial_w", "p3-spatial_b", "p4-gn_w", "p5-gn_b"],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_nonfinite_parameter_propagates_like_reference(backend, variant, index, value):
    """NaN / +-Inf in one entry (k = 1) of one parameter. The oracle is the reference or, where
    they differ (gn.weight = +-Inf: torch's group_norm folds gamma * rstd, inf * x - inf * mu =
    NaN), the literal evaluation of the formula."""
    ref = make_ref(variant, 16, 2, seed=1)
    params = [p.detach().clone() for p in params_in_op_order(variant, ref)]
    params[index].view(-1)[1] = value
    shape = (2, 16, 5, 6)
    nonfinite_check(
        variant, backend, make_input(shape, seed=0), 2, params, make_input(shape, seed=1)
    )
