"""Tensors the kernels must refuse, through every entry point, in child processes: every dtype that
is not float64/32/16 or bfloat16 (float8 kinds, complex, integers, unsigned, bool, quantized,
sub-byte) in every layout (contiguous, channels_last, transposed, expanded, storage offset), as x,
as a parameter, as grad_out, as a saved statistic, and as the residual epilogue's identity and
out. Each must give a clean Python exception
(ValueError from sa_cuda's checks; the dispatcher's NotImplementedError for a raw op called with a
backend it has no kernel for, e.g. quantized), never a signal, a hang or a result.

Also silently-wrong views: a tensor with the negative bit (torch._neg_view) must be read as the
values it stands for, not its raw memory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import VARIANTS, functional, make_input, make_pair, params_in_op_order, ref_functional

import sa_cuda
from sa_cuda.testing import max_err

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hostile_inputs.py"
)

_FAMILIES = {
    "float8": [
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    ],
    "complex": ["complex32", "complex64", "complex128"],
    "signed": ["int8", "int16", "int32", "int64"],
    "unsigned": ["uint8", "uint16", "uint32", "uint64", "uint1", "uint4", "uint7"],
    "bool-and-bits": ["bool", "bits8", "bits16", "int1", "int4"],
    "quantized": ["quint8", "qint8", "qint32", "quint4x2", "quint2x4"],
}
_RAW_OPS = ("forward_op", "backward_op", "residual_forward_op", "residual_backward_op")
_CHILD_TIMEOUT = 300


def _child_lines(output) -> list[list[str]]:
    if isinstance(output, bytes):  # what subprocess.TimeoutExpired holds, text=True or not
        output = output.decode(errors="replace")
    return [line.split(" ", 1) for line in (output or "").splitlines() if " " in line]


@pytest.fixture(scope="module")
def outcomes():
    """{dtype name: [(case, outcome), ...]} and {dtype name: how its child died}, from as few
    children as it takes (each starts Python, torch and sa_cuda: seconds): one child runs every
    dtype; where a child dies or hangs, the dtype it was in is recorded as its death and a new child
    goes on from the next dtype."""
    pending = [name for names in _FAMILIES.values() for name in names if hasattr(torch, name)]
    cases, deaths = {}, {}
    while pending:
        try:
            proc = subprocess.run(
                [sys.executable, SCRIPT, *pending],
                capture_output=True,
                text=True,
                timeout=_CHILD_TIMEOUT,
                env={**os.environ, "PYTHONFAULTHANDLER": "1"},
            )
            lines, died, stderr = _child_lines(proc.stdout), proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as hang:
            lines, died = _child_lines(hang.stdout), f"a hang ({_CHILD_TIMEOUT} s)"
            stderr = hang.stderr.decode(errors="replace") if hang.stderr else ""
        current = None
        for case, outcome in lines:
            if outcome == "BEGIN":
                current = case
                cases.setdefault(current, [])
            elif outcome != "UNAVAILABLE":
                cases[current].append((case, outcome))
        if died == 0:
            break
        current = current or pending[0]
        last = (cases.get(current) or [("(none)", "")])[-1][0]
        deaths[current] = f"child died ({died}) after case {last}:\n{stderr[-3000:]}"
        pending = pending[pending.index(current) + 1 :]
    return cases, deaths


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_bad_dtype_every_entry_point_every_layout(family, outcomes):
    cases, deaths = outcomes
    names = [name for name in _FAMILIES[family] if hasattr(torch, name)]
    for name in names:
        assert name not in deaths, f"{name}: {deaths[name]}"
    family_cases = [case for name in names for case in cases.get(name, [])]
    assert family_cases, f"no case ran for {family}"
    for case, outcome in family_cases:
        entry = case.split("/")[3]
        if entry.startswith("autograd"):
            continue  # autograd converts (or refuses) a gradient's dtype itself: no crash is the rule
        assert outcome != "RETURNED", f"{case}: accepted a tensor it must refuse"
        if entry.startswith(_RAW_OPS):
            assert outcome in ("ValueError", "NotImplementedError"), f"{case}: {outcome}"
        else:
            assert outcome == "ValueError", f"{case}: {outcome}, not the promised ValueError"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sparse_x_is_refused(variant, layout):
    x = make_input((2, 8, 3, 3))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _, fused = make_pair(variant, 8, 2)
    with pytest.raises(ValueError, match="x must be a dense"):
        fused(x.to_sparse())


@pytest.mark.parametrize("variant", VARIANTS)
def test_negative_view_inputs_read_as_their_values(variant):
    """torch._neg_view(t) stands for -t with t's memory: x, a parameter and grad_out given as such
    views give the result of the materialized tensors (before: the raw memory was read)."""
    ref, _ = make_pair(variant, 8, 2, dtype=torch.float64)
    params = [p.detach() for p in params_in_op_order(variant, ref)]
    x = make_input((2, 8, 5, 3), dtype=torch.float64)
    neg_x = torch._neg_view(-x)
    neg_p0 = torch._neg_view(-params[0])
    assert neg_x.is_neg() and neg_p0.is_neg()
    want = ref_functional(variant)(x, 2, *params)
    got = functional(variant)(neg_x, 2, neg_p0, *params[1:])
    assert max_err(got, want) < 1e-12

    fwd = getattr(torch.ops.sa_cuda, f"{variant}_forward")
    bwd = getattr(torch.ops.sa_cuda, f"{variant}_backward")
    _, mean, rstd = fwd(x, 2, *params, 1e-5)
    gy = make_input(x.shape, seed=3, dtype=torch.float64)
    want = bwd(gy, x, mean, rstd, 2, *params)
    got = bwd(torch._neg_view(-gy), neg_x, torch._neg_view(-mean), rstd, 2, neg_p0, *params[1:])
    for g, w in zip(got, want):
        assert max_err(g, w) < 1e-12


def test_groups_near_int64_max_is_refused():
    x = make_input((1, 8, 2, 2))
    ps = [torch.zeros(1)] * 6
    for groups in (2**62, 2**63 - 1):
        with pytest.raises(
            ValueError, match=r"C \(8\) must be divisible by 2 \* groups \(2 \* \d+ > C\)"
        ):
            torch.ops.sa_cuda.sa_layer_forward(x, groups, *ps, 1e-5)
        with pytest.raises(ValueError, match=r"C \(8\) must be divisible by 2 \* groups"):
            sa_cuda.sa_layer(x, groups, *ps)
