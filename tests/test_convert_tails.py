"""sa_cuda.convert's residual tails (sa_cuda.residual_tail): a block whose forward ends in
``relu(sa(x) + shortcut)`` runs that tail as the fused layer's epilogue, with the block's outputs,
gradients and BatchNorm statistics unchanged; every block where that cannot be proved is left as it
was and reported with the reason. timm's blocks: tests/integrations/test_timm.py."""

from __future__ import annotations

import copy
import io
import pickle
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import OpNames, randomize_
from torch import nn

import sa_cuda
from sa_cuda import reference
from sa_cuda.testing import max_err

C = 32  # block width: SALayer(32, groups=4), m = 4
SHAPE = (2, C, 7, 5)


class OfficialSABottleneck(nn.Module):
    """SA-Net's models/sa_resnet.py ``SABottleneck`` (wofmanaf/SA-Net), with the release's
    ``sa_layer`` as sa_cuda.reference.SALayer and its groups exposed."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, sa_groups=4):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.sa = reference.SALayer(planes * 4, sa_groups)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)
        out = self.sa(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


def _official_stage() -> nn.Sequential:
    """Two official bottlenecks: the first with a strided downsampling shortcut."""
    downsample = nn.Sequential(nn.Conv2d(16, C, 1, 2, bias=False), nn.BatchNorm2d(C))
    return nn.Sequential(
        OfficialSABottleneck(16, C // 4, 2, downsample), OfficialSABottleneck(C, C // 4)
    )


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, every parameter random (gates not constant), BatchNorm statistics not trivial."""
    model = randomize_(model.double(), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5, generator=gen)
                module.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


def _tail_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "_sa_cuda_tail" in vars(m)]


def _step(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """One training step's results: out, the gradients of x and of every parameter (for a random
    incoming gradient), the buffers after it (BatchNorm's running statistics in train mode)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    gen = torch.Generator().manual_seed(9)
    out.backward(torch.randn(out.shape, generator=gen, dtype=out.dtype))
    grads = [x.grad] + [p.grad for p in model.parameters()]
    return [out.detach(), *grads, *(b.clone() for b in model.buffers())]


def _assert_same_steps(models: list[nn.Module], x: torch.Tensor, rtol: float) -> None:
    """The models (versions of one model) give the first one's step results to rtol. Each steps a
    copy of itself, so that every comparison starts from the same running statistics."""
    want, *others = [_step(copy.deepcopy(model), x) for model in models]
    for got in others:
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            if a is None or b is None:  # a parameter the block does not use
                assert a is b, i
                continue
            assert a.dtype == b.dtype and a.shape == b.shape, i
            assert max_err(a, b) <= rtol * max(1.0, b.abs().max().item()), i


def _untailed(model: nn.Module) -> nn.Module:
    """A copy of model converted without tails: the fused layers, the tails as written."""
    copied = copy.deepcopy(model)
    sa_cuda.convert(copied, tails=False)
    assert _tail_modules(copied) == []
    return copied


# ---- fused: the official bottleneck and the tail's spellings ---------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_official_bottleneck_tail_runs_as_the_epilogue(mode):
    """convert fuses both official bottlenecks' layers and tails: the residual op runs once a
    block (no plain SA op, no add or ReLU of the tail), and outputs, gradients of x and every
    parameter, and BatchNorm's running statistics equal the unconverted model's (float64)."""
    reference_model = _randomized(_official_stage()).train(mode == "train")
    untailed = _untailed(reference_model)
    model = copy.deepcopy(reference_model)
    report = sa_cuda.convert(model, report=True)
    assert report.count == 2
    assert report.fused_tails == [("0", "OfficialSABottleneck"), ("1", "OfficialSABottleneck")]
    assert report.skipped_tails == []
    x = torch.randn(SHAPE[0], 16, 9, 7, dtype=torch.float64)
    with OpNames() as seen:
        copy.deepcopy(model)(x.requires_grad_()).sum().backward()
    assert seen.names.count("sa_cuda.sa_layer_residual_forward") == 2
    assert seen.names.count("sa_cuda.sa_layer_residual_backward") == 2
    assert "sa_cuda.sa_layer_forward" not in seen.names
    # the blocks' ReLUs: two per block before the tail, none after it
    assert seen.names.count("aten.relu_") + seen.names.count("aten.relu") == 4
    _assert_same_steps([untailed, model], x, rtol=1e-12)
    _assert_same_steps([reference_model, model], x, rtol=1e-10)


def test_the_block_keeps_its_state_dict_hooks_and_attributes():
    """The block stays itself: an instance of its class (a subclass of it, same name),
    attributes, Parameter objects, state_dict keys and order; its own hooks fire; a second
    convert changes nothing."""
    model = _randomized(_official_stage())
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    sa_cuda.convert(model)
    block = model[0]
    assert isinstance(block, OfficialSABottleneck)
    assert type(block).__bases__ == (OfficialSABottleneck,)
    assert type(block).__name__ == "OfficialSABottleneck" and repr(block).startswith("Official")
    assert block.stride == 2 and block.expansion == 4
    assert list(model.state_dict()) == keys
    assert all(p is params[name] for name, p in model.named_parameters())
    x = torch.randn(SHAPE[0], 16, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        fused = model(x)
    assert seen == [fused.shape]
    again = sa_cuda.convert(model, report=True)
    assert (again.count, again.fused_tails, again.skipped_tails) == (0, [], [])


def test_the_fused_forward_survives_deepcopy_pickle_and_compile():
    """deepcopy and torch.save/torch.load of the whole model keep the fused tails (bound to the
    copy's blocks); torch.compile(fullgraph=True) compiles them without a graph break."""
    model = _randomized(_official_stage()).eval()
    sa_cuda.convert(model)
    x = torch.randn(SHAPE[0], 16, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    copies.append(pickle.loads(pickle.dumps(model)))
    for other in copies:
        for block in other:  # the copy's own children
            assert type(block) is type(model[0]) and block._sa_cuda_tail.reads["sa"] is block.sa
        with torch.no_grad(), OpNames() as seen:
            got = other(x)
        assert seen.names.count("sa_cuda.sa_layer_residual_forward") == 2
        assert torch.equal(got, want)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert max_err(compiled(x), want) <= 1e-12 * want.abs().max().item()


class _Block(nn.Module):
    """A bottleneck tail: conv, bn, SA layer, ReLU; subclasses write the forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(C)
        self.sa = reference.SALayer(C, 4)
        self.relu = nn.ReLU()


class AddFunction(_Block):
    def forward(self, x):
        return F.relu(torch.add(x, self.sa(self.bn(self.conv(x)))), inplace=True)


class AddMethods(_Block):
    def forward(self, x):
        out = self.sa(self.bn(self.conv(x))).add_(x)
        return out.relu_()


class TorchRelu(_Block):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(self.sa(y) + x)


class SAOnTheInput(_Block):
    """The SA input is the block's input itself: nothing runs between the layer and the add."""

    def forward(self, x):
        return self.relu(self.sa(x) + x)


@pytest.mark.parametrize("block_cls", [AddFunction, AddMethods, TorchRelu, SAOnTheInput])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_tail_spellings_are_fused(block_cls, mode):
    """+, +=, torch.add, .add_, nn.ReLU, F.relu(inplace), torch.relu, .relu_: each is fused, and
    the block computes what it computed (float64, forward, gradients, running statistics)."""
    block = _randomized(block_cls()).train(mode == "train")
    untailed = _untailed(block)
    report = sa_cuda.convert(block, report=True)
    assert report.fused_tails == [("", block_cls.__name__)], report.skipped_tails
    x = torch.randn(SHAPE, dtype=torch.float64)
    with torch.no_grad(), OpNames() as seen:
        copy.deepcopy(block)(x)
    assert seen.names.count("sa_cuda.sa_layer_residual_forward") == 1
    _assert_same_steps([untailed, block], x, rtol=1e-12)


class ToFloat(nn.Module):
    def forward(self, x):
        return x.float()


class BroadcastShortcut(_Block):
    """The shortcut is a per-channel (B, C, 1, 1) tensor: broadcast by the add."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        out = self.sa(self.bn(self.conv(x)))
        out += self.pool(x)
        return self.relu(out)


class Float32Shortcut(_Block):
    """A float32 shortcut to a float64 block: += keeps float64."""

    def __init__(self):
        super().__init__()
        self.to_float = ToFloat()

    def forward(self, x):
        out = self.sa(self.bn(self.conv(x)))
        out += self.to_float(x)
        return self.relu(out)


@pytest.mark.parametrize("block_cls", [BroadcastShortcut, Float32Shortcut])
def test_shortcuts_the_epilogue_cannot_take_run_the_three_steps(block_cls):
    """At run time the fused forward takes the epilogue only for a shortcut of the SA input's
    shape, dtype and device; a broadcast shortcut and a float32 shortcut to a float64 block (+=
    keeps float64) run the three steps as written."""
    block = _randomized(block_cls())
    untailed = _untailed(block)
    assert sa_cuda.convert(block, report=True).fused_tails == [("", block_cls.__name__)]
    x = torch.randn(SHAPE, dtype=torch.float64)
    with OpNames() as seen:
        out = copy.deepcopy(block)(x)
    assert out.dtype == torch.float64
    assert "sa_cuda.sa_layer_residual_forward" not in seen.names
    _assert_same_steps([untailed, block], x, rtol=1e-12)


def _replace_relu(model, x):
    model[1].relu = nn.GELU()
    return [model(x)]


def _fold_bn3(model, x):
    model[0].bn3 = nn.Identity()
    return [model(x)]


def _hook_on(owner):
    def change(model, x):
        seen = []
        getattr(model[1], owner).register_forward_hook(
            lambda module, args, out: seen.append(out.sum().item())
        )
        return [model(x), seen]

    return change


def _global_hook(model, x):
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(type(module).__name__)
    )
    try:
        return [model(x), seen]
    finally:
        handle.remove()


def _replica(model, x):
    """What nn.DataParallel runs on another device: a shallow copy with its own children."""
    replica = model[1]._replicate_for_data_parallel()
    replica._modules = {k: copy.deepcopy(v) for k, v in model[1]._modules.items()}
    with torch.no_grad():
        replica.conv1.weight.mul_(0.5)
    return [replica(model[0](x))]


class _LeakyReLU(nn.ReLU):
    def forward(self, x):
        return F.leaky_relu(x, 0.1)


def _swap_relu_class(model, x):
    model[1].relu.__class__ = _LeakyReLU
    return [model(x)]


def _patch_class_forward(model, x):
    original = OfficialSABottleneck.forward
    OfficialSABottleneck.forward = lambda self, x: original(self, x) * 2
    try:
        return [model(x)]
    finally:
        OfficialSABottleneck.forward = original


CHANGES = [_replace_relu, _fold_bn3, _hook_on("sa"), _hook_on("relu"), _hook_on("bn3")]
CHANGES += [_global_hook, _replica, _swap_relu_class, _patch_class_forward]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
def test_changes_after_conversion_run_the_class_forward(change):
    """What the rewrite relied on is checked at every call: a child replaced (the ReLU by a GELU,
    bn3 folded into an nn.Identity), a hook added to the SA layer, the ReLU or bn3, a global module
    hook, a DataParallel replica (other children), the ReLU's class swapped, the class's forward
    patched: the call then runs the class's forward, with the unconverted block's results and hook
    calls."""
    x = torch.randn(SHAPE[0], 16, 9, 7, dtype=torch.float64)
    model = _randomized(_official_stage()).eval()
    untailed = _untailed(model)
    sa_cuda.convert(model)
    assert len(_tail_modules(model)) == 2
    with torch.no_grad():
        got, want = change(model, x), change(untailed, x)
    assert got[0].dtype == want[0].dtype and torch.equal(got[0], want[0])
    assert got[1:] == want[1:]


_relu = torch.relu  # a module global the next block calls: rebinding it changes the block


class GlobalRelu(_Block):
    def forward(self, x):
        return _relu(self.sa(self.bn(self.conv(x))) + x)


def test_a_global_function_rebound_after_conversion_runs_the_class_forward(monkeypatch):
    block = _randomized(GlobalRelu())
    untailed = _untailed(block)
    assert sa_cuda.convert(block, report=True).fused_tails == [("", "GlobalRelu")]
    monkeypatch.setattr(sys.modules[__name__], "_relu", torch.sigmoid)
    x = torch.randn(SHAPE, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(block(x), untailed(x))


class ShortcutFirst(_Block):
    def forward(self, x):
        return self.relu(x + self.sa(self.bn(self.conv(x))))


@pytest.mark.parametrize("layout", ["transposed", "channels_last_weights"])
def test_the_result_has_the_strides_of_the_sum_as_written(layout):
    """``x + sa(t)`` gives the strides of x's layout, which the epilogue (t's layout) may not
    have: then the three steps run, in the order written; values and strides as before."""
    block = _randomized(ShortcutFirst())
    x = torch.randn(SHAPE[0], C, SHAPE[3], SHAPE[2], dtype=torch.float64).transpose(2, 3)
    if layout == "channels_last_weights":
        block = block.to(memory_format=torch.channels_last)
        x = x.contiguous()
    untailed = _untailed(block)
    assert sa_cuda.convert(block, report=True).fused_tails == [("", "ShortcutFirst")]
    with torch.no_grad():
        got, want = block(x), untailed(x)
    assert got.stride() == want.stride() and torch.equal(got, want)


def test_a_source_file_changed_since_import_leaves_the_block(tmp_path, monkeypatch):
    """The grammar is checked on the file's text; when that is no longer the code that runs (the
    file was edited after import), the block is left alone."""
    path = tmp_path / "edited_block.py"
    head = "import torch\nfrom torch import nn\nimport sa_cuda\n\n\nclass Edited(nn.Module):\n"
    init = "    def __init__(self):\n        super().__init__()\n"
    init += "        self.bn = nn.BatchNorm2d(32)\n        self.sa = sa_cuda.reference.SALayer(32, 4)\n\n"
    running = (
        "    def forward(self, x):\n        if torch.is_grad_enabled():\n            x = x + x\n"
    )
    running += "        return torch.relu(self.sa(self.bn(x)) + x)\n"
    path.write_text(head + init + running)
    monkeypatch.syspath_prepend(str(tmp_path))
    import edited_block

    straight = "    def forward(self, x):\n        return torch.relu(self.sa(self.bn(x)) + x)\n"
    path.write_text(head + init + straight)
    block = edited_block.Edited()
    report = sa_cuda.convert(block, report=True)
    assert report.fused_tails == [] and "is not the code that runs" in report.skipped_tails[0][2]


# ---- left alone: the reasons ---------------------------------------------------------------


class Scaled(_Block):
    def __init__(self):
        super().__init__()
        self.scale = nn.Hardtanh()

    def forward(self, x):
        return self.relu(self.scale(self.sa(self.bn(self.conv(x)))) + x)


class GeluModule(_Block):
    def __init__(self):
        super().__init__()
        self.relu = nn.GELU()

    def forward(self, x):
        return self.relu(self.sa(self.bn(self.conv(x))) + x)


class Relu6Module(GeluModule):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU6()


class ReluWithOwnForward(GeluModule):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()
        self.relu.forward = lambda x: torch.clamp(x, 0, 6)


class TwoUsers(_Block):
    def forward(self, x):
        out = self.sa(self.bn(self.conv(x)))
        y = self.relu(out + x)
        return y + out


class IntoShortcut(_Block):
    """Adds in place into the shortcut (the block's input), which the caller sees changed."""

    def forward(self, x):
        identity = x
        identity += self.sa(self.bn(self.conv(x)))
        return self.relu(identity)


class InPlaceAfter(_Block):
    """An in-place ReLU changes the SA layer's input after the layer read it: a later read sees
    other values, so the call cannot move to the add."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        t = self.bn(self.conv(x))
        out = self.sa(t)
        shortcut = self.act(t)
        return self.relu(out + shortcut)


class NotFreshInput(_Block):
    """The SA input comes from an nn.Identity (the conv's output itself), and a child runs
    between the layer and the add."""

    def __init__(self):
        super().__init__()
        self.same = nn.Identity()

    def forward(self, x):
        t = self.same(self.conv(x))
        out = self.sa(t)
        shortcut = self.bn(x)
        return self.relu(out + shortcut)


class HookedProducer(_Block):
    """bn, whose output the SA layer reads, has a hook (which could return its input)."""

    def __init__(self):
        super().__init__()
        self.bn.register_forward_hook(lambda module, args, out: None)
        self.down = nn.Conv2d(C, C, 1)

    def forward(self, x):
        out = self.sa(self.bn(self.conv(x)))
        shortcut = self.down(x)
        return self.relu(out + shortcut)


class Alpha(_Block):
    def forward(self, x):
        return self.relu(torch.add(self.sa(self.bn(self.conv(x))), x, alpha=0.5))


class Constant(_Block):
    def forward(self, x):
        return self.relu(self.sa(self.bn(self.conv(x))) + 1.0)


class ModeBranch(_Block):
    def forward(self, x):
        out = self.sa(self.bn(self.conv(x)))
        if self.training:
            out = out + out
        return self.relu(out + x)


class ChildModeBranch(_Block):
    def forward(self, x):
        out = self.sa(self.bn(self.conv(x)))
        if self.bn.training:
            out = out + out
        return self.relu(out + x)


class GradModeBranch(_Block):
    def forward(self, x):
        out = self.sa(self.bn(self.conv(x)))
        if torch.is_grad_enabled():
            out = out + out
        return self.relu(out + x)


class ValueBranch(_Block):
    def forward(self, x):
        out = self.sa(self.bn(self.conv(x)))
        if x.sum() > 0:
            out = out + out
        return self.relu(out + x)


class StoresState(_Block):
    def forward(self, x):
        self.last = self.bn(self.conv(x))
        return self.relu(self.sa(self.last) + x)


FEATURES = []


class SideEffect(_Block):
    def forward(self, x):
        t = self.bn(self.conv(x))
        FEATURES.append(t)
        return self.relu(self.sa(t) + x)


class NoGradShortcut(_Block):
    def forward(self, x):
        with torch.no_grad():
            shortcut = self.bn(x)
        return self.relu(self.sa(self.bn(self.conv(x))) + shortcut)


class Decorated(_Block):
    @torch.no_grad()
    def forward(self, x):
        return self.relu(self.sa(self.bn(self.conv(x))) + x)


class OptionalShortcut(_Block):
    def forward(self, x, identity=None):
        if identity is None:
            identity = x
        return self.relu(self.sa(self.bn(self.conv(x))) + identity)


class Helper(_Block):
    def pre(self, x):
        return self.bn(self.conv(x))

    def forward(self, x):
        return self.relu(self.sa(self.pre(x)) + x)


class ReadsParameters(_Block):
    def forward(self, x):
        out = self.sa(self.bn(self.conv(x)))
        _ = self.sa.cweight  # an attribute that is not a child
        return self.relu(out + x)


class Alias(_Block):
    """bn also held as norm: fx would call it by its first name, bn."""

    def __init__(self):
        super().__init__()
        self.norm = self.bn

    def forward(self, x):
        return self.relu(self.sa(self.norm(self.conv(x))) + x)


def _closure_block():
    F = types.SimpleNamespace(relu=lambda t: t if torch.is_grad_enabled() else t * 2)

    class ClosureF(_Block):
        def forward(self, x):
            return F.relu(self.sa(self.bn(self.conv(x))) + x)

    return ClosureF


ClosureF = _closure_block()


class OwnCall(_Block):
    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs)

    def forward(self, x):
        return self.relu(self.sa(self.bn(self.conv(x))) + x)


LEFT_ALONE = [
    (Scaled, "goes to .*scale.*, not to an add"),
    (GeluModule, "not to a ReLU"),
    (Relu6Module, "not to a ReLU"),
    (ReluWithOwnForward, "not to a ReLU"),
    (TwoUsers, "has 2 users"),
    (IntoShortcut, "does not add a shortcut into the output of sa"),
    (InPlaceAfter, "run.* between sa and the add"),
    (NotFreshInput, "run.* between sa and the add"),
    (HookedProducer, "run.* between sa and the add"),
    (Alpha, "keyword argument"),
    (Constant, "an expression other than"),
    (ModeBranch, "a condition other than"),
    (ChildModeBranch, "a condition other than"),
    (GradModeBranch, "a condition other than"),
    (ValueBranch, "a condition other than"),
    (StoresState, "an assignment to something else"),
    (SideEffect, "a statement whose value is dropped"),
    (NoGradShortcut, "a with block"),
    (Decorated, "not a plain function|decorated"),
    (OptionalShortcut, r"other parameters than \(self, x\)"),
    (Helper, "a call of self.pre that is not a child"),
    (ReadsParameters, "an expression other than"),
    (OwnCall, "overrides nn.Module.__call__"),
    (Alias, "norm is also held as bn|bn is also held as norm"),
    (ClosureF, "a call of something else than a child"),
]


@pytest.mark.parametrize(
    ("block_cls", "reason"), LEFT_ALONE, ids=[c.__name__ for c, _ in LEFT_ALONE]
)
def test_blocks_that_are_not_the_tail_are_left_alone(block_cls, reason):
    """Each block above computes something else than relu(sa(t) + shortcut) with t unchanged, or
    cannot be shown to: its forward is left as it was (no instance forward, no attribute left by
    the trace), the report gives the reason, and the block computes what it computed."""
    block = _randomized(block_cls())
    before = set(vars(block))
    untailed = _untailed(block)
    report = sa_cuda.convert(block, report=True)
    assert report.count == 1 and report.fused_tails == []
    [(name, cls_name, why)] = report.skipped_tails
    assert (name, cls_name) == ("", block_cls.__name__)
    assert re.search(reason, why), why
    assert type(block) is block_cls and set(vars(block)) == before
    x = torch.randn(SHAPE, dtype=torch.float64)
    with torch.no_grad():  # clones: IntoShortcut changes its input
        got, want = block(x.clone()), untailed(x.clone())
    got, want = (got, want) if isinstance(got, torch.Tensor) else (got[0], want[0])
    assert torch.equal(got, want)


def test_hooks_on_the_layer_or_the_relu_keep_the_tail():
    """A hook on the SA layer sees the layer's own output, one on the ReLU module the sum: fusing
    would change what they see, so the tail stays."""
    for owner in ("sa", "relu"):
        block = _randomized(AddFunction() if owner == "sa" else _official_stage()[1])
        getattr(block, owner).register_forward_hook(lambda *args: None)
        report = sa_cuda.convert(block, report=True)
        assert report.fused_tails == [] and "hooks" in report.skipped_tails[0][2], report


def test_an_instance_forward_the_user_set_is_kept():
    block = _randomized(AddFunction())
    block.forward = lambda x: x
    report = sa_cuda.convert(block, report=True)
    assert report.skipped_tails == [
        ("", "AddFunction", "the instance overrides forward in its __dict__")
    ]
    assert block.forward(3) == 3


def test_sa_in_a_sequential_and_the_package_bottleneck():
    """An nn.Sequential chains its children (no shortcut): not looked at, not reported.
    sa_cuda.models.SABottleneck passes its shortcut to the layer itself: not touched, not
    reported."""
    seq = nn.Sequential(nn.Conv2d(C, C, 1), reference.SALayer(C, 4), nn.ReLU())
    report = sa_cuda.convert(seq, report=True)
    assert report.count == 1 and report.fused_tails == report.skipped_tails == []
    assert _tail_modules(seq) == []
    model = sa_cuda.models.sa_resnet50(num_classes=10, fused=False)
    report = sa_cuda.convert(model, report=True)
    assert report.count == 16 and report.fused_tails == [] and report.skipped_tails == []
    assert _tail_modules(model) == []


def test_tails_argument():
    model = _official_stage()
    with pytest.raises(ValueError, match="tails must be a bool"):
        sa_cuda.convert(model, tails=1)
    assert sa_cuda.convert(model, tails=False) == 2 and _tail_modules(model) == []
