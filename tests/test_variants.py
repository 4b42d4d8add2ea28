"""sa_cuda.variants (the one description of both layers) against the registered ops and the
reference modules, and sa_cuda.ops.register_library (one OpLibrary per op namespace)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_input, make_ref, params_in_op_order

import sa_cuda
from sa_cuda import reference
from sa_cuda.ops import SA_CUDA_LIBRARY, register_library
from sa_cuda.variants import VARIANTS, variant


@pytest.mark.parametrize("spec", VARIANTS, ids=lambda v: v.name)
def test_parameters_are_the_ops_arguments(spec):
    forward = getattr(torch.ops.sa_cuda, spec.forward_op_name).default._schema.arguments
    backward = getattr(torch.ops.sa_cuda, spec.backward_op_name).default._schema.arguments
    assert [a.name for a in forward][2:-1] == list(spec.param_names)
    assert [a.name for a in backward][5:] == list(spec.param_names)


@pytest.mark.parametrize("spec", VARIANTS, ids=lambda v: v.name)
def test_state_keys_and_shapes_are_the_reference_modules(spec):
    channels, groups = 24, 2
    m = channels // (2 * groups)
    module = getattr(reference, spec.module_name)(channels, groups)
    shapes = {key: tuple(p.shape) for key, p in module.named_parameters()}
    assert sorted(shapes) == sorted(spec.state_keys)
    for param in spec.params:
        assert shapes[param.state_key] == param.module_shape(m), param.name
    assert set(spec.gate_convs) == {
        name for name, sub in module.named_children() if isinstance(sub, torch.nn.Conv2d)
    }
    assert issubclass(getattr(sa_cuda, spec.module_name), type(module))


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="variant must be one of .*'official'"):
        variant("official")


def test_one_library_per_namespace():
    assert register_library("sa_cuda") is SA_CUDA_LIBRARY
    assert sa_cuda.ShuffleAttentionFunction is SA_CUDA_LIBRARY.function
    assert SA_CUDA_LIBRARY.forward_op("sa_layer") is torch.ops.sa_cuda.sa_layer_forward
    assert (
        SA_CUDA_LIBRARY.backward_op("shuffle_attention")
        is torch.ops.sa_cuda.shuffle_attention_backward
    )


@pytest.mark.parametrize("spec", VARIANTS, ids=lambda v: v.name)
def test_functional_library_keyword(spec):
    """library= selects whose ops run; the default is sa_cuda's."""
    x = make_input((2, 16, 5, 4), dtype=torch.float64)
    params = [
        p.detach()
        for p in params_in_op_order(spec.name, make_ref(spec.name, 16, 2, dtype=torch.float64))
    ]
    functional = getattr(sa_cuda, spec.name)
    want = getattr(reference, spec.name)(x, 2, *params)
    torch.testing.assert_close(
        functional(x, 2, *params, library=SA_CUDA_LIBRARY), want, rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(functional(x, 2, *params), want, rtol=1e-10, atol=1e-10)
