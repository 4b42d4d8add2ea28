"""torch.func over the fused functionals: vmap (x mapped, parameters mapped, channels_last, a
mapped dimension in the middle), grad and vjp, per-sample gradients vmap(grad(...)), jacrev, all
against the float64 reference; grad of grad raises."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, functional, make_input, make_ref, params_in_op_order, ref_functional
from torch.func import grad, jacrev, vjp, vmap

G, C, SHAPE = 2, 16, (3, 16, 5, 4)
TOL = dict(rtol=1e-10, atol=1e-10)


def _params(variant, seed=1):
    return [
        p.detach()
        for p in params_in_op_order(
            variant, make_ref(variant, C, G, seed=seed, dtype=torch.float64)
        )
    ]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("in_dim", [0, 2, 4])
def test_vmap_over_x(variant, in_dim):
    params = _params(variant)
    xs = make_input((4, *SHAPE), dtype=torch.float64).movedim(0, in_dim)
    fused = vmap(lambda x: functional(variant)(x, G, *params), in_dims=in_dim)(xs)
    want = torch.stack([ref_functional(variant)(x, G, *params) for x in xs.unbind(in_dim)])
    torch.testing.assert_close(fused, want, **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vmap_over_channels_last_x(variant):
    params = _params(variant)
    xs = torch.stack(
        [
            make_input(SHAPE, seed=s, dtype=torch.float64).contiguous(
                memory_format=torch.channels_last
            )
            for s in range(3)
        ]
    )
    fused = vmap(lambda x: functional(variant)(x, G, *params))(xs)
    want = torch.stack([ref_functional(variant)(x, G, *params) for x in xs])
    torch.testing.assert_close(fused, want, **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vmap_over_parameters(variant):
    """Every slice has its own parameters (an ensemble): the op runs per slice."""
    x = make_input(SHAPE, dtype=torch.float64)
    stacked = [torch.stack(ps) for ps in zip(*[_params(variant, seed=s) for s in range(3)])]
    fused = vmap(lambda *ps: functional(variant)(x, G, *ps))(*stacked)
    want = torch.stack([ref_functional(variant)(x, G, *[p[i] for p in stacked]) for i in range(3)])
    torch.testing.assert_close(fused, want, **TOL)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("mapped", ["x", "params"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_vmap_over_an_empty_dimension(variant, mapped, residual):
    """A mapped dimension of size 0 (no slice to run the op on; the reference layers cannot take
    one) gives empty results of the shapes and dtypes a dimension of size 1 gives: the forward's,
    and per-sample gradients vmap(grad(...)) of x and the parameters."""
    params = _params(variant)
    extra = {"identity": make_input(SHAPE, seed=7, dtype=torch.float64)} if residual else {}
    x = make_input(SHAPE, dtype=torch.float64)
    in_dims = (0, None) if mapped == "x" else (None, 0)

    def forward(x_, ps):
        return functional(variant)(x_, G, *ps, **extra)

    per_sample_grads = grad(lambda x_, ps: forward(x_, ps).sum(), argnums=(0, 1))
    for fn in (forward, per_sample_grads):
        results = []
        for size in (0, 1):
            xs = x.expand(size, *SHAPE) if mapped == "x" else x
            ps = [p.expand(size, *p.shape) for p in params] if mapped == "params" else params
            results.append(torch.utils._pytree.tree_leaves(vmap(fn, in_dims=in_dims)(xs, ps)))
        empty, one = results
        assert [(t.shape, t.dtype) for t in empty] == [((0, *t.shape[1:]), t.dtype) for t in one]


@pytest.mark.parametrize("variant", VARIANTS)
def test_grad_and_vjp_match_reference(variant):
    params = _params(variant)
    x = make_input(SHAPE, dtype=torch.float64)
    gy = make_input(SHAPE, seed=5, dtype=torch.float64)

    def loss(impl):
        return lambda x_, *ps: (impl(x_, G, *ps) * gy).sum()

    argnums = tuple(range(7))
    fused = grad(loss(functional(variant)), argnums=argnums)(x, *params)
    want = grad(loss(ref_functional(variant)), argnums=argnums)(x, *params)
    for f, w in zip(fused, want):
        torch.testing.assert_close(f, w, **TOL)

    out, pullback = vjp(lambda x_: functional(variant)(x_, G, *params), x)
    torch.testing.assert_close(out, ref_functional(variant)(x, G, *params), **TOL)
    torch.testing.assert_close(pullback(gy)[0], want[0], **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_per_sample_gradients(variant):
    """vmap(grad(loss)) over the batch: each sample's own parameter gradients (the backward op's
    vmap rule must not sum them over the mapped dimension)."""
    params = _params(variant)
    xs = make_input(SHAPE, dtype=torch.float64)
    gys = make_input(SHAPE, seed=6, dtype=torch.float64)

    def per_sample(impl):
        def loss(ps, x, gy):
            return (impl(x[None], G, *ps)[0] * gy).sum()

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, gys)

    fused, want = per_sample(functional(variant)), per_sample(ref_functional(variant))
    for f, w in zip(fused, want):
        assert f.shape == (SHAPE[0], *w.shape[1:])
        torch.testing.assert_close(f, w, **TOL)
    # and they differ between samples (a summed gradient would repeat one value)
    assert not torch.allclose(fused[0][0], fused[0][1])
    # and the batch-mean of them is the ordinary gradient of the whole batch
    whole = grad(lambda ps: (functional(variant)(xs, G, *ps) * gys).sum())(params)
    for f, w in zip(fused, whole):
        torch.testing.assert_close(f.sum(0), w, **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_jacrev(variant):
    small = [
        p.detach()
        for p in params_in_op_order(variant, make_ref(variant, 8, 2, seed=2, dtype=torch.float64))
    ]
    x = make_input((1, 8, 2, 2), dtype=torch.float64)
    fused = jacrev(lambda x_: functional(variant)(x_, 2, *small))(x)
    want = jacrev(lambda x_: ref_functional(variant)(x_, 2, *small))(x)
    torch.testing.assert_close(fused, want, **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_grad_of_grad_raises(variant):
    params = _params(variant)
    x = make_input(SHAPE, dtype=torch.float64)

    def f(x_):
        return functional(variant)(x_, G, *params).pow(2).sum()

    with pytest.raises(RuntimeError, match="double backward"):
        grad(lambda x_: grad(f)(x_).sum())(x)
