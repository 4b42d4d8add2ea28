"""The fake (meta) kernels refuse what the real kernels refuse, with a ValueError naming the same
argument and rule, so torch.compile and the meta device report the same error as eager; and
torch.compile of a module or functional reports the eager ValueError."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, bwd_op, fused_class, fwd_op, make_input, make_ref, params_in_op_order
from torch._subclasses.fake_tensor import FakeTensorMode

G, C, M, SHAPE = 2, 16, 4, (2, 16, 5, 3)


def _setup(variant):
    params = [p.detach() for p in params_in_op_order(variant, make_ref(variant, C, G, seed=1))]
    x = make_input(SHAPE)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    return x, params, mean, rstd


def _forward_cases(variant, x, params):
    matrix = variant == "shuffle_attention"
    return {
        "3-D x": (x[0], G, *params, 1e-5),
        "5-D x": (x[None], G, *params, 1e-5),
        "int x": (x.to(torch.int32), G, *params, 1e-5),
        "float8 x": (x.to(torch.float8_e4m3fn), G, *params, 1e-5),
        "complex x": (x.to(torch.complex64), G, *params, 1e-5),
        "groups 0": (x, 0, *params, 1e-5),
        "groups -3": (x, -3, *params, 1e-5),
        "groups 3": (x, 3, *params, 1e-5),
        "groups 2^62": (x, 2**62, *params, 1e-5),
        "C 0": (x[:, :0], G, *params, 1e-5),
        "H 0": (x[:, :, :0], G, *params, 1e-5),
        "eps -1": (x, G, *params, -1.0),
        "eps nan": (x, G, *params, float("nan")),
        "param numel": (x, G, torch.randn(M * M + 1 if matrix else M + 1), *params[1:], 1e-5),
        "param dtype": (x, G, *params[:3], params[3].to(torch.float8_e5m2), *params[4:], 1e-5),
        "param int": (x, G, *params[:5], params[5].to(torch.int64), 1e-5),
    }


def _backward_cases(variant, x, params, mean, rstd):
    gy = torch.randn(SHAPE)
    return {
        "3-D x": (gy, x[0], mean, rstd, G, *params),
        "groups 3": (gy, x, mean, rstd, 3, *params),
        "grad_out shape": (gy[:1], x, mean, rstd, G, *params),
        "grad_out dtype": (gy.to(torch.complex64), x, mean, rstd, G, *params),
        "mean shape": (gy, x, mean[:, :-1], rstd, G, *params),
        "rstd dtype": (gy, x, mean, rstd.double(), G, *params),
        "mean int": (gy, x, mean.long(), rstd, G, *params),
        "param numel": (gy, x, mean, rstd, G, *params[:4], torch.randn(M + 1), params[5]),
        "param dtype": (gy, x, mean, rstd, G, params[0].to(torch.bool), *params[1:]),
    }


def _rule(message: str) -> str:
    """The argument and rule of a message: without the C++ "sa_cuda: " prefix and the value
    after "got" (C++ and Python print shapes and dtypes differently)."""
    return message.removeprefix("sa_cuda: ").split(", got")[0].split(" got ")[0]


def _meta(args):
    return tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)


def _fake(mode, args):
    return tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)


def _errors(op, args):
    with pytest.raises(ValueError) as real:
        op(*args)
    with pytest.raises(ValueError) as meta:
        op(*_meta(args))
    with FakeTensorMode() as mode:
        fake_args = _fake(mode, args)
        with pytest.raises(ValueError) as fake:
            op(*fake_args)
    return str(real.value), str(meta.value), str(fake.value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_fake_refuses_what_the_kernel_refuses(variant):
    x, params, _, _ = _setup(variant)
    for name, args in _forward_cases(variant, x, params).items():
        real, meta, fake = _errors(fwd_op(variant), args)
        assert _rule(real) == _rule(meta) == _rule(fake), (name, real, meta, fake)


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_fake_refuses_what_the_kernel_refuses(variant):
    x, params, mean, rstd = _setup(variant)
    for name, args in _backward_cases(variant, x, params, mean, rstd).items():
        real, meta, fake = _errors(bwd_op(variant), args)
        assert _rule(real) == _rule(meta) == _rule(fake), (name, real, meta, fake)


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_and_fake_accept_what_the_kernel_accepts(variant):
    x, params, mean, rstd = _setup(variant)
    out = fwd_op(variant)(*_meta((x, G, *params, 1e-5)))
    assert [tuple(t.shape) for t in out] == [SHAPE, SHAPE[:2], SHAPE[:2]]
    grads = bwd_op(variant)(*_meta((torch.randn(SHAPE), x, mean, rstd, G, *params)))
    assert [tuple(g.shape) for g in grads] == [SHAPE] + [tuple(p.shape) for p in params]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bad", ["3-D", "channels", "float8"])
def test_compile_reports_the_eager_error(variant, bad):
    layer = fused_class(variant)(C, G)
    x = {
        "3-D": torch.randn(16, 5, 3),
        "channels": torch.randn(2, 12, 5, 3),
        "float8": torch.randn(SHAPE).to(torch.float8_e4m3fn),
    }[bad]
    with pytest.raises(ValueError) as eager:
        layer(x)
    torch._dynamo.reset()
    with pytest.raises(ValueError) as compiled:
        torch.compile(layer)(x)
    assert _rule(str(compiled.value)) == _rule(str(eager.value))
    # fullgraph=True: Dynamo reports the ValueError it met while tracing inside its own error
    torch._dynamo.reset()
    with pytest.raises(Exception) as compiled:
        torch.compile(layer, fullgraph=True)(x)
    assert _rule(str(eager.value)) in str(compiled.value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_compile_of_raw_op_reports_the_kernel_error(variant):
    x, params, _, _ = _setup(variant)

    def f(x_):
        return fwd_op(variant)(x_, G, *params, 1e-5)[0]

    with pytest.raises(ValueError) as eager:
        f(x[0])
    torch._dynamo.reset()
    with pytest.raises(Exception) as compiled:
        torch.compile(f, fullgraph=True)(x[0])
    assert _rule(str(eager.value)) in str(compiled.value)
