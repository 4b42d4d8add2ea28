"""Shared fixtures and helpers of the sa_cuda test suite.

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

import pytest
import torch

import sa_cuda
from sa_cuda import reference

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
_FWD_OP = {"sa_layer": "sa_layer_forward", "shuffle_attention": "shuffle_attention_forward"}
_BWD_OP = {"sa_layer": "sa_layer_backward", "shuffle_attention": "shuffle_attention_backward"}

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
    return getattr(torch.ops.sa_cuda, _FWD_OP[variant])


def bwd_op(variant):
    return getattr(torch.ops.sa_cuda, _BWD_OP[variant])


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


def max_abs(t: torch.Tensor) -> float:
    return t.detach().double().abs().max().item() if t.numel() else 0.0


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_low_precision_close(F: dict, E: dict, R: dict, dtype: torch.dtype) -> None:
    """The bf16/fp16 criterion (test_forward_backward.py): every output of the fused run F is in
    dtype and its error against the float64 run R is at most twice the eager run E's (same dtype),
    plus one unit of the dtype at R's largest magnitude."""
    eps = torch.finfo(dtype).eps
    for key in F:
        assert F[key].dtype == dtype, key
        err, err_eager = max_err(F[key], R[key]), max_err(E[key], R[key])
        bound = 2.0 * err_eager + eps * max_abs(R[key]) + 1e-10
        assert err <= bound, f"{key}: fused {err:.3g} > bound {bound:.3g} (eager {err_eager:.3g})"


def autocast_if_mixed(x: torch.Tensor, params):
    """torch.autocast when a low-precision x meets parameters of another dtype, the mode in which
    they meet in training: there the fused layer keeps x's dtype. (Outside autocast it computes in
    the promoted dtype, as eager does: tests/test_modules.py.)"""
    mixed = x.dtype in (torch.float16, torch.bfloat16) and any(p.dtype != x.dtype for p in params)
    return torch.autocast(x.device.type, dtype=x.dtype) if mixed else contextlib.nullcontext()
