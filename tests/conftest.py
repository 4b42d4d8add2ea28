"""Shared fixtures and helpers of the sa_cuda test suite.

Layout: tests/<folder> mirrors the package (ops/, modules/, models/, test_convert.py) and the
layers below it (kernels/: values of the CPU and CUDA kernels; emulator/: the SIMT emulator that
runs the CUDA source on the CPU; extension/: what the build made, its machine code; scripts/,
benchmarks/). Not "build/": pytest never looks into a folder of that name (norecursedirs), and the
files that stood there were left out of every run until they moved. Helpers shared by several
test files live here, in emulation.py, hostile_inputs.py and (the accuracy criteria, also used by
the benchmarks) sa_cuda/testing.py; test files never import from each other.

Running: ``python -m pytest tests -q -n auto --dist loadfile`` (what CI runs: one pytest-xdist
worker per core, each test file on one worker); ``-m "not slow"`` leaves out the tests
marked slow (the emulated gradchecks and the largest shapes: pytest.ini) for a quick local run.

Backends (the ``backend`` fixture): "cpu" (the C++ kernels, torch.ops.sa_cuda), "emulated" (the
CUDA source compiled for the CPU SIMT emulator, torch.ops.sa_cuda_emu: tests/emulation.py) and
"cuda" (the CUDA kernels on a GPU; skipped, with the reason, without one).

Every test compares the fused implementation (sa_cuda.SALayer / sa_cuda.ShuffleAttention, the
functionals sa_cuda.sa_layer / sa_cuda.shuffle_attention and the raw ops torch.ops.sa_cuda.*)
with the pure-PyTorch reference in sa_cuda.reference, run on the same parameter values.

Parameters are always RANDOM: the default init of SALayer (cweight = sweight = 0) turns both gates
into constants and would hide almost every bug in the gate math and its gradients.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os

# Before torch loads OpenMP (libgomp reads this once, at load): threads that finish their share of
# a parallel region sleep instead of spinning. The suite runs one pytest-xdist worker per core, each
# with torch's default of one thread per core; spinning threads took the cores the other workers'
# threads needed, and the kernel tests took 3.5 times as long (test_forward_backward.py and
# test_edge_inputs.py on 2 cores: 88 s, 25 s passive). Child processes of the tests inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from emulation import emulated_library
from torch.utils._python_dispatch import TorchDispatchMode

import sa_cuda
from sa_cuda import reference
from sa_cuda.ops import SA_CUDA_LIBRARY
from sa_cuda.testing import assert_close_to_reference

# ------------------------------------------------------------------------------------------------
# Devices: CPU always; CUDA when a GPU is present AND the extension was built with CUDA kernels.
# ------------------------------------------------------------------------------------------------
CUDA_OK = bool(torch.cuda.is_available() and sa_cuda.fused_available("cuda"))
if not torch.cuda.is_available():
    CUDA_REASON = "no CUDA device on this machine"
elif not CUDA_OK:
    CUDA_REASON = "sa_cuda was built without CUDA kernels"
else:
    CUDA_REASON = ""

devices = ["cpu"] + (["cuda"] if CUDA_OK else [])

# Use these in @pytest.mark.parametrize("device", DEVICES): the CUDA case shows as SKIPPED (with
# the reason) on machines without a GPU instead of silently disappearing.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not CUDA_OK, reason=CUDA_REASON)),
]

VARIANTS = ("sa_layer", "shuffle_attention")

_REF_CLS = {"sa_layer": reference.SALayer, "shuffle_attention": reference.ShuffleAttention}
_FUSED_CLS = {"sa_layer": sa_cuda.SALayer, "shuffle_attention": sa_cuda.ShuffleAttention}
_FUNCTIONAL = {"sa_layer": sa_cuda.sa_layer, "shuffle_attention": sa_cuda.shuffle_attention}
_REF_FUNCTIONAL = {"sa_layer": reference.sa_layer, "shuffle_attention": reference.shuffle_attention}

# state_dict / named_parameters keys in the order of the functionals' / ops' parameter arguments.
PARAM_KEYS = {v.name: v.state_keys for v in sa_cuda.variants.VARIANTS}
# Names of the functionals' parameter arguments (the Python ValueError messages use these).
PARAM_ARG_NAMES = {v.name: v.param_names for v in sa_cuda.variants.VARIANTS}


def ref_class(variant):
    return _REF_CLS[variant]


def fused_class(variant):
    return _FUSED_CLS[variant]


def functional(variant):
    return _FUNCTIONAL[variant]


def ref_functional(variant):
    return _REF_FUNCTIONAL[variant]


def fwd_op(variant):
    return SA_CUDA_LIBRARY.forward_op(variant)


def bwd_op(variant):
    return SA_CUDA_LIBRARY.backward_op(variant)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with seeded random values.

    Vectors (gates' weights and biases, GroupNorm affine): randn * 0.75 -- signs of both kinds
    and magnitudes around 0.5..1, so no term of the math is switched off.
    Matrices (the 1x1-conv weights, m x m): randn * 1.5 / sqrt(m), so the gate pre-activation
    z = W @ v keeps O(1) variance for every m (with randn alone, m = 64 would saturate the
    sigmoids and make the gate gradients vanish, which hides gradient bugs).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 4 and p.shape[0] == p.shape[1] and p.shape[0] > 1:
                scale = 1.5 / math.sqrt(p.shape[0])
            else:
                scale = 0.75
            vals = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
            p.copy_(vals.to(p.dtype))
    return module


def make_ref(variant, channels, groups, *, seed=0, dtype=torch.float32, device="cpu"):
    """Reference module (sa_cuda.reference) with random parameters."""
    ref = _REF_CLS[variant](channels, groups)
    randomize_(ref, seed)
    return ref.to(device=device, dtype=dtype)


def make_fused_like(variant, ref, *, dtype=None, device=None):
    """Fused module with ref's parameter values (strict state_dict load)."""
    fused = _FUSED_CLS[variant](ref.gn.num_channels * 2 * ref.groups, ref.groups)
    fused.load_state_dict(ref.state_dict(), strict=True)
    some = next(ref.parameters())
    return fused.to(device=device or some.device, dtype=dtype or some.dtype)


def make_pair(variant, channels, groups, *, seed=0, dtype=torch.float32, device="cpu"):
    """(reference module, fused module) with identical random parameters."""
    ref = make_ref(variant, channels, groups, seed=seed, dtype=dtype, device=device)
    return ref, make_fused_like(variant, ref)


def clone_as(module, dtype):
    """Deep copy of ``module`` converted to ``dtype`` (the original is left alone)."""
    return copy.deepcopy(module).to(dtype)


def params_in_op_order(variant, module):
    named = dict(module.named_parameters())
    return [named[k] for k in PARAM_KEYS[variant]]


def make_input(shape, *, seed=0, dtype=torch.float32, device="cpu", offset=0.0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset
    return x.to(device=device, dtype=dtype)


def forward_backward(module, x, grad_out):
    """Runs module(x).backward(grad_out) on a fresh leaf copy of x.

    Returns {"out": ..., "x": dx, <param key>: grad} (detached, in their own dtypes). Gradients of
    the module are reset first. grad_out is random in the tests (a sum() loss would make the
    incoming gradient 1 everywhere and hide channel-shuffle mistakes in the backward).
    """
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(grad_out)
    res = {"out": out.detach(), "x": x.grad}
    for name, p in module.named_parameters():
        res[name] = p.grad
    return res


def run_raw_ops(backend, variant, x, gy, groups, params, *, saved=None, eps=1e-5):
    """The backend's raw ops: the forward's (out, mean, rstd) and the backward's 7 results
    (grad_x, six parameter gradients). With ``saved`` (mean, rstd) the backward takes those
    statistics instead of the forward's, so that two runs being compared see the same ones."""
    forward = backend.forward_op(variant)(x, groups, *params, eps)
    mean, rstd = saved if saved is not None else forward[1:]
    grads = backend.backward_op(variant)(gy, x, mean, rstd, groups, *params)
    return forward, grads


# Every dtype the kernels take, and their test ids, for parametrize(..., ids=DTYPE_IDS).
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]


class OpNames(TorchDispatchMode):
    """Records the name of every op dispatched inside ``with OpNames() as seen:`` in
    ``seen.names`` ("sa_cuda.sa_layer_residual_forward", "aten.add", ...)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def assert_identical(got, want, what=""):
    """The results ``got`` equal ``want`` bit for bit, one by one (dtype, shape and values)."""
    assert len(got) == len(want), (what, len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, i)
        assert torch.equal(g, w), (
            f"{what} result {i}: max diff {(g.double() - w.double()).abs().max()}"
        )


def op_params(variant, channels, groups, seed, dtype=torch.float32):
    """Random parameters (detached) in the ops' argument order."""
    ref = make_ref(variant, channels, groups, seed=seed)
    return [p.detach().to(dtype) for p in params_in_op_order(variant, ref)]


def all_grads(fn, x, params, gy):
    """{"out", "x", "p0".."p5"}: fn(x, *params) on fresh leaf copies and its gradients for gy."""
    x = x.detach().clone().requires_grad_(True)
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    out = fn(x, *ps)
    gs = torch.autograd.grad(out, [x, *ps], gy)
    return {"out": out.detach(), "x": gs[0], **{f"p{i}": g for i, g in enumerate(gs[1:])}}


def autocast_if_mixed(x: torch.Tensor, params):
    """torch.autocast when a low-precision x meets parameters of another dtype, the mode in which
    they meet in training: there the fused layer keeps x's dtype. (Outside autocast it computes in
    the promoted dtype, as eager does: tests/modules/test_modules.py.)"""
    mixed = x.dtype in (torch.float16, torch.bfloat16) and any(p.dtype != x.dtype for p in params)
    return torch.autocast(x.device.type, dtype=x.dtype) if mixed else contextlib.nullcontext()


def run_high_precision(
    variant,
    backend,
    shape,
    groups,
    *,
    dtype=torch.float32,
    seeds=(11, 1, 2),
    offset=0.0,
    scale=1.0,
    x=None,
    eps=1e-5,
    memory_format=torch.contiguous_format,
):
    """(fused, eager reference in dtype, float64 reference) results of forward + backward on the
    backend: the reference module's parameters from seeds[0], x and grad_out from seeds[1] and
    seeds[2] (in memory_format)."""
    dev = backend.device
    ref = make_ref(variant, shape[1], groups, seed=seeds[0], dtype=dtype, device=dev)
    ref.gn.eps = eps
    if x is None:
        x = make_input(shape, seed=seeds[1], dtype=dtype, offset=offset, scale=scale)
    x = x.to(dev).contiguous(memory_format=memory_format)
    gy = make_input(shape, seed=seeds[2], dtype=dtype, device=dev)
    gy = gy.contiguous(memory_format=memory_format)
    Fu = forward_backward(backend.module_like(variant, ref), x, gy)
    ref64 = clone_as(ref, torch.float64)
    R = forward_backward(ref64, x.double(), gy.double())
    E = R if dtype == torch.float64 else forward_backward(ref, x, gy)
    return Fu, E, R


def low_precision_runs(
    variant,
    shape,
    groups,
    dtype,
    *,
    params="params_fp32",
    device=None,
    memory_format=None,
    backend=None,
):
    """One forward + backward of a bf16/fp16 x and grad_out (in memory_format when given), for
    sa_cuda.testing.assert_close_to_reference: (fused, float64 run with exactly the fused module's
    parameter values, eager in dtype, float64 run with eager's parameter values, the fused
    module's parameter dtype). params: "params_lowp" (the fused module in dtype) or
    "params_fp32" (fp32 parameters, under autocast as in training). eager and its float64 run are
    None where eager has no kernel for dtype on device (an fp16 kernel missing on CPU in some
    torch builds). backend: the Backend whose kernels the fused module runs (default: the
    sa_cuda module on device). device: where inputs and modules live (default: the backend's
    device, else the CPU)."""
    if device is None:
        device = backend.device if backend is not None else "cpu"
    elif backend is not None and torch.device(device) != torch.device(backend.device):
        raise ValueError(f"device {device} is not the {backend.name} backend's {backend.device}")
    C = shape[1]
    base = make_ref(variant, C, groups, seed=11, dtype=torch.float32, device=device)
    fused = (
        make_fused_like(variant, base) if backend is None else backend.module_like(variant, base)
    )
    if params == "params_lowp":
        fused = fused.to(dtype)
    ref64_fused = ref_class(variant)(C, groups)
    ref64_fused.load_state_dict(fused.state_dict(), strict=True)
    ref64_fused = ref64_fused.to(device=device, dtype=torch.float64)
    eager = clone_as(base, dtype)
    x = make_input(shape, seed=1, dtype=dtype, device=device)
    gy = make_input(shape, seed=2, dtype=dtype, device=device)
    if memory_format is not None:
        x, gy = (
            x.contiguous(memory_format=memory_format),
            gy.contiguous(memory_format=memory_format),
        )
    with autocast_if_mixed(x, list(fused.parameters())):
        F = forward_backward(fused, x, gy)
    RF = forward_backward(ref64_fused, x.double(), gy.double())
    try:
        E = forward_backward(eager, x, gy)
    except RuntimeError:
        return F, RF, None, None, next(fused.parameters()).dtype
    RE = forward_backward(clone_as(eager, torch.float64), x.double(), gy.double())
    return F, RF, E, RE, next(fused.parameters()).dtype


def check_cpu_against_reference(variant, shape, groups, dtype, memory_format, offset=0.0):
    """The CPU layer's output and every gradient against the float64 reference (the criteria of
    test_forward_backward.py), x in ``memory_format``: float32 and float64 by run_high_precision
    (x at ``offset`` std), the 16-bit dtypes by low_precision_runs (centered only: an offset
    skips, test_extreme_magnitudes.py holds those); out and grad_x in x's memory format."""
    if dtype in (torch.float32, torch.float64):
        F, E, R = run_high_precision(
            variant,
            BACKENDS["cpu"],
            shape,
            groups,
            dtype=dtype,
            offset=offset,
            memory_format=memory_format,
        )
        assert_close_to_reference(F, R, dtype, eager=E)
    else:
        if offset:
            pytest.skip("16-bit planes at an offset: test_extreme_magnitudes.py")
        F, R, E, RE, param_dtype = low_precision_runs(
            variant, shape, groups, dtype, memory_format=memory_format
        )
        assert_close_to_reference(F, R, dtype, eager=E, eager_ref64=RE, param_dtype=param_dtype)
    for key in ("out", "x"):
        assert F[key].is_contiguous(memory_format=memory_format), key


def misaligned_copy(t):
    """t's values and strides in a buffer one element past its start: every plane (or row) pointer
    misaligned, so that the CUDA kernels must not read the tensor as wide packs."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return buf[1:].as_strided(t.shape, t.stride()).copy_(t)


def input_at_offset(shape, storage_offset, dtype, seed, **kwargs):
    """make_input's values as a contiguous view that starts ``storage_offset`` elements into its
    storage (1: every plane pointer misaligned, which selects the kernels' scalar paths)."""
    n = torch.Size(shape).numel()
    flat = make_input((n + storage_offset,), seed=seed, dtype=dtype, **kwargs)
    return flat[storage_offset:].view(shape)


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------
class Backend:
    """One implementation of the fused ops, as the tests drive it."""

    def __init__(self, name: str, device: str):
        self.name = name
        self.device = device  # where inputs and parameters live

    def __repr__(self):
        return f"Backend({self.name!r})"

    @property
    def library(self):
        """The op library (sa_cuda.ops.OpLibrary): sa_cuda (cpu, cuda) or sa_cuda_emu (emulated,
        built on first use by tests/emulation.py)."""
        return emulated_library() if self.name == "emulated" else SA_CUDA_LIBRARY

    @property
    def ops(self):
        """The op namespace: torch.ops.sa_cuda (cpu, cuda) or torch.ops.sa_cuda_emu (emulated)."""
        return getattr(torch.ops, self.library.namespace)

    def forward_op(self, variant):
        return self.library.forward_op(variant)

    def backward_op(self, variant):
        return self.library.backward_op(variant)

    def residual_forward_op(self, variant):
        return self.library.residual_forward_op(variant)

    def residual_backward_op(self, variant):
        return self.library.residual_backward_op(variant)

    def apply(self, variant, x, groups, params, eps=1e-5, identity=None):
        """The fused layer over explicit parameters, with autograd: the functionals' own path
        (OpLibrary.apply) over this backend's ops; with ``identity``, the residual epilogue."""
        return self.library.apply(variant, x, groups, tuple(params), eps, identity)

    def module_like(self, variant, ref, dtype=None):
        """A module with ref's parameter values (in ``dtype``, default ref's) and GroupNorm eps,
        on this backend's device, whose forward runs this backend."""
        dtype = dtype or next(ref.parameters()).dtype
        if self.name != "emulated":
            fused = make_fused_like(variant, ref, dtype=dtype, device=self.device)
            fused.gn.eps = ref.gn.eps
            return fused
        backend = self

        class Emulated(type(ref)):
            def forward(self, x):
                return backend.apply(
                    variant, x, self.groups, params_in_op_order(variant, self), self.gn.eps
                )

        module = Emulated(2 * ref.groups * ref.gn.num_channels, ref.groups)
        module.load_state_dict(ref.state_dict(), strict=True)
        module.gn.eps = ref.gn.eps
        return module.to(dtype)


BACKENDS = {
    "cpu": Backend("cpu", "cpu"),
    "emulated": Backend("emulated", "cpu"),
    "cuda": Backend("cuda", "cuda"),
}
EMULATED = BACKENDS["emulated"]  # for the tests of launch paths that only the CUDA source has


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> Backend:
    """Each backend in turn (narrow it with @pytest.mark.parametrize("backend", [...],
    indirect=True)); "cuda" is skipped, with the reason, where there is no GPU."""
    if request.param == "cuda" and not CUDA_OK:
        pytest.skip(CUDA_REASON)
    return BACKENDS[request.param]
