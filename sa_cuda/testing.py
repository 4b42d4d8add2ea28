"""Accuracy criteria of sa_cuda, shared by the test suite (tests/) and the benchmarks (benchmarks/).

A fused result (output or gradient) is compared with the float64 reference (sa_cuda.reference run
in float64 on the same inputs and parameter values) and with eager PyTorch in the fused result's
own dtype (the error the framework itself makes in that dtype):

- ``accuracy_bound``: the largest error accepted for one tensor (the rule, for every dtype);
- ``assert_close_to_reference``: that rule applied to every output and gradient of a run;
- ``assert_extreme_close`` / ``assert_true_statistics``: the rules for planes at the extremes of
  the floating-point range (where eager itself overflows) and for the per-plane statistics.

Why these rules (measured errors, the flash-attention criterion): docs/design.md, "Numerics".
"""

from __future__ import annotations

import torch

# fp32 check: max|fused - ref64| <= FP32_REL * max(1, max|ref64|) (or 2x the eager fp32 error,
# for ill-conditioned cases where even eager misses by more)
FP32_REL = 1e-4


def accuracy_bound(
    dtype: torch.dtype, max_abs_ref: float, err_eager: float | None, *, rel: float = FP32_REL
) -> float:
    """The largest max|fused - ref64| accepted for a tensor of ``dtype`` whose float64 reference
    has max|ref64| = ``max_abs_ref``, given eager's error in the same dtype (None: no eager).

    fp32 (and fp64): max(rel * max(1, max|ref64|), 2 * err_eager), rel = FP32_REL by default (the
    benchmarks' large shapes; the tests ask TEST_FP32_REL) and 1e-10 for fp64.
    bf16/fp16 (flash-attention criterion, docs/design.md, "Numerics"):
    2 * err_eager + eps(dtype) * max|ref64| + 1e-10 (2 * eps * max|ref64| without eager).
    """
    if dtype in (torch.float32, torch.float64):
        rel = rel if dtype == torch.float32 else 1e-10
        bound = rel * max(1.0, max_abs_ref)
        return bound if err_eager is None else max(bound, 2.0 * err_eager)
    eps = torch.finfo(dtype).eps
    if err_eager is None:
        return 2.0 * eps * max_abs_ref + 1e-10
    return 2.0 * err_eager + eps * max_abs_ref + 1e-10


# The tests' fp32 rule: their shapes are small enough that the fused op, which reduces its partial
# sums in fp64, stays within 1e-5 of max(1, max|ref64|) (measured <= 1.5e-6), while eager fp32
# misses the float64 truth of a parameter gradient (a sum over B*G*H*W terms) by up to ~2e-5: the
# bound is against float64, not against eager fp32, so that the tests test the fused op and not the
# reference's rounding. Where eager itself misses by more (H*W = 1: rstd = 1/sqrt(eps) ~ 316
# amplifies roundoff), 2x eager's error applies, as for bf16/fp16.
TEST_FP32_REL = 1e-5


def max_abs(t: torch.Tensor) -> float:
    """max|t| in float64 (0 for an empty tensor)."""
    return t.detach().double().abs().max().item() if t.numel() else 0.0


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| in float64 (0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_close_to_reference(
    fused: dict,
    ref64: dict,
    dtype: torch.dtype,
    *,
    eager: dict | None = None,
    eager_ref64: dict | None = None,
    param_dtype: torch.dtype | None = None,
    rel: float = TEST_FP32_REL,
) -> None:
    """Every tensor of ``fused`` (``{"out": ..., "x": grad_x, <parameter>: grad, ...}``, the
    results of one forward + backward on an input of ``dtype``) within ``accuracy_bound`` of the
    float64 run ``ref64`` of the same function (same input values, same parameter values).

    ``eager``: the same run by eager PyTorch in ``dtype`` (None where eager has no kernel for it);
    its error is measured against ``eager_ref64`` (default ``ref64``): the float64 run with eager's
    own parameter values, where those differ from the fused run's (bf16 parameters vs fp32 ones).
    Dtypes: out and grad_x in ``dtype``, the parameter gradients in ``param_dtype`` (default
    ``dtype``; fp32 for low-precision x with fp32 parameters).
    """
    assert set(fused) == set(ref64), (sorted(fused), sorted(ref64))
    eager_ref64 = ref64 if eager_ref64 is None else eager_ref64
    problems = []
    for key in fused:
        got, want = fused[key], ref64[key]
        assert got.shape == want.shape, f"{key}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        want_dtype = dtype if key in ("out", "x") else (param_dtype or dtype)
        assert got.dtype == want_dtype, f"{key}: {got.dtype}, expected {want_dtype}"
        err_eager = None if eager is None else max_err(eager[key], eager_ref64[key])
        bound = accuracy_bound(dtype, max_abs(want), err_eager, rel=rel)
        err = max_err(got, want)
        if not err <= bound:
            eager_says = "no eager" if err_eager is None else f"eager {dtype}: {err_eager:.3g}"
            problems.append(
                f"{key}: max|fused - ref64| = {err:.3g} > bound {bound:.3g} "
                f"({eager_says}, max|ref64| = {max_abs(want):.3g})"
            )
    assert not problems, "\n".join(problems)


# Planes at the extremes of the floating-point range (tests/kernels/test_extreme_magnitudes.py,
# whose docstring numbers these criteria 1-4). SLACK: units of the dtype at the largest magnitude
# by which the fused result may miss ref64 by more than eager does (fused and eager round the gate
# and the product x * s differently; measured <= 0.6). EXTREME_FP32_UNITS: fp32 units of the gate
# arithmetic allowed on top of the final rounding (measured <= 2.3).
SLACK = 2.0
EXTREME_FP32_UNITS = 8.0


def subnormal_spacing(dtype: torch.dtype) -> float:
    """The dtype's absolute resolution near 0 (the spacing of its subnormals)."""
    fi = torch.finfo(dtype)
    return fi.smallest_normal * fi.eps


def assert_extreme_close(
    fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """One output plane (or batch item) at an extreme magnitude: fused finite (1); within
    (eps(dtype) / 2 + EXTREME_FP32_UNITS eps(fp32)) max|ref64| + sub of ref64 (3); and, where eager
    is finite, no worse than eager + SLACK eps(dtype) max|ref64| + sub (2)."""
    eps, sub, eps32 = (
        torch.finfo(dtype).eps,
        subnormal_spacing(dtype),
        torch.finfo(torch.float32).eps,
    )
    fused, eager = fused.double(), eager.double()
    assert ref64.isfinite().all(), what
    assert fused.isfinite().all(), f"{what}: {int((~fused.isfinite()).sum())} non-finite outputs"
    scale = ref64.abs().max().item()
    err = (fused - ref64).abs()
    acc_bound = (eps / 2 + EXTREME_FP32_UNITS * eps32) * scale + sub
    assert err.max().item() <= acc_bound, (
        f"{what}: max|fused - ref64| = {err.max().item():.3g} > {acc_bound:.3g} "
        f"({err.max().item() / scale / eps:.2f} units of the dtype at max|ref64| = {scale:.3g})"
    )
    finite = eager.isfinite()
    if finite.any():
        err_f = err[finite].max().item()
        err_e = (eager[finite] - ref64[finite]).abs().max().item()
        bound = err_e + SLACK * eps * scale + sub
        assert err_f <= bound, (
            f"{what}: max|fused - ref64| = {err_f:.3g} > max|eager - ref64| "
            f"{err_e:.3g} + {SLACK} eps max|ref64| = {bound:.3g}"
        )


def assert_true_statistics(
    mean: torch.Tensor, rstd: torch.Tensor, x: torch.Tensor, eps: float, what: str
) -> None:
    """The per-plane statistics [B, C] a forward op returns are finite and the true ones (4):
    |mean - mean64| <= EXTREME_FP32_UNITS eps(fp32) max|x| + sub(fp32), |rstd - rstd64| <=
    EXTREME_FP32_UNITS eps(fp32) rstd64 + sub(fp32) (rstd is subnormal for planes near 3e38)."""
    x64 = x.double()
    mu64 = x64.mean((2, 3))
    var64 = (x64 - mu64[..., None, None]).square().mean((2, 3))
    r64 = 1.0 / torch.sqrt(var64 + eps)
    amax = x64.abs().amax((2, 3))
    sub, tol = subnormal_spacing(torch.float32), EXTREME_FP32_UNITS * torch.finfo(torch.float32).eps
    assert mean.isfinite().all() and rstd.isfinite().all() and (rstd > 0).all(), what
    assert ((mean.double() - mu64).abs() <= tol * amax + sub).all(), (
        f"{what}: mean error {(mean.double() - mu64).abs().max().item():.3g}"
    )
    assert ((rstd.double() - r64).abs() <= tol * r64 + sub).all(), (
        f"{what}: rstd relative error {((rstd.double() - r64).abs() / r64).max().item():.3g}"
    )
