"""The fused modules' per-call path (sa_cuda/modules, OpLibrary.apply), which reads the parameters
from their owners' ``_parameters`` dicts and, outside torch.func transforms and tracing, applies
an autograd.Function without ``setup_context`` (sa_cuda/ops/library.py, _combined_forward):
every way of replacing a parameter still reaches the kernels, and both Functions give the same
bits."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VARIANTS, forward_backward, make_input, make_pair
from torch import nn
from torch.nn.utils import parametrize

import sa_cuda
from sa_cuda.testing import assert_close_to_reference

CHANNELS, GROUPS = 48, 4  # m = 6
SHAPE = (2, CHANNELS, 5, 7)


def _values(like: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(like.shape, generator=gen, dtype=torch.float64) * 0.8).to(like.dtype)


def _gate(module) -> tuple[nn.Module, str]:
    """The owner and name of the channel gate's weight (cweight, affine1.weight)."""
    return (module, "cweight") if hasattr(module, "cweight") else (module.affine1, "weight")


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def _reassign(module):
    owner, name = _gate(module)
    setattr(owner, name, nn.Parameter(_values(getattr(owner, name), 11)))
    module.gn.bias = nn.Parameter(_values(module.gn.bias, 12))


def _new_groupnorm(module):
    m = module.gn.num_channels
    gn = nn.GroupNorm(m, m, eps=1e-2).to(module.gn.weight.dtype)
    with torch.no_grad():
        gn.weight.copy_(_values(gn.weight, 13))
        gn.bias.copy_(_values(gn.bias, 14))
    module.gn = gn


def _parametrize(module):
    owner, name = _gate(module)
    parametrize.register_parametrization(owner, name, _Doubled())
    parametrize.register_parametrization(module.gn, "weight", _Doubled())


def _plain_attribute(module):
    """The parameter replaced by a plain tensor attribute computed before each forward (what
    torch.nn.utils.weight_norm does): nn.Module keeps it in __dict__, not _parameters."""
    owner, name = _gate(module)
    base = nn.Parameter(getattr(owner, name).detach().clone())
    del owner._parameters[name]
    owner.register_parameter(name + "_base", base)

    def recompute(*_):
        setattr(owner, name, 2 * getattr(owner, name + "_base"))

    recompute()
    module.register_forward_pre_hook(recompute)


@pytest.mark.parametrize(
    "replace", [_reassign, _new_groupnorm, _parametrize, _plain_attribute], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_replaced_parameters_reach_the_kernels(variant, replace):
    """The same replacement made on the float64 reference and on the fused module gives the same
    forward and backward (every parameter gradient included, under the replacement's names)."""
    ref, fused = make_pair(variant, CHANNELS, GROUPS, seed=3)
    ref = ref.double()
    replace(ref)
    replace(fused)
    x, gy = make_input(SHAPE, seed=4), make_input(SHAPE, seed=5)
    got = forward_backward(fused, x, gy)
    want = forward_backward(ref, x.double(), gy.double())
    assert set(got) == set(want)
    assert_close_to_reference(got, want, torch.float32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_functional_call_and_torch_func_grad(variant):
    """torch.func.functional_call swaps the parameters in the owners' _parameters dicts; under
    torch.func.grad the module call takes the setup_context Function (a transform is active)."""
    ref, fused = make_pair(variant, CHANNELS, GROUPS, seed=6)
    ref = ref.double()
    x, gy = make_input(SHAPE, seed=7), make_input(SHAPE, seed=8)
    swapped = {k: _values(p, 20 + i) for i, (k, p) in enumerate(fused.named_parameters())}

    def loss(module, params, x_):
        return (torch.func.functional_call(module, params, (x_,)) * gy.to(x_.dtype)).sum()

    got = torch.func.grad(loss, argnums=(1, 2))(fused, swapped, x)
    want = torch.func.grad(loss, argnums=(1, 2))(
        ref, {k: v.double() for k, v in swapped.items()}, x.double()
    )
    with torch.no_grad():
        got_out = torch.func.functional_call(fused, swapped, (x,))
        want_out = torch.func.functional_call(
            ref, {k: v.double() for k, v in swapped.items()}, (x.double(),)
        )
    assert_close_to_reference(
        {"out": got_out, "x": got[1], **got[0]},
        {"out": want_out, "x": want[1], **want[0]},
        torch.float32,
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_deleted_parameter_raises_as_the_reference_does(variant):
    ref, fused = make_pair(variant, CHANNELS, GROUPS)
    x = make_input(SHAPE)
    for module in (ref, fused):
        del module.gn.weight
        with pytest.raises(AttributeError, match="weight"):
            module(x)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_both_functions_give_the_same_bits(variant, residual):
    """A training call outside transforms takes the Function without setup_context (its grad_fn
    has the public Function's name); its output and every gradient equal, bit for bit, those of
    the public Function (sa_cuda.ShuffleAttentionFunction / ...ResidualFunction) applied
    directly."""
    _, fused = make_pair(variant, CHANNELS, GROUPS, seed=9)
    twin = copy.deepcopy(fused)
    x, gy = make_input(SHAPE, seed=10), make_input(SHAPE, seed=11)
    identity = make_input(SHAPE, seed=12).requires_grad_() if residual else None

    x1 = x.clone().requires_grad_()
    out = fused(x1, identity=identity)
    public = (
        sa_cuda.ShuffleAttentionResidualFunction if residual else sa_cuda.ShuffleAttentionFunction
    )
    assert type(out.grad_fn).__name__ == public.__name__ + "Backward"
    assert type(out.grad_fn) is not public._backward_cls
    out.backward(gy)
    got = {"out": out, "x": x1.grad, **{k: p.grad for k, p in fused.named_parameters()}}
    if residual:
        got["identity"], identity.grad = identity.grad, None

    x2 = x.clone().requires_grad_()
    ordered = [dict(twin.named_parameters())[k] for k in twin._variant.state_keys]
    if residual:
        out2 = public.apply(variant, x2, identity, GROUPS, twin.gn.eps, *ordered)[0]
    else:
        out2 = public.apply(variant, x2, GROUPS, twin.gn.eps, *ordered)[0]
    assert type(out2.grad_fn) is public._backward_cls
    out2.backward(gy)
    want = {"out": out2, "x": x2.grad, **{k: p.grad for k, p in twin.named_parameters()}}
    if residual:
        want["identity"] = identity.grad
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
