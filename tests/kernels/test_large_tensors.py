"""Large tensors: the raw ops on > 2^31 elements on a GPU (every 32-bit element offset would
overflow), checked chunk by chunk against the reference; the chunked checker itself, on the CPU
kernels; the largest shape the CPU suite runs whole."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import (
    BACKENDS,
    CUDA_OK,
    CUDA_REASON,
    PARAM_ARG_NAMES,
    VARIANTS,
    bwd_op,
    clone_as,
    forward_backward,
    fwd_op,
    make_input,
    make_ref,
    op_params,
    ref_functional,
)

from sa_cuda.testing import assert_close_to_reference, max_abs, max_err


def assert_chunk_stats(chunk, mean, rstd, x_chunk, unit, eps) -> None:
    """The kernels' per-plane mean/rstd of one chunk against torch.var_mean of its input."""
    var, mu = torch.var_mean(x_chunk, dim=(1, 2), unbiased=False)
    torch.testing.assert_close(
        mean.float(),
        mu,
        rtol=0,
        atol=unit * max(1.0, max_abs(x_chunk)),
        msg=lambda s: f"mean of chunk {chunk}: {s}",
    )
    torch.testing.assert_close(
        rstd.float(),
        torch.rsqrt(var + eps),
        rtol=unit,
        atol=0,
        msg=lambda s: f"rstd of chunk {chunk}: {s}",
    )


def check_in_chunks(variant, x, groups, params, gy, *, by="group", eps=1e-5, chunks=None):
    """The fused raw ops on the whole x against the reference evaluated chunk by chunk, so that no
    reference tensor is larger than one chunk: ``by="group"``: one (batch item, group) at a time
    (groups = 1 on its 2m channels); ``by="batch"``: one batch item at a time. The reference runs
    in float32 on x's values. ``chunks``: the chunks whose out/grad_x are compared ((b, g) pairs or
    batch indices; all by default). Parameter gradients need every chunk: checked only then.

    Channel c of the pre-shuffle result goes to output channel 2 * (c % (C/2)) + c // (C/2); in a
    group chunk's own (2m-channel) reference output, local channel j is at 2 * (j % m) + j // m.
    Bounds, with u = eps(x.dtype) (one unit of the input dtype, the suite's low-precision term):
    out, grad_x within rtol u, atol u * max(1, max|ref|) (the fused result is one rounding of an
    fp32 computation); mean, rstd within u; parameter gradients within u * max(1, max|ref|).
    An indexing error gives O(1) differences."""
    B, C_, H, W = x.shape
    m, half = C_ // (2 * groups), C_ // 2
    fwd, bwd = fwd_op(variant), bwd_op(variant)
    out, mean, rstd = fwd(x, groups, *params, eps)
    grad_x, *pgrads = bwd(gy, x, mean, rstd, groups, *params)
    unit = torch.finfo(x.dtype).eps if x.dtype != torch.float64 else torch.finfo(torch.float32).eps
    everything = chunks is None
    if by == "group":
        chunks = [(b, g) for b in range(B) for g in range(groups)] if everything else chunks
    else:
        chunks = list(range(B)) if everything else chunks
    psum = [torch.zeros(p.shape, dtype=torch.float64, device=x.device) for p in params]
    j = torch.arange(2 * m, device=x.device)
    local = 2 * (j % m) + j // m  # chunk-local output position of u_j
    for chunk in chunks:
        ps = [p.detach().float().requires_grad_(True) for p in params]
        if by == "group":
            b, g = chunk
            cs = g * 2 * m + j  # input (pre-shuffle) channels of the chunk
            dst = 2 * (cs % half) + cs // half  # their output channels
            xc = x[b : b + 1, g * 2 * m : (g + 1) * 2 * m].float().requires_grad_(True)
            yc = ref_functional(variant)(xc, 1, *ps, eps=eps)
            gyc = torch.empty_like(yc)
            gyc[0, local] = gy[b, dst].float()
            gs = torch.autograd.grad(yc, [xc, *ps], gyc)
            pairs = (
                ("out", out[b, dst], yc.detach()[0, local]),
                ("grad_x", grad_x[b, cs], gs[0][0]),
            )
            stats = (mean[b, cs], rstd[b, cs])
        else:
            b, cs = chunk, slice(None)
            xc = x[b : b + 1].float().requires_grad_(True)
            yc = ref_functional(variant)(xc, groups, *ps, eps=eps)
            gs = torch.autograd.grad(yc, [xc, *ps], gy[b : b + 1].float())
            pairs = (("out", out[b], yc.detach()[0]), ("grad_x", grad_x[b], gs[0][0]))
            stats = (mean[b], rstd[b])
        for name, got, want in pairs:
            torch.testing.assert_close(
                got.float(),
                want,
                rtol=unit,
                atol=unit * max(1.0, max_abs(want)),
                msg=lambda s: f"{name} of chunk {chunk}: {s}",
            )
        assert_chunk_stats(chunk, *stats, xc.detach()[0], unit, eps)
        for acc, gp in zip(psum, gs[1:]):
            acc += gp.double()
        del xc, ps, yc, gs, pairs
    if everything:
        for i, (acc, got) in enumerate(zip(psum, pgrads)):
            assert got.shape == params[i].shape and got.dtype == params[i].dtype
            bound = unit * max(1.0, max_abs(acc))
            assert max_err(got, acc) <= bound, (
                f"{PARAM_ARG_NAMES[variant][i]}: max|fused - ref| = "
                f"{max_err(got, acc):.3g} > {bound:.3g}"
            )


@pytest.mark.parametrize(
    "by,shape,groups",
    [
        ("group", (2, 16, 24, 20), 8),
        ("group", (1, 16, 9, 33), 2),
        ("group", (3, 8, 5, 5), 4),
        ("batch", (3, 32, 12, 10), 4),
        ("batch", (2, 16, 1, 1), 8),
    ],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_checker_on_cpu(variant, by, shape, groups):
    """The chunked checker of the > 2^31-element CUDA test, run here on the CPU kernels (fp16 x,
    fp32 parameters as in that test) so that its index bookkeeping is itself tested without a GPU
    (a wrong channel map would fail here)."""
    params = op_params(variant, shape[1], groups, 4)
    x = make_input(shape, seed=5, dtype=torch.float16)
    gy = make_input(shape, seed=6, dtype=torch.float16)
    check_in_chunks(variant, x, groups, params, gy, by=by)
    last = (shape[0] - 1, groups - 1) if by == "group" else shape[0] - 1
    check_in_chunks(variant, x, groups, params, gy, by=by, chunks=[last])


@pytest.mark.skipif(not CUDA_OK, reason=CUDA_REASON)
@pytest.mark.parametrize(
    "by,shape,groups",
    [
        # 65536 planes of 256 x 256 (G = 64, m = 8 as in SA-ResNet): batch items 32..63 start beyond
        # element 2^31; reference per batch item (64M elements).
        pytest.param("batch", (64, 1024, 256, 256), 64, id="many-planes-64x1024x256x256"),
        # 16 planes of 2^28 elements (G = 8, m = 1): planes 8..15 start beyond element 2^31;
        # reference per group (2 planes, 2 GiB in fp32).
        pytest.param("group", (1, 16, 16384, 16384), 8, id="huge-planes-1x16x16384x16384"),
    ],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_more_than_2_31_elements(variant, by, shape, groups):
    """x float16 with 2^32 elements (8 GiB; x, grad_out, out and grad_x: 32 GiB), fp32 parameters:
    forward and backward of the raw ops on the GPU, every chunk compared with the reference (any
    32-bit element offset overflows past 2^31)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 60 * 2**30:
        pytest.skip(f"needs ~60 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    assert torch.Size(shape).numel() > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    try:
        x = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16)
        gy = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16)
        params = [p.cuda() for p in op_params(variant, shape[1], groups, 4)]
        check_in_chunks(variant, x, groups, params, gy, by=by)
    finally:
        x = gy = None
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_largest_quick_shape(variant):
    """(1, 64, 256, 256): 4.2M elements, 65536 per plane (a couple of seconds with the float64
    reference), fp32 criterion against the float64 reference."""
    shape, groups = (1, 64, 256, 256), 8
    ref = make_ref(variant, shape[1], groups, seed=11)
    x, gy = make_input(shape, seed=1), make_input(shape, seed=2)
    F = forward_backward(BACKENDS["cpu"].module_like(variant, ref), x, gy)
    E = forward_backward(ref, x, gy)
    R = forward_backward(clone_as(ref, torch.float64), x.double(), gy.double())
    assert_close_to_reference(F, R, torch.float32, eager=E)
