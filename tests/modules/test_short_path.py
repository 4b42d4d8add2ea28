"""The fused modules' short path (sa_cuda/modules/shuffle_attention.py, ``_short_path``): where
OpLibrary.apply would hand the ops the arguments as they are, forward calls them without apply's
Python checks and conversions. It must give what the full path gives, bit for bit, take the full
path wherever apply would convert or trace, and raise, for every refused input, the error the
full path raises."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, VARIANTS, make_input, make_pair
from torch import nn

from sa_cuda.modules import shuffle_attention as modules_code
from sa_cuda.ops import library
from sa_cuda.testing import assert_close_to_reference

CHANNELS, GROUPS = 48, 4  # m = 6
SHAPE = (2, CHANNELS, 5, 7)


@pytest.fixture
def apply_calls(monkeypatch) -> list:
    """One entry per OpLibrary.apply call that reaches its checks (the full path)."""
    calls: list = []
    checks = library.check_forward_args

    def counted(*args, **kwargs):
        calls.append(args[0].name)
        return checks(*args, **kwargs)

    monkeypatch.setattr(library, "check_forward_args", counted)
    return calls


def _full_path_only(monkeypatch) -> None:
    monkeypatch.setattr(modules_code, "_short_path", lambda *args: None)


def _run(module, x, identity, gy, grad: bool) -> dict:
    """Output (and with grad, the gradients of x, identity and every parameter)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(grad)
    if identity is not None:
        identity = identity.detach().clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = module(x, identity=identity)
    got = {"out": out.detach()}
    if grad:
        out.backward(gy)
        got.update(x=x.grad, **{k: p.grad for k, p in module.named_parameters()})
        if identity is not None:
            got["identity"] = identity.grad
    return got


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_short_path_equals_full_path(
    device, variant, residual, dtype, layout, grad, apply_calls, monkeypatch
):
    """A module of one dtype skips apply (no check_forward_args call) and gives the full path's
    output and gradients, bit for bit."""
    _, fused = make_pair(variant, CHANNELS, GROUPS, seed=1, dtype=dtype, device=device)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    on = dict(dtype=dtype, device=device)
    x = make_input(SHAPE, seed=2, **on).contiguous(memory_format=fmt)
    identity = make_input(SHAPE, seed=3, **on).contiguous(memory_format=fmt)
    identity = identity if residual else None
    gy = make_input(SHAPE, seed=4, **on)
    got = _run(fused, x, identity, gy, grad)
    assert apply_calls == [], "the short path was not taken"
    _full_path_only(monkeypatch)
    want = _run(fused, x, identity, gy, grad)
    assert apply_calls == [variant]
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].stride() == value.stride(), key
        assert torch.equal(got[key], value), key


def _bf16_x(module, x, identity):
    return x.bfloat16(), identity


def _bf16_identity(module, x, identity):
    return x, identity.bfloat16()


def _bf16_parameter(module, x, identity):
    module.gn.bias.data = module.gn.bias.data.bfloat16()
    return x, identity


def _flat_channel_gate(module, x, identity):
    """A channel-gate weight of (m,) or (m * m,) elements in the functionals' other shape."""
    owner, name = (module, "cweight") if hasattr(module, "cweight") else (module.affine1, "weight")
    weight = getattr(owner, name)
    shape = (weight.numel(),) if weight.dim() == 4 and weight.shape[0] == 1 else weight.shape[:2]
    setattr(owner, name, nn.Parameter(weight.detach().reshape(shape)))
    return x, identity


@pytest.mark.parametrize(
    "change",
    [_bf16_x, _bf16_identity, _bf16_parameter, _flat_channel_gate],
    ids=lambda f: f.__name__.lstrip("_"),
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_full_path_where_apply_converts(variant, change, apply_calls):
    """Mixed dtypes (apply promotes) and a parameter in another shape that the functionals accept
    take the full path: eager's dtype (float32 here) and the float64 reference's values."""
    ref, fused = make_pair(variant, CHANNELS, GROUPS, seed=5)
    x, identity = change(fused, make_input(SHAPE, seed=6), make_input(SHAPE, seed=7))
    with torch.no_grad():
        got = fused(x, identity=identity)
    assert apply_calls == [variant]
    ref64 = ref.double()
    with torch.no_grad():
        for key, p in ref64.named_parameters():  # the changed module's values, in float64
            p.copy_(fused.get_parameter(key).double().reshape(p.shape))
        want = torch.relu(ref64(x.double()) + identity.double())
    assert got.dtype == torch.float32
    assert_close_to_reference({"out": got}, {"out": want}, torch.float32)


@pytest.mark.parametrize("value", [[6], 6.0, None])
def test_full_path_where_gn_channels_are_not_an_int(value, apply_calls):
    """gn.num_channels is read by the short path alone (the parameters' shapes): a value that is
    not an int takes the full path, which computes the layer as before."""
    _, fused = make_pair("sa_layer", CHANNELS, GROUPS, seed=11)
    x, identity = make_input(SHAPE, seed=12), make_input(SHAPE, seed=13)
    with torch.no_grad():
        want = fused(x, identity=identity)
        fused.gn.num_channels = value
        got = fused(x, identity=identity)
    assert apply_calls == ["sa_layer"]
    assert torch.equal(got, want)


def test_full_path_under_jit_trace(apply_calls):
    _, fused = make_pair("sa_layer", CHANNELS, GROUPS)
    torch.jit.trace(fused, (make_input(SHAPE),), check_trace=False)
    assert apply_calls == ["sa_layer"]


def _sparse(t):
    return t.to_sparse()


def _set_param(name, label, value):
    """Replaces the parameter at state_dict key ``name`` (no checks: a hostile replacement)."""

    def change(module, x, identity):
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        owner._parameters[attr] = value(owner._parameters[attr])
        return x, identity

    change.__name__ = f"{name}_{label}"
    return change


def _set_attr(owner_name, attr, value):
    def change(module, x, identity):
        setattr(module.get_submodule(owner_name), attr, value)
        return x, identity

    change.__name__ = f"{owner_name or 'layer'}.{attr}={value!r}"
    return change


def _input(fn, name):
    def change(module, x, identity):
        return fn(x, identity)

    change.__name__ = name
    return change


HOSTILE = [
    _input(lambda x, i: (torch.cat([x, x], 1), torch.cat([i, i], 1)), "x_other_channels"),
    _input(lambda x, i: (x[0], i[0]), "x_3d"),
    _input(lambda x, i: (x[..., :0], i[..., :0]), "x_empty_plane"),
    _input(lambda x, i: (_sparse(x), i), "x_sparse"),
    _input(lambda x, i: (x, _sparse(i)), "identity_sparse"),
    _input(lambda x, i: (x, i[:, :, :-1]), "identity_shape"),
    _input(lambda x, i: (x, i.to("meta")), "identity_meta"),
    _input(lambda x, i: (x.to("meta"), i.to("meta")), "x_meta"),
    _input(lambda x, i: (x.int(), i.int()), "x_int"),
    _input(lambda x, i: (x.tolist(), i), "x_list"),
    _input(lambda x, i: (x, 1.0), "identity_float"),
    _set_param("gn.bias", "sparse", lambda p: nn.Parameter(p.detach().to_sparse())),
    _set_param("gn.weight", "meta", lambda p: nn.Parameter(p.detach().to("meta"))),
    _set_param("gn.weight", "numel", lambda p: nn.Parameter(torch.ones(p.numel() + 1))),
    _set_param("gn.weight", "2x3", lambda p: nn.Parameter(p.detach().reshape(2, -1))),
    _set_param("gn.bias", "none", lambda p: None),
    _set_attr("gn", "eps", -1.0),
    _set_attr("gn", "eps", math.nan),
    _set_attr("gn", "eps", True),
    _set_attr("", "groups", 0),
    _set_attr("", "groups", True),
    _set_attr("", "groups", 5),
    _set_attr("", "groups", 4.0),
    _set_attr("", "groups", 2**63),
    _input(lambda x, i: (torch.nested.nested_tensor(list(x)), i), "x_nested"),
]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
@pytest.mark.parametrize("change", HOSTILE, ids=lambda f: f.__name__)
@pytest.mark.parametrize("variant", VARIANTS)
def test_refused_inputs_raise_the_full_paths_error(variant, change, grad, monkeypatch):
    """Every refused call raises what the full path raises for it: the same type and message
    (apply's ValueError where apply refuses), whether or not the short path tried first."""
    _, fused = make_pair(variant, CHANNELS, GROUPS, seed=8)
    x, identity = change(fused, make_input(SHAPE, seed=9), make_input(SHAPE, seed=10))
    if grad and isinstance(x, torch.Tensor) and x.is_floating_point():
        x = x.requires_grad_()

    def raised():
        with torch.set_grad_enabled(grad), pytest.raises(Exception) as info:
            fused(x, identity=identity)
        return type(info.value), str(info.value)

    got = raised()
    _full_path_only(monkeypatch)
    want = raised()
    assert got == want
    assert want[0] is ValueError, want


def _fake_mode(module, x, identity):
    """Under FakeTensorMode, a fake x of twice the channels (the mode forwards any op it meets)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        module(mode.from_tensor(torch.cat([x, x], 1)), identity=None)


def _pack_hook_refuses(module, x, identity):
    """A saved-tensors hook that refuses the first tensor it is given (an offload budget)."""
    packed = []

    def pack(t):
        packed.append(t)
        if len(packed) == 1:
            raise ValueError("offload budget exceeded")
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x.requires_grad_(), identity=identity)
    finally:
        assert len(packed) == 1, len(packed)  # one attempt, not a retry


def _forward_ad(module, x, identity):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        module(fwAD.make_dual(x, torch.ones_like(x)), identity=identity)


def _vmap_over_no_parameters(module, x, identity):
    """Parameters mapped over an empty dimension (the op never runs) and a 3-D x."""
    params = {k: v.detach()[None].expand(0, *v.shape).clone() for k, v in module.named_parameters()}
    call = torch.func.functional_call
    torch.func.vmap(lambda p: call(module, p, (x[0],)))(params)


def _deleted_groups_and_gn(module, x, identity):
    del module.groups
    del module.gn
    module(x, identity=identity)


@pytest.mark.parametrize(
    "scenario",
    [_fake_mode, _pack_hook_refuses, _forward_ad, _vmap_over_no_parameters, _deleted_groups_and_gn],
    ids=lambda f: f.__name__.lstrip("_"),
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_modes_hooks_and_transforms_fail_as_the_full_path(variant, scenario, monkeypatch):
    """The short path neither tries the op where the full path's checks refuse (a mode or a
    transform would see an op call the full path never makes, and raise its own error) nor
    catches what the op or user code raises (a hook's error would be swallowed and the op run
    again): each scenario ends with the full path's exception, after as many op calls."""
    calls = []
    dispatch = library.OpLibrary.dispatch

    def counted(self, *args, **kwargs):
        calls.append(args[0])
        return dispatch(self, *args, **kwargs)

    monkeypatch.setattr(library.OpLibrary, "dispatch", counted)

    def outcome():
        _, fused = make_pair(variant, CHANNELS, GROUPS, seed=14)
        x, identity = make_input(SHAPE, seed=15), make_input(SHAPE, seed=16)
        calls.clear()
        with pytest.raises(Exception) as info:
            scenario(fused, x, identity)
        return type(info.value), str(info.value), len(calls)

    got = outcome()
    _full_path_only(monkeypatch)
    assert got == outcome()
