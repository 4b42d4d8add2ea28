"""Outputs above 8 MiB go to memory by streaming (non-temporal) stores on the CPU: here the NCHW
forward's output planes, plain and with the residual epilogue (csrc/cpu/vec_loops.h: ResultStore,
where the gate pass writes a float output with the epilogue fused in; write_output, which converts
bfloat16 and half results). The channels_last rows and columns have theirs in
test_channels_last.py (test_rows_streaming_stores).

* Bit for bit: a streamed output (and its statistics) equals the op run one batch item at a time,
  each item below 8 MiB, so stored by plain stores with the epilogue after the gate: how a plane is
  stored changes no bit of it, and the fused epilogue adds identity to the product rounded to the
  dtype (no FMA), as the unfused pass and eager do.
* Values: against the float64 reference, relu(reference(x) + identity) for the epilogue.
* Shapes: planes of whole 64-byte cache lines, which are streamed (from one line, 4x4 fp32
  planes, up), and planes that share lines with their neighbours, which keep plain stores above
  8 MiB too (a line both streamed and cached is slow: stream_planes): odd planes, and the plane
  sizes compiled in (7x7 and 14x14 planes, two at a time); identity at a misaligned storage offset
  and identity channels_last beside an NCHW x.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_identical, make_input, op_params, ref_functional

from sa_cuda.ops import SA_CUDA_LIBRARY
from sa_cuda.testing import assert_close_to_reference

STREAMED_BYTES = 8 << 20  # csrc/cpu/vec_loops.h: stream_results

CASES = [
    # variant, (B, C, H, W), groups, dtype
    # Planes of whole 64-byte lines: streamed (csrc/cpu/vec_loops.h: stream_planes).
    pytest.param("sa_layer", (4, 64, 96, 96), 8, torch.float32, id="fp32-aligned"),
    pytest.param("sa_layer", (66, 2048, 4, 4), 64, torch.float32, id="fp32-one-line-planes"),
    pytest.param("sa_layer", (33, 1024, 8, 8), 32, torch.float32, id="fp32-8x8"),
    pytest.param("sa_layer", (4, 64, 128, 130), 8, torch.bfloat16, id="bf16-aligned"),
    pytest.param("sa_layer", (33, 512, 16, 16), 64, torch.bfloat16, id="bf16-16x16"),
    pytest.param("sa_layer", (4, 64, 128, 130), 8, torch.float16, id="fp16-aligned"),
    pytest.param("shuffle_attention", (4, 64, 96, 96), 8, torch.float32, id="sa-fp32-m4"),
    pytest.param("shuffle_attention", (66, 2048, 4, 4), 64, torch.float32, id="sa-fp32-m16-line"),
    # Planes that share lines: plain stores above 8 MiB too.
    pytest.param("sa_layer", (4, 64, 91, 97), 4, torch.float32, id="fp32-odd-planes"),
    pytest.param("sa_layer", (11, 1024, 14, 14), 64, torch.float32, id="fp32-14x14"),
    pytest.param("sa_layer", (22, 2048, 7, 7), 64, torch.float32, id="fp32-7x7"),
    pytest.param("sa_layer", (6, 64, 113, 115), 4, torch.bfloat16, id="bf16-odd-planes"),
    pytest.param("shuffle_attention", (5, 48, 101, 103), 3, torch.float32, id="sa-fp32-odd-m8"),
    pytest.param("shuffle_attention", (22, 2048, 7, 7), 64, torch.float32, id="sa-fp32-7x7-m16"),
    pytest.param("shuffle_attention", (6, 64, 113, 115), 8, torch.bfloat16, id="sa-bf16-odd"),
]


def _identity(shape, dtype, layout):
    """identity: NCHW, one element past an aligned address, or channels_last."""
    if layout == "offset":
        n = torch.Size(shape).numel()
        identity = make_input((n + 1,), seed=3, dtype=dtype)[1:].view(shape)
        assert identity.data_ptr() % 32 != 0
        return identity
    identity = make_input(shape, seed=3, dtype=dtype)
    if layout == "cl":
        identity = identity.contiguous(memory_format=torch.channels_last)
    return identity


def _run(variant, x, identity, groups, params):
    """(out, mean, rstd) of the forward op, with the residual epilogue when identity is given."""
    if identity is None:
        return SA_CUDA_LIBRARY.forward_op(variant)(x, groups, *params, 1e-5)
    return SA_CUDA_LIBRARY.residual_forward_op(variant)(x, identity, groups, *params, 1e-5)


def _by_item(fn, variant, *tensors, groups, params):
    """fn(variant, *tensors, groups, params) on one batch item at a time (each below the streamed
    size; a None tensor stays None), its results concatenated (None where fn gives None)."""
    runs = [
        fn(variant, *(t if t is None else t[b : b + 1] for t in tensors), groups, params)
        for b in range(tensors[0].shape[0])
    ]
    return tuple(None if r[0] is None else torch.cat(r) for r in zip(*runs))


def _reference(variant, x, identity, groups, params, dtype):
    """The reference forward in dtype, with relu(. + identity) when identity is given."""
    out = ref_functional(variant)(x.to(dtype), groups, *[p.to(dtype) for p in params])
    return out if identity is None else torch.relu(out + identity.to(dtype))


@pytest.mark.parametrize("identity_layout", ["none", "nchw"])
@pytest.mark.parametrize("variant,shape,groups,dtype", CASES)
def test_streamed_output(variant, shape, groups, dtype, identity_layout):
    x = make_input(shape, seed=1, dtype=dtype)
    assert x.numel() * x.element_size() > STREAMED_BYTES
    assert x[:1].numel() * x.element_size() <= STREAMED_BYTES
    identity = None if identity_layout == "none" else _identity(shape, dtype, identity_layout)
    params = op_params(variant, shape[1], groups, seed=3, dtype=dtype)
    streamed = _run(variant, x, identity, groups, params)
    by_item = _by_item(_run, variant, x, identity, groups=groups, params=params)
    assert_identical(streamed, by_item, "out, mean, rstd")
    ref64 = _reference(variant, x, identity, groups, params, torch.float64)
    eager = _reference(variant, x, identity, groups, params, dtype)
    assert_close_to_reference({"out": streamed[0]}, {"out": ref64}, dtype, eager={"out": eager})


@pytest.mark.parametrize("identity_layout", ["offset", "cl"])
@pytest.mark.parametrize("variant", ["sa_layer", "shuffle_attention"])
def test_streamed_output_identity_layouts(variant, identity_layout):
    """The fused epilogue reads identity as it lies: off a vector boundary, or converted from
    channels_last (the op's identity in x's memory format)."""
    shape, groups, dtype = (4, 64, 96, 96), 4, torch.float32  # streamed
    x = make_input(shape, seed=1, dtype=dtype)
    identity = _identity(shape, dtype, identity_layout)
    params = op_params(variant, shape[1], groups, seed=3)
    out = _run(variant, x, identity, groups, params)[0]
    assert_identical([out], [_by_item(_run, variant, x, identity, groups=groups, params=params)[0]])
    ref64 = _reference(variant, x, identity, groups, params, torch.float64)
    eager = _reference(variant, x, identity, groups, params, dtype)
    assert_close_to_reference({"out": out}, {"out": ref64}, dtype, eager={"out": eager})


def _backward(variant, gy, x, identity, groups, params):
    """(out, grad_x, grad_identity or None, parameter gradients...): the forward op, then the
    backward op for gy, with the residual epilogue's mask of that out when identity is given."""
    out, mean, rstd = _run(variant, x, identity, groups, params)
    if identity is None:
        grads = SA_CUDA_LIBRARY.backward_op(variant)(gy, x, mean, rstd, groups, *params)
        return (out, grads[0], None, *grads[1:])
    op = SA_CUDA_LIBRARY.residual_backward_op(variant)
    return (out, *op(gy, out, x, mean, rstd, groups, *params))


def _reference_grads(variant, gy, x, groups, params, dtype, mask):
    """grad_x and the parameter gradients of the reference in dtype, for gy (times relu's mask)."""
    xl = x.to(dtype).requires_grad_(True)
    ps = [p.to(dtype).requires_grad_(True) for p in params]
    out = ref_functional(variant)(xl, groups, *ps)
    g = gy.to(dtype) if mask is None else gy.to(dtype) * mask
    grads = torch.autograd.grad(out, [xl, *ps], g)
    return {"x": grads[0], **{f"p{i}": gp for i, gp in enumerate(grads[1:])}}


@pytest.mark.parametrize("identity_layout", ["none", "nchw"])
@pytest.mark.parametrize("variant,shape,groups,dtype", CASES)
def test_streamed_grad_x(variant, shape, groups, dtype, identity_layout):
    """The backward's grad_x above 8 MiB (and the residual op's grad_identity) bit for bit as item
    by item, and with the parameter gradients against the float64 reference."""
    x = make_input(shape, seed=1, dtype=dtype)
    gy = make_input(shape, seed=2, dtype=dtype)
    identity = None if identity_layout == "none" else _identity(shape, dtype, identity_layout)
    params = op_params(variant, shape[1], groups, seed=3, dtype=dtype)
    out, grad_x, grad_identity, *param_grads = _backward(variant, gy, x, identity, groups, params)
    by_item = _by_item(_backward, variant, gy, x, identity, groups=groups, params=params)
    assert_identical([grad_x], [by_item[1]], "grad_x")
    mask = None
    if identity is not None:
        assert_identical([grad_identity], [by_item[2]], "grad_identity")
        mask = out > 0
        assert torch.equal(grad_identity, torch.where(mask, gy, torch.zeros_like(gy)))
    fused = {"x": grad_x, **{f"p{i}": g for i, g in enumerate(param_grads)}}
    ref64 = _reference_grads(variant, gy, x, groups, params, torch.float64, mask)
    eager = _reference_grads(variant, gy, x, groups, params, dtype, mask)
    assert_close_to_reference(fused, ref64, dtype, eager=eager)
