"""Bad inputs: ValueError from the Python functionals/modules (naming the argument and the rule),
RuntimeError (never a crash) from the raw ops torch.ops.sa_cuda.*."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import (
    PARAM_ARG_NAMES,
    VARIANTS,
    bwd_op,
    functional,
    fused_class,
    fwd_op,
    make_input,
    make_ref,
    params_in_op_order,
)

C, G = 32, 4
M = C // (2 * G)
SHAPE = (2, C, 5, 7)


def _setup(variant, dtype=torch.float32):
    ref = make_ref(variant, C, G, seed=1)
    params = [p.detach() for p in params_in_op_order(variant, ref)]
    return make_input(SHAPE, seed=2, dtype=dtype), params


# ------------------------------------------------------------------------------------------------
# Python functionals and modules: ValueError
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("groups", [3, 5, 32])
def test_channels_not_divisible(variant, groups):
    x, params = _setup(variant)
    relation = f"= {2 * groups}" if 2 * groups <= C else "> C"
    rule = re.escape(f"C ({C}) must be divisible by 2 * groups (2 * {groups} {relation})")
    with pytest.raises(ValueError, match=rule):
        functional(variant)(x, groups, *params)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "channel, groups",
    [(30, 4), (100, 64), (64, 0), (64, -2), (0, 1), (64, 2.0), (64.0, 2), (64, True)],
)
def test_module_bad_channel_or_groups(variant, channel, groups):
    """The constructor refuses a layout the layer cannot have (the reference's __init__ would
    build GroupNorm(0, 0) and die with ZeroDivisionError, or a layer that refuses every input)."""
    with pytest.raises(ValueError, match=r"sa_cuda: (channel|groups)"):
        fused_class(variant)(channel, groups)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("groups", [0, -1, -4])
def test_groups_below_one(variant, groups):
    x, params = _setup(variant)
    with pytest.raises(ValueError, match=re.escape(f"groups must be an int >= 1, got {groups}")):
        functional(variant)(x, groups, *params)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("groups", [4.0, True, "4"])
def test_groups_not_int(variant, groups):
    x, params = _setup(variant)
    with pytest.raises(ValueError, match="groups must be an int >= 1"):
        functional(variant)(x, groups, *params)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(C, 5, 7), (2, C, 5, 7, 1), (2, C), (C,)], ids=len)
def test_x_rank(variant, shape):
    _, params = _setup(variant)
    x = torch.randn(shape)
    with pytest.raises(
        ValueError, match=re.escape(f"x must be 4-D [B, C, H, W], got shape {shape}")
    ):
        functional(variant)(x, G, *params)
    with pytest.raises(ValueError, match="x must be 4-D"):
        fused_class(variant)(C, G)(x)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "dtype",
    [
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    ],
)
def test_x_dtype(variant, dtype):
    """A non-floating x is refused as x by the functional (even with parameters that require
    grad), the module and the raw op, not by failing somewhere inside."""
    _, params = _setup(variant)
    x = torch.ones(SHAPE, dtype=dtype)
    rule = re.escape(f"x must be float64, float32, float16 or bfloat16, got {dtype}")
    with pytest.raises(ValueError, match=rule):
        functional(variant)(x, G, *params)
    with pytest.raises(ValueError, match=rule):
        functional(variant)(x, G, *[p.clone().requires_grad_() for p in params])
    with pytest.raises(ValueError, match=rule):
        fused_class(variant)(C, G)(x)
    with pytest.raises(ValueError, match="x must be float64, float32, float16 or bfloat16"):
        fwd_op(variant)(x, G, *params, 1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_x_not_tensor(variant):
    _, params = _setup(variant)
    with pytest.raises(ValueError, match="x must be a torch.Tensor, got list"):
        functional(variant)([[1.0]], G, *params)
    for x in ([[1.0]], None, 3.0, torch.randn(SHAPE).numpy()):
        with pytest.raises(ValueError, match="x must be a torch.Tensor"):
            fused_class(variant)(C, G)(x)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("hw", [(0, 5), (5, 0)])
def test_empty_plane(variant, hw):
    _, params = _setup(variant)
    x = torch.randn(2, C, *hw)
    with pytest.raises(ValueError, match=re.escape(f"H * W must be >= 1, got {hw[0]} x {hw[1]}")):
        functional(variant)(x, G, *params)


@pytest.mark.parametrize("variant", VARIANTS)
def test_negative_eps(variant):
    x, params = _setup(variant)
    with pytest.raises(ValueError, match="eps must be a number >= 0, got -1"):
        functional(variant)(x, G, *params, eps=-1e-5)
    with pytest.raises(ValueError, match="eps must be a number >= 0, got nan"):
        functional(variant)(x, G, *params, eps=float("nan"))


def _wrong_shapes(variant, index):
    """Shapes that must be refused for parameter ``index`` (m = 4)."""
    is_matrix = variant == "shuffle_attention" and index in (0, 2)
    if is_matrix:  # needs (m, m, 1, 1) or (m, m)
        return [
            (M, M - 1, 1, 1),
            (M * M,),
            (1, M * M, 1, 1),
            (M, 1, 1, 1),
            (M, M, 2),
            (M + 1, M + 1),
        ]
    return [(M + 1,), (1, M - 1, 1, 1), (M, M), (2 * M,), (1,), (0,), (M, 2)]


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_wrong_shape(variant, index):
    x, params = _setup(variant)
    name = PARAM_ARG_NAMES[variant][index]
    for shape in _wrong_shapes(variant, index):
        bad = list(params)
        bad[index] = torch.randn(shape)
        with pytest.raises(
            ValueError,
            match=rf"^{name} must have shape .* m = C / \(2 \* groups\) "
            rf"= {M}, got {re.escape(str(shape))}",
        ):
            functional(variant)(x, G, *bad)


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_wrong_device(variant, index):
    """A parameter on another device than x (the meta device stands in for a GPU here)."""
    x, params = _setup(variant)
    name = PARAM_ARG_NAMES[variant][index]
    bad = list(params)
    bad[index] = torch.empty(params[index].shape, device="meta")
    with pytest.raises(ValueError, match=rf"^{name} is on meta but x is on cpu"):
        functional(variant)(x, G, *bad)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_wrong_dtype(variant, index, dtype):
    x, params = _setup(variant)
    name = PARAM_ARG_NAMES[variant][index]
    bad = list(params)
    bad[index] = torch.ones(params[index].shape, dtype=dtype)
    with pytest.raises(
        ValueError, match=rf"^{name} must be float64, float32, float16 or bfloat16, got {dtype}"
    ):
        functional(variant)(x, G, *bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_not_tensor(variant):
    x, params = _setup(variant)
    bad = list(params)
    bad[3] = [0.0] * M
    name = PARAM_ARG_NAMES[variant][3]
    with pytest.raises(ValueError, match=rf"^{name} must be a torch.Tensor, got list"):
        functional(variant)(x, G, *bad)


# ------------------------------------------------------------------------------------------------
# Raw ops: RuntimeError with the C++ check's message (and the process survives)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_forward_op_errors(variant):
    x, params = _setup(variant)
    op = fwd_op(variant)
    cases = [
        ((x, 3, *params, 1e-5), r"C \(32\) must be divisible by 2 \* groups"),
        ((x, 0, *params, 1e-5), "groups must be an int >= 1, got 0"),
        ((x, -2, *params, 1e-5), "groups must be an int >= 1, got -2"),
        ((x[0], G, *params, 1e-5), "x must be 4-D"),
        ((x[..., None], G, *params, 1e-5), "x must be 4-D"),
        ((x.to(torch.int32), G, *params, 1e-5), "x must be float64, float32, float16 or bfloat16"),
        (
            (x.to(torch.complex64), G, *params, 1e-5),
            "x must be float64, float32, float16 or bfloat16",
        ),
        ((torch.randn(2, C, 0, 3), G, *params, 1e-5), r"H \* W must be >= 1"),
        ((x, G, *params, -1.0), "eps must be a number >= 0"),
        ((x, G, *params[:5], torch.randn(M + 1), 1e-5), "gn_bias must have 4 elements"),
        ((x, G, torch.randn(M + 2), *params[1:], 1e-5), f"{PARAM_ARG_NAMES[variant][0]} must have"),
        (
            (x, G, *params[:2], params[2].to(torch.int64), *params[3:], 1e-5),
            f"{PARAM_ARG_NAMES[variant][2]} must be float64, float32, float16 or bfloat16",
        ),
        (
            (x, G, *params[:4], torch.empty(M, device="meta"), params[5], 1e-5),
            "gn_weight is on meta but x is on cpu",
        ),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            op(*args)


@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_backward_op_errors(variant):
    x, params = _setup(variant)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    gy = make_input(SHAPE, seed=3)
    op = bwd_op(variant)
    cases = [
        ((gy[:1], x, mean, rstd, G, *params), "grad_out must have x's shape"),
        ((gy, x, mean[:1], rstd, G, *params), r"(mean|rstd) must be"),
        ((gy, x, mean, rstd.double(), G, *params), r"(mean|rstd) must be"),
        ((gy, x, mean, rstd[:, :-1], G, *params), r"(mean|rstd) must be"),
        ((gy, x, mean, rstd, 3, *params), r"C \(32\) must be divisible by 2 \* groups"),
        ((gy, x, mean, rstd, 0, *params), "groups must be an int >= 1"),
        ((gy, x.to(torch.int64), mean, rstd, G, *params), "x must be float64"),
        ((gy, x, mean, rstd, G, *params[:5], torch.randn(M + 1)), "gn_bias must have 4 elements"),
        ((gy.to("meta"), x, mean, rstd, G, *params), "grad_out is on meta but x is on cpu"),
        ((gy, x, mean, rstd.to("meta"), G, *params), "rstd is on meta but x is on cpu"),
        (
            (gy, x, mean, rstd, G, params[0].to("meta"), *params[1:]),
            f"{PARAM_ARG_NAMES[variant][0]} is on meta but x is on cpu",
        ),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            op(*args)
    # the process is alive and the op still works after all those refusals
    grads = op(gy, x, mean, rstd, G, *params)
    assert len(grads) == 7 and grads[0].shape == x.shape
    assert all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------------
# Devices, the raw backward's arguments, eps
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_x_on_meta_params_on_cpu(variant):
    """x on another device than the parameters (meta stands in for a GPU): ValueError naming the
    first parameter, from the functional and the module; RuntimeError from the raw op."""
    x, params = _setup(variant)
    first = PARAM_ARG_NAMES[variant][0]
    with pytest.raises(ValueError, match=rf"^{first} is on cpu but x is on meta"):
        functional(variant)(x.to("meta"), G, *params)
    module = fused_class(variant)(C, G)
    with pytest.raises(ValueError, match=rf"^{first} is on cpu but x is on meta"):
        module(x.to("meta"))
    with pytest.raises(ValueError, match=rf"{first} is on cpu but x is on meta"):
        fwd_op(variant)(x.to("meta"), G, *params, 1e-5)


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_ops_parameter_on_meta(variant, index):
    x, params = _setup(variant)
    name = PARAM_ARG_NAMES[variant][index]
    bad = list(params)
    bad[index] = params[index].to("meta")
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on cpu"):
        fwd_op(variant)(x, G, *bad, 1e-5)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on cpu"):
        bwd_op(variant)(torch.randn(SHAPE), x, mean, rstd, G, *bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_backward_mixed_meta(variant):
    x, params = _setup(variant)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    gy = make_input(SHAPE, seed=3)
    op = bwd_op(variant)
    cases = [
        ((gy, x.to("meta"), mean, rstd, G, *params), "grad_out is on cpu but x is on meta"),
        ((gy, x, mean.to("meta"), rstd, G, *params), "mean is on meta but x is on cpu"),
        (
            (gy.to("meta"), x.to("meta"), mean.to("meta"), rstd.to("meta"), G, *params),
            f"{PARAM_ARG_NAMES[variant][0]} is on cpu but x is on meta",
        ),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            op(*args)


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_on_meta_gives_shapes(variant):
    """Everything on meta is not an error: shapes and dtypes only (the fake kernels)."""
    x, params = _setup(variant)
    mx, mp = x.to("meta"), [p.to("meta") for p in params]
    out, mean, rstd = fwd_op(variant)(mx, G, *mp, 1e-5)
    assert out.device.type == "meta" and out.shape == SHAPE and out.dtype == x.dtype
    assert mean.shape == (2, C) and rstd.shape == (2, C) and mean.dtype == torch.float32
    grads = bwd_op(variant)(torch.empty(SHAPE, device="meta"), mx, mean, rstd, G, *mp)
    assert grads[0].shape == SHAPE
    assert all(g.shape == p.shape and g.dtype == p.dtype for g, p in zip(grads[1:], mp))
    assert functional(variant)(mx, G, *mp).shape == SHAPE


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_backward_parameter_wrong_dtype(variant, index, dtype):
    x, params = _setup(variant)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    name = PARAM_ARG_NAMES[variant][index]
    bad = list(params)
    bad[index] = torch.ones(params[index].shape, dtype=dtype)
    with pytest.raises(ValueError, match=rf"{name} must be float64, float32, float16 or bfloat16"):
        bwd_op(variant)(make_input(SHAPE, seed=3), x, mean, rstd, G, *bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_backward_grad_out_wrong_shape(variant):
    x, params = _setup(variant)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    B, C_, H, W = SHAPE
    for shape in [
        (B, C_, W, H),
        (B, C_, H * W),
        (B, C_ + 2 * 2 * G, H, W),
        (B + 1, C_, H, W),
        (B, C_, H, W, 1),
        (B * C_ * H * W,),
        (1, C_, H, W),
        (),
    ]:
        with pytest.raises(ValueError, match=re.escape("grad_out must have x's shape")):
            bwd_op(variant)(torch.randn(shape), x, mean, rstd, G, *params)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_backward_grad_out_not_floating(variant, dtype):
    """grad_out must be a floating tensor (any floating dtype is converted to x's): a complex
    grad_out would lose its imaginary part, an integer/bool one is not a gradient."""
    x, params = _setup(variant)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    gy = torch.ones(SHAPE, dtype=dtype)
    with pytest.raises(ValueError, match="grad_out"):
        bwd_op(variant)(gy, x, mean, rstd, G, *params)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_backward_statistics_wrong(variant, x_dtype):
    """mean / rstd must be the forward's [B, C] statistics: float32 (float64 for float64 x)."""
    x, params = _setup(variant, x_dtype)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    stat = torch.float64 if x_dtype == torch.float64 else torch.float32
    assert mean.dtype == stat and rstd.dtype == stat
    other = torch.float32 if stat == torch.float64 else torch.float64
    wrong = [
        mean.to(other),
        mean.half(),
        mean.bfloat16(),
        mean.to(torch.int64),
        mean.t(),
        mean.reshape(-1),
        mean[..., None],
        mean[None],
        torch.cat([mean, mean]),
        mean[:, : C // 2],
        torch.zeros((), dtype=stat),
    ]
    gy = make_input(SHAPE, seed=3, dtype=x_dtype)
    op = bwd_op(variant)
    for bad in wrong:
        for args in ((gy, x, bad, rstd, G, *params), (gy, x, mean, bad, G, *params)):
            with pytest.raises(ValueError, match=r"(mean|rstd) must be"):
                op(*args)


@pytest.mark.parametrize("eps", ["1e-5", None, [1e-5]], ids=["str", "None", "list"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_eps_not_a_number(variant, eps):
    """eps of a wrong type: ValueError/RuntimeError naming eps (like groups = "4" does)."""
    x, params = _setup(variant)
    with pytest.raises((ValueError, RuntimeError), match="eps"):
        functional(variant)(x, G, *params, eps=eps)
