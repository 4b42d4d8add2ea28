"""timm: SA-ResNets built by timm.create_model with sa_cuda.timm_attn as the blocks' attn_layer
(sa_cuda.integrations): placement after the last BatchNorm, numerics against the reference layer
with the same weights, sa_cuda.convert on timm models, torch.compile with fullgraph."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import (
    VARIANTS,
    OpNames,
    forward_backward,
    fused_class,
    make_input,
    randomize_,
    ref_class,
)

import sa_cuda
from sa_cuda import reference
from sa_cuda.integrations import layer_groups
from sa_cuda.testing import max_err

timm = pytest.importorskip("timm")

# (model, variant): every architecture the issue names with SA-Net's layer, and the 1x1-conv
# variant in both block types (Bottleneck: resnet26; BasicBlock: resnet18).
MODELS = [
    ("resnet26", "sa_layer"),
    ("resnet50", "sa_layer"),
    ("resnext50_32x4d", "sa_layer"),
    ("resnet18", "sa_layer"),
    ("resnet26", "shuffle_attention"),
    ("resnet18", "shuffle_attention"),
]


def _model(name, variant, *, fused=True, **kwargs):
    attn = sa_cuda.timm_attn(variant, fused=fused)
    return timm.create_model(name, block_args=dict(attn_layer=attn), num_classes=10, **kwargs)


def _sa_layers(model):
    return [m for m in model.modules() if isinstance(m, tuple(ref_class(v) for v in VARIANTS))]


def _twins(name, variant, dtype=torch.float64):
    """A fused model and a reference model with the same weights (SA parameters randomized, so no
    gate is at its initial constant), in ``dtype``."""
    torch.manual_seed(0)
    ref = _model(name, variant, fused=False)
    for i, layer in enumerate(_sa_layers(ref)):
        randomize_(layer, seed=i)
    fused = _model(name, variant)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return fused.to(dtype), ref.to(dtype)


@pytest.mark.parametrize("name,variant", MODELS)
def test_timm_model_matches_reference_layers(name, variant):
    """Forward and backward of the whole network (train mode: BatchNorm on batch statistics) with
    the fused layers against the same network with the reference layers, float64."""
    fused, ref = _twins(name, variant)
    layers = _sa_layers(fused)
    assert layers and all(type(m) is fused_class(variant) for m in layers)
    assert all(type(m) is ref_class(variant) for m in _sa_layers(ref))
    x = make_input((2, 3, 64, 64), seed=1, dtype=torch.float64)
    gy = make_input((2, 10), seed=2, dtype=torch.float64)
    got, want = forward_backward(fused, x, gy), forward_backward(ref, x, gy)
    assert got.keys() == want.keys()
    for key in want:
        scale = want[key].abs().max().item()
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12 * scale, msg=key)


@pytest.mark.parametrize(
    "name,block,norm", [("resnet50", "Bottleneck", "bn3"), ("resnet18", "BasicBlock", "bn2")]
)
def test_timm_layer_sits_after_the_last_batchnorm(name, block, norm):
    """SA-Net's placement: the SA layer takes the block's last BatchNorm output (what follows it,
    the residual add, is timm's block code)."""
    model = _model(name, "sa_layer").eval()
    blocks = [m for m in model.modules() if type(m).__name__ == block]
    assert blocks and all(isinstance(b.se, sa_cuda.SALayer) for b in blocks)
    seen = []
    for b in blocks:
        b.get_submodule(norm).register_forward_hook(lambda m, i, o: seen.append(("bn", o)))
        b.se.register_forward_hook(lambda m, i, o: seen.append(("sa", i[0], o)))
    with torch.no_grad():
        model(make_input((1, 3, 64, 64), seed=3))
    assert len(seen) == 2 * len(blocks)
    for bn, sa in zip(seen[::2], seen[1::2]):
        assert bn[0] == "bn" and sa[0] == "sa" and sa[1] is bn[1]


def test_timm_attn_groups_and_arguments():
    # the paper's G = 64 where C is a multiple of 128; fewer groups where it is not
    assert [layer_groups(c, 64) for c in (64, 128, 256, 2048, 96, 2)] == [32, 64, 64, 64, 48, 1]
    assert layer_groups(256, 16) == 16
    layer = sa_cuda.timm_attn("shuffle_attention", groups=8)(64, device="cpu", dtype=torch.float64)
    assert type(layer) is sa_cuda.ShuffleAttention and layer.groups == 8
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    ref = sa_cuda.timm_attn(fused=False)(512, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert type(ref) is reference.SALayer and ref.groups == 64
    assert all(p.dtype == torch.bfloat16 for p in ref.parameters())
    # picklable: timm's model configs and multiprocessing carry it
    again = pickle.loads(pickle.dumps(sa_cuda.timm_attn("shuffle_attention", 32)))
    assert type(again(128)) is sa_cuda.ShuffleAttention and again(128).groups == 32
    for bad, match in [
        (dict(variant="se"), "variant must be one of"),
        (dict(groups=0), "groups must be an int >= 1"),
        (dict(groups=2.0), "groups must be an int >= 1"),
        (dict(fused=1), "fused must be a bool"),
    ]:
        with pytest.raises(ValueError, match=match):
            sa_cuda.timm_attn(**bad)
    with pytest.raises(ValueError, match="variant must be one of"):
        sa_cuda.timm_attn(["sa_layer"])
    with pytest.raises(ValueError, match="channels must be even"):
        sa_cuda.timm_attn()(63)
    with pytest.raises(ValueError, match="channels must be an int >= 2"):
        sa_cuda.timm_attn()(1)
    for groups in (0, -1, 2.5, None, True):
        with pytest.raises(ValueError, match="layer_groups: groups must be an int >= 1"):
            layer_groups(64, groups)
    for channels in (64.0, "64", True):
        with pytest.raises(ValueError, match="layer_groups: channels must be an int >= 2"):
            layer_groups(channels, 64)


def test_timm_model_dtype_and_device_reach_the_layers():
    """timm passes device= and dtype= to the attention layer: a model created in float64 has float64
    SA parameters (the modules accept both, as PyTorch's own modules do)."""
    model = timm.create_model(
        "resnet18",
        block_args=dict(attn_layer=sa_cuda.timm_attn()),
        num_classes=10,
        dtype=torch.float64,
        device="cpu",
    )
    layers = _sa_layers(model)
    assert layers and all(p.dtype == torch.float64 for m in layers for p in m.parameters())


@pytest.mark.parametrize("variant", ["sa_layer", "shuffle_attention"])
def test_convert_fuses_the_layers_of_a_timm_model(variant):
    """sa_cuda.convert recognises the reference layers inside a timm model and replaces each by the
    fused module with the same parameters: the same outputs before and after."""
    _, ref = _twins("resnet26", variant)
    x = make_input((2, 3, 64, 64), seed=4, dtype=torch.float64)
    ref.eval()
    with torch.no_grad():
        before = ref(x)
    count = sa_cuda.convert(ref)
    assert count == 8 and all(type(m) is fused_class(variant) for m in _sa_layers(ref))
    with torch.no_grad():
        after = ref(x)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-12 * before.abs().max().item())


def test_timm_model_compiles_with_fullgraph():
    """torch.compile(fullgraph=True) of a timm SA-ResNet: no graph break anywhere (an error under
    fullgraph), forward and backward equal to eager. aot_eager: Dynamo's capture and AOTAutograd's
    joint graph without Inductor's code generation (a minute for the whole network on 2 cores;
    Inductor on the layers themselves: tests/ops/test_compile.py)."""
    torch._dynamo.reset()
    fused, _ = _twins("resnet18", "sa_layer", dtype=torch.float32)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = make_input((2, 3, 64, 64), seed=5)
    gy = make_input((2, 10), seed=6)
    got = {k.removeprefix("_orig_mod."): v for k, v in forward_backward(compiled, x, gy).items()}
    want = forward_backward(fused, x, gy)
    assert got.keys() == want.keys()
    for key in want:
        scale = want[key].abs().max().item()
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5 * scale, msg=key)


@pytest.mark.parametrize(("name", "variant"), [MODELS[0], MODELS[3], MODELS[4]])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_fuses_the_tails_of_timm_blocks(name, variant, mode):
    """timm's Bottleneck (resnet26) and BasicBlock (resnet18) end in ``x += shortcut; x =
    self.act3(x)`` after the attention layer: convert fuses every block's tail into the residual op
    (8 blocks, no plain SA op) and a training step gives the reference model's loss, input and
    parameter gradients and BatchNorm statistics (float64)."""
    _, ref = _twins(name, variant)
    ref.train(mode == "train")
    model = copy.deepcopy(ref)
    report = sa_cuda.convert(model, report=True)
    blocks = [(n, type(m).__name__) for n, m in model.named_modules() if "se" in m._modules]
    assert report.count == 8 and report.fused_tails == blocks and len(blocks) == 8
    assert report.skipped_tails == []
    x = make_input((2, 3, 48, 48), seed=4, dtype=torch.float64)
    gy = make_input((2, 10), seed=5, dtype=torch.float64)
    with OpNames() as seen:
        got = forward_backward(model, x, gy)
    assert seen.names.count(f"sa_cuda.{variant}_residual_forward") == 8
    assert seen.names.count(f"sa_cuda.{variant}_residual_backward") == 8
    assert f"sa_cuda.{variant}_forward" not in seen.names
    want = forward_backward(ref, x, gy)
    for key in want:
        scale = max(1.0, want[key].abs().max().item())
        assert max_err(got[key], want[key]) <= 1e-10 * scale, key
    for (key, a), b in zip(model.named_buffers(), ref.buffers()):
        assert max_err(a.double(), b.double()) <= 1e-10 * max(1.0, b.abs().max().item()), key


def test_timm_blocks_with_drop_path_keep_their_tail():
    """With stochastic depth (drop_path_rate > 0) timm's blocks run DropPath between the attention
    layer and the add: that tail is not relu(sa(x) + shortcut), and convert leaves it, saying so.
    The first block's rate is 0 (no DropPath): its tail is fused."""
    model = _model("resnet18", "sa_layer", drop_path_rate=0.1)
    report = sa_cuda.convert(model, report=True)
    dropping = [n for n, m in model.named_modules() if getattr(m, "drop_path", None) is not None]
    assert len(dropping) == 7 and report.fused_tails == [("layer1.0", "BasicBlock")]
    assert [name for name, _, _ in report.skipped_tails] == dropping
    assert all("drop_path" in why for _, _, why in report.skipped_tails), report.skipped_tails
    assert ["_sa_cuda_tail" in vars(m) for n, m in model.named_modules() if n in dropping] == [
        False
    ] * 7
