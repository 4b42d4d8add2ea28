"""torch.compile of models that use the fused modules and functionals.

fullgraph=True turns any graph break into an error, and torch._dynamo.explain checks the same
thing explicitly (one graph, no break). The compiled forward and backward must equal the eager
fused model and the reference (same criterion as test_forward_backward: against the float64
reference, 1e-5 relative to max(1, max|ref64|)).

Compiling is slow on a 2-core machine (~10-20 s per graph with Inductor), so one model covers all
four entry points (SALayer, ShuffleAttention, sa_layer, shuffle_attention with transposed (m, m)
weights, which exercises the fake kernels' strides), and the shapes are small.

Inductor's on-disk caches are disabled here: they are keyed on the traced graph but not on the
custom ops' fake kernels, so after a fake-kernel change a cached graph would run with stale
metadata (seen while writing these tests: a stride assertion from a stale cached graph).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, clone_as, make_input, randomize_
from torch import nn

import sa_cuda
from sa_cuda import reference
from sa_cuda.testing import max_abs, max_err

C, G = 48, 4
M = C // (2 * G)


class Net(nn.Module):
    """SALayer -> ShuffleAttention -> sa_layer (functional) -> shuffle_attention (functional)."""

    def __init__(self, fused: bool):
        super().__init__()
        lib = sa_cuda if fused else reference
        self.fused = fused
        self.sal = lib.SALayer(C, G)
        self.sha = lib.ShuffleAttention(C, G)
        # sa_layer functional: cweight, cbias, sweight, sbias, gn_weight, gn_bias, all (m,)
        self.p1 = nn.ParameterList([nn.Parameter(torch.empty(M)) for _ in range(6)])
        # shuffle_attention functional: two (m, m) weights (used transposed) and four (m,) vectors
        self.p2 = nn.ParameterList(
            [nn.Parameter(torch.empty(M, M) if i in (0, 2) else torch.empty(M)) for i in range(6)]
        )

    def forward(self, x):
        y = self.sal(x)
        y = self.sha(y * 0.5 + x)
        if self.fused:
            cw, cb, sw, sb, gw, gb = (
                self.p1
            )  # not *self.p1: Dynamo 2.11 cannot star-unpack a ParameterList
            y = sa_cuda.sa_layer(y, G, cw, cb, sw, sb, gw, gb)
            w1, b1, w2, b2, gw, gb = self.p2
            y = sa_cuda.shuffle_attention(y, G, w1.t(), b1, w2.t(), b2, gw, gb)
        else:
            cw, cb, sw, sb = (p.view(1, M, 1, 1) for p in self.p1[:4])
            gw, gb = self.p1[4], self.p1[5]
            y = reference.sa_layer(y, G, cw, cb, sw, sb, gw, gb)
            w1, b1, w2, b2, gw, gb = self.p2
            y = reference.shuffle_attention(
                y, G, w1.t().reshape(M, M, 1, 1), b1, w2.t().reshape(M, M, 1, 1), b2, gw, gb
            )
        return y * 1.5


def _nets(device):
    fused = Net(fused=True)
    randomize_(fused, seed=21)
    with torch.no_grad():  # ParameterList matrices are 2-D: scale them like the conv weights
        for w in (fused.p2[0], fused.p2[2]):
            w.mul_(1.5 / M**0.5 / 0.75)
    ref = Net(fused=False)
    ref.load_state_dict(fused.state_dict(), strict=True)
    return fused.to(device), ref.to(device)


def _run(model, x, gy):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    out.backward(gy)
    res = {"out": out.detach(), "x": x.grad}
    res.update({n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()})
    return res


def _assert_matches(got, ref64, *, rel=1e-5, what=""):
    assert set(got) == set(ref64)
    for key in got:
        assert got[key] is not None, f"{what}{key}: no gradient"
        scale = max(1.0, max_abs(ref64[key]))
        err = max_err(got[key], ref64[key])
        assert err <= rel * scale, f"{what}{key}: max err {err:.3g} > {rel} * {scale:.3g}"


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    torch._dynamo.reset()
    with (
        torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_no_graph_break(device):
    fused, _ = _nets(device)
    x = make_input((2, C, 5, 3), seed=1, device=device).requires_grad_(True)
    explanation = torch._dynamo.explain(fused)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    fused, ref = _nets(device)
    shape = (2, C, 5, 7)
    x = make_input(shape, seed=1, device=device)
    gy = make_input(shape, seed=2, device=device)

    compiled = torch.compile(fused, fullgraph=True)
    got = _run(compiled, x, gy)
    eager = _run(fused, x, gy)
    ref64 = _run(clone_as(ref, torch.float64), x.double(), gy.double())
    _assert_matches(eager, ref64, what="eager fused: ")
    _assert_matches(got, ref64, what="compiled: ")
    for key in got:  # compiled vs eager fused: the same kernels, up to Inductor's fusion of the
        # surrounding elementwise ops (one rounding of y * 0.5 + x): far below 1e-5.
        assert max_err(got[key], eager[key]) <= 1e-5 * max(1.0, max_abs(eager[key])), key


@pytest.mark.parametrize("device", DEVICES)
def test_compile_channels_last(device):
    """A channels_last input through a compiled graph: the fake kernels give out and grad_x the
    real kernels' (channels_last) strides, which Inductor relies on for the ops around them; the
    values match the reference and the output keeps x's memory format as in eager."""
    fused, ref = _nets(device)
    shape = (2, C, 5, 7)
    x = make_input(shape, seed=1, device=device).contiguous(memory_format=torch.channels_last)
    gy = make_input(shape, seed=2, device=device).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(fused, fullgraph=True)
    got = _run(compiled, x, gy)
    _assert_matches(got, _run(clone_as(ref, torch.float64), x.double(), gy.double()))
    assert got["out"].stride() == _run(fused, x, gy)["out"].stride()
    assert got["out"].is_contiguous(memory_format=torch.channels_last)
    assert got["x"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_compile_fullgraph_inference(mode, device):
    """Inference under torch.compile(fullgraph=True): no_grad and inference_mode. The functionals
    call the forward op itself when there is nothing to differentiate; through the autograd.Function
    Dynamo (torch 2.14.1) failed here ("Observed exception", KeyError(AutogradFunctionContextVariable)).
    The compiled output equals the eager fused one and the float64 reference."""
    fused, ref = _nets(device)
    x = make_input((2, C, 5, 7), seed=1, device=device)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    compiled = torch.compile(fused, fullgraph=True)
    with context():
        got, eager = compiled(x), fused(x)
        want = clone_as(ref, torch.float64)(x.double())
    assert not got.requires_grad
    _assert_matches({"out": got}, {"out": want}, what=f"{mode}: ")
    assert max_err(got, eager) <= 1e-5 * max(1.0, max_abs(eager))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("module", ["SALayer", "ShuffleAttention"])
def test_compile_dynamic(module, device):
    """dynamic=True: one compiled graph serves several batch sizes and spatial sizes (no
    recompilation: error_on_recompile), each result equal to the reference."""
    ref_mod = randomize_(getattr(reference, module)(C, G), seed=5).to(device)
    fused = getattr(sa_cuda, module)(C, G).to(device)
    fused.load_state_dict(ref_mod.state_dict(), strict=True)
    ref64 = clone_as(ref_mod, torch.float64)
    compiled = torch.compile(fused, fullgraph=True, dynamic=True)
    shapes = [(2, C, 5, 3), (3, C, 6, 4), (4, C, 7, 9)]
    for i, shape in enumerate(shapes):
        x = make_input(shape, seed=10 + i, device=device)
        gy = make_input(shape, seed=20 + i, device=device)
        # The first call compiles (dynamic shapes); any later recompilation is an error.
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = _run(compiled, x, gy)
        _assert_matches(got, _run(ref64, x.double(), gy.double()), what=f"{shape}: ")


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "meta"])
def test_availability_query_does_not_break_the_graph(device_type):
    """The modules ask fused_available(x.device) on every call. On CPU it is answered in Python;
    for any other device type it is a dispatcher query, which Dynamo cannot trace (a graph break,
    an error under fullgraph=True). The first GPU visit found the fullgraph tests failing on CUDA
    for that reason while they passed on CPU: this asks every device type from a CPU graph."""
    expected = sa_cuda.fused_available(device_type)

    def pick(x):
        return x + 1 if sa_cuda.fused_available(torch.device(device_type)) else x - 1

    x = torch.zeros(3)
    explanation = torch._dynamo.explain(pick)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    got = torch.compile(pick, fullgraph=True, backend="eager")(x)
    assert torch.equal(got, x + 1 if expected else x - 1)


def test_trace_time_constants_are_marked_as_torch_marks_them():
    """sa_cuda marks the functions Dynamo must call at trace time itself, to keep Dynamo out of
    `import sa_cuda` (tests/modules/test_modules.py); the mark must be exactly the one
    torch.compiler.assume_constant_result sets, and the marked functions must carry it (a rename in
    a later torch shows here, and as a graph break in the tests above)."""
    from sa_cuda.ops import library

    def ours():
        return True

    def torchs():
        return True

    assert library._constant_at_trace_time(ours) is ours
    torch.compiler.assume_constant_result(torchs)
    assert vars(ours) == vars(torchs) != {}
    for fn in (library._autocast_available, library._has_kernel):
        assert vars(fn) == vars(torchs), fn.__name__
