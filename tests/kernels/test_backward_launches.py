"""The backward's launches and its parameter-gradient reduction (csrc/sa_math.h).

A backward is the backward kernel (grad_x and per-(batch item, group) partials) plus one reduction
of the partials into the six parameter gradients, each written in its parameter's own dtype:
- the number of launches, counted on the emulated CUDA kernels (torch.ops.sa_cuda_emu, whose
  launcher counts them) plus the compute ATen ops the host code runs (each one a launch on a GPU);
- the compute ATen ops of the raw CPU op, counted with the torch profiler;
- the reduction's values: the gradient of a batch is the sum of the gradients of its (batch item,
  group) slots, each computed from the same partial bits (float64 agreement); each dtype's store
  is the float64 result converted as PyTorch converts it; every partial slot and gradient entry is
  written (NaN-filled allocations); an empty batch gets exact zeros.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import EMULATED, VARIANTS, make_input, make_ref, params_in_op_order

EMU = EMULATED.ops
# The reduction tests build their inputs on the CPU: the cpu and emulated backends.
CPU_BACKENDS = pytest.mark.parametrize("backend", ["cpu", "emulated"], indirect=True)

# ATen events that allocate or only make new metadata over the same storage: no kernel on a GPU,
# no pass over memory on the CPU. A copying variant of any of them (a reshape or contiguous that
# must copy, resolve_neg/resolve_conj of a tensor with the bit set) records its copy as a child
# event (aten::clone, aten::copy_, aten::neg, ...), which is counted.
NOT_COMPUTE = {
    "aten::empty": "allocation, contents undefined",
    "aten::empty_like": "allocation, contents undefined",
    "aten::empty_strided": "allocation, contents undefined",
    "aten::view": "new sizes/strides over the same storage",
    "aten::reshape": "a view here (a copying reshape shows its aten::clone child)",
    "aten::_reshape_alias": "the view reshape dispatches to",
    "aten::as_strided": "new sizes/strides over the same storage",
    "aten::alias": "the same storage",
    "aten::detach": "the same storage without autograd history",
    "aten::resolve_neg": "returns self unless the negative bit is set",
    "aten::resolve_conj": "returns self unless the conjugate bit is set",
    "aten::contiguous": "returns self when contiguous (else its aten::clone child is counted)",
    "aten::select": "a view of one index",
    "aten::t": "a transposed view",
    "aten::transpose": "a transposed view",
}


def compute_aten_ops(fn):
    """Names of the compute ATen events (every aten:: event not in NOT_COMPUTE) recorded by fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events() if e.name.startswith("aten::")]
    assert names, "the profiler recorded no ATen event at all (the op allocates its outputs)"
    return [n for n in names if n not in NOT_COMPUTE]


def op_inputs(ns, variant, shape, groups, *, dtype=torch.float32, param_dtypes=None, seed=0):
    """(grad_out, x, mean, rstd, groups, *params) for ns's backward op, from ns's forward."""
    ref = make_ref(variant, shape[1], groups, seed=seed, dtype=torch.float64)
    params = [p.detach() for p in params_in_op_order(variant, ref)]
    params = [p.to(d) for p, d in zip(params, param_dtypes or [dtype] * 6)]
    x = make_input(shape, seed=seed + 1, dtype=dtype)
    _, mean, rstd = getattr(ns, f"{variant}_forward")(x, groups, *params, 1e-5)
    grad_out = make_input(shape, seed=seed + 2, dtype=dtype)
    return [grad_out, x, mean, rstd, groups, *params]


def backward(ns, variant, args):
    return getattr(ns, f"{variant}_backward")(*args)


# ------------------------------------------------------------------------------------------------
# Launches and ATen ops
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,groups",
    [
        pytest.param((2, 16, 7, 9), 2, id="warp-per-plane"),
        pytest.param((1, 8, 30, 32), 2, id="block-per-plane"),
        pytest.param((1, 4, 64, 72), 1, id="streamed"),
        pytest.param((2, 16, 8, 8), 4, id="m2"),
    ],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_launches_per_backward(variant, shape, groups):
    """At most 3 launches per backward on a GPU: the emulated kernel launches (the backward kernel
    and the reduction) plus the compute ATen ops around them (none at float32)."""
    args = op_inputs(EMU, variant, shape, groups)
    before = EMU.emulated_launches()
    aten = compute_aten_ops(lambda: backward(EMU, variant, args))
    kernels = EMU.emulated_launches() - before
    assert kernels >= 2, (
        f"{kernels} emulated launches: the backward kernel and the reduction expected"
    )
    assert kernels + len(aten) <= 3, f"{kernels} kernel launches + compute ATen ops {aten}"


@pytest.mark.parametrize("x_format", ["nchw", "cl"])
@pytest.mark.parametrize(
    "shape,groups",
    [
        pytest.param((2, 16, 7, 9), 2, id="warp-per-plane"),
        pytest.param((1, 4, 64, 72), 1, id="streamed"),
        pytest.param((2, 16, 8, 8), 4, id="m2"),
    ],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_backward_launches_the_plain_kernels(variant, shape, groups, x_format):
    """The residual backward launches what the plain backward launches, and no compute ATen op:
    its kernels read relu's mask with grad_out and write grad_identity on the way
    (csrc/cuda/sa_grad.cuh), with no element-wise kernel of their own."""
    fmt = torch.channels_last if x_format == "cl" else torch.contiguous_format
    args = [
        a.contiguous(memory_format=fmt) if torch.is_tensor(a) and a.dim() == 4 else a
        for a in op_inputs(EMU, variant, shape, groups)
    ]
    out = make_input(shape, seed=9).contiguous(memory_format=fmt)

    def launches(fn):
        EMU.emulated_launch_blocks()  # forget earlier launches
        aten = compute_aten_ops(fn)
        return [int(b) for b in EMU.emulated_launch_blocks()], aten

    plain, _ = launches(lambda: backward(EMU, variant, args))
    residual, aten = launches(
        lambda: getattr(EMU, f"{variant}_residual_backward")(args[0], out, *args[1:])
    )
    assert residual == plain, f"residual launches {residual}, plain {plain}"
    assert aten == [], aten


@pytest.mark.parametrize("variant", VARIANTS)
def test_aten_ops_of_cpu_backward(variant):
    """The raw CPU op at (2, 256, 14, 14) float32: at most 4 compute ATen ops (it was 66 for
    sa_layer and 68 for shuffle_attention with the ATen reduction of the partials)."""
    args = op_inputs(torch.ops.sa_cuda, variant, (2, 256, 14, 14), 64)
    aten = compute_aten_ops(lambda: backward(torch.ops.sa_cuda, variant, args))
    assert len(aten) <= 4, aten


# ------------------------------------------------------------------------------------------------
# Values of the reduction
# ------------------------------------------------------------------------------------------------
def shuffled_channels_of(b, g, shape, groups):
    """grad_out's (batch item, channel) entries that the (b, g) slot's partials read: the
    shuffled destinations of group g's 2m channels."""
    C = shape[1]
    m = C // (2 * groups)
    return [2 * (c % (C // 2)) + c // (C // 2) for c in range(g * 2 * m, (g + 1) * 2 * m)]


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float64], ids=["x-fp32", "x-fp64"])
@CPU_BACKENDS
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_is_sum_over_slots(variant, backend, x_dtype):
    """Every parameter gradient is linear in the per-slot partials. With grad_out zero outside one
    (batch item, group) slot, every other slot's partials are exact zeros and the op returns that
    slot's own terms; the full gradient is their sum, in float64 (float64 parameters: the stores
    are the float64 results themselves)."""
    shape, groups = (3, 24, 5, 6), 3  # m = 4, 9 slots
    args = op_inputs(
        backend.ops, variant, shape, groups, dtype=x_dtype, param_dtypes=[torch.float64] * 6
    )
    full = backward(backend.ops, variant, args)[1:]
    grad_out = args[0]
    per_slot = []
    for b in range(shape[0]):
        for g in range(groups):
            only = torch.zeros_like(grad_out)
            channels = shuffled_channels_of(b, g, shape, groups)
            only[b, channels] = grad_out[b, channels]
            per_slot.append(backward(backend.ops, variant, [only, *args[1:]])[1:])
    for i, got in enumerate(full):
        assert got.dtype == torch.float64 and got.shape == args[5 + i].shape
        terms = torch.stack([s[i] for s in per_slot])
        # Both sides sum 9 float64 values (each a float64 product of float64 partial sums).
        bound = 64 * 2.0**-52 * terms.abs().sum(0)
        err = (got - terms.sum(0)).abs()
        assert bool((err <= bound).all()), f"gradient {i}: max error {err.max().item()}"
        assert terms.abs().sum().item() > 0, "a gradient that is zero in every slot tests nothing"


MIXED = [
    pytest.param([torch.float32] * 6, id="all-fp32"),
    pytest.param([torch.float16] * 6, id="all-fp16"),
    pytest.param([torch.bfloat16] * 6, id="all-bf16"),
    pytest.param(
        [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float32, torch.float16],
        id="mixed",
    ),
]


@pytest.mark.parametrize("param_dtypes", MIXED)
@CPU_BACKENDS
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_dtypes(variant, backend, param_dtypes):
    """A gradient in a parameter's own dtype is the float64 gradient (same parameter values, so the
    same acc_t parameters, partials and sums) converted as PyTorch converts float64."""
    shape, groups = (2, 16, 6, 7), 2
    args = op_inputs(backend.ops, variant, shape, groups, param_dtypes=param_dtypes, seed=3)
    wide = args[:5] + [p.to(torch.float64) for p in args[5:]]
    got = backward(backend.ops, variant, args)[1:]
    ref = backward(backend.ops, variant, wide)[1:]
    for i, (g, r, p) in enumerate(zip(got, ref, args[5:])):
        assert g.dtype == p.dtype and g.shape == p.shape, f"gradient {i}: {g.dtype} {g.shape}"
        assert torch.equal(g, r.to(p.dtype)), f"gradient {i} ({p.dtype})"


@CPU_BACKENDS
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_slot_and_entry_written(variant, backend):
    """Partials and gradients are allocated uninitialized: with PyTorch filling every
    uninitialized allocation with NaN, the results are unchanged bit for bit."""
    args = op_inputs(backend.ops, variant, (2, 24, 5, 5), 3, seed=7)
    plain = backward(backend.ops, variant, args)
    assert all(bool(t.isfinite().all()) for t in plain)
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        assert torch.empty(4).isnan().all(), "uninitialized memory is not NaN-filled: test is void"
        filled = backward(backend.ops, variant, args)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    for a, b in zip(plain, filled):
        assert torch.equal(a, b)


@CPU_BACKENDS
@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_batch_gives_zero_gradients(variant, backend):
    """B = 0: no kernel unit runs; the gradients are exact zeros in each parameter's shape and
    dtype, even for infinite parameters (0 * inf would be NaN), in NaN-filled allocations."""
    dtypes = [
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    ]
    args = op_inputs(backend.ops, variant, (0, 16, 4, 4), 2, param_dtypes=dtypes)
    args[5 + 2] = torch.full_like(args[5 + 2], math.inf)  # spatial weight
    args[5 + 4] = torch.full_like(args[5 + 4], -math.inf)  # gn weight
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        grads = backward(backend.ops, variant, args)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert grads[0].shape == args[1].shape
    for g, p in zip(grads[1:], args[5:]):
        assert g.dtype == p.dtype and g.shape == p.shape
        assert torch.equal(g, torch.zeros_like(p))
