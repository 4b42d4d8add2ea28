"""Drop-in use: sa_cuda.convert on foreign Shuffle Attention classes, memory format, autocast,
torch.export, save/load."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import sa_cuda
from conftest import DEVICES, forward_backward, make_input, max_err, randomize_


# ---- foreign classes, written here from their published code -----------------------------------
class OfficialSaLayer(nn.Module):
    """SA-Net's models/sa_resnet.py ``sa_layer`` (wofmanaf/SA-Net)."""

    def __init__(self, channel, groups=64):
        super().__init__()
        self.groups = groups
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.cweight = nn.Parameter(torch.zeros(1, channel // (2 * groups), 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, channel // (2 * groups), 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, channel // (2 * groups), 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, channel // (2 * groups), 1, 1))
        self.sigmoid = nn.Sigmoid()
        self.gn = nn.GroupNorm(channel // (2 * groups), channel // (2 * groups))

    @staticmethod
    def channel_shuffle(x, groups):
        b, c, h, w = x.shape
        x = x.reshape(b, groups, -1, h, w)
        x = x.permute(0, 2, 1, 3, 4)
        return x.reshape(b, -1, h, w)

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b * self.groups, -1, h, w)
        x_0, x_1 = x.chunk(2, dim=1)
        xn = self.avg_pool(x_0)
        xn = self.cweight * xn + self.cbias
        xn = x_0 * self.sigmoid(xn)
        xs = self.gn(x_1)
        xs = self.sweight * xs + self.sbias
        xs = x_1 * self.sigmoid(xs)
        out = torch.cat([xn, xs], dim=1)
        out = out.reshape(b, -1, h, w)
        return self.channel_shuffle(out, 2)


class ExternalAttentionShuffleAttention(nn.Module):
    """External-Attention-pytorch's model/attention/ShuffleAttention.py (groups in ``G``)."""

    def __init__(self, channel=512, reduction=16, G=8):
        super().__init__()
        self.G = G
        self.channel = channel
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.gn = nn.GroupNorm(channel // (2 * G), channel // (2 * G))
        self.cweight = nn.Parameter(torch.zeros(1, channel // (2 * G), 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, channel // (2 * G), 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, channel // (2 * G), 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, channel // (2 * G), 1, 1))
        self.sigmoid = nn.Sigmoid()

    @staticmethod
    def channel_shuffle(x, groups):
        b, c, h, w = x.shape
        x = x.reshape(b, groups, -1, h, w)
        x = x.permute(0, 2, 1, 3, 4)
        return x.reshape(b, -1, h, w)

    def forward(self, x):
        b, c, h, w = x.size()
        x = x.view(b * self.G, -1, h, w)
        x_0, x_1 = x.chunk(2, dim=1)
        x_channel = self.avg_pool(x_0)
        x_channel = self.cweight * x_channel + self.cbias
        x_channel = x_0 * self.sigmoid(x_channel)
        x_spatial = self.gn(x_1)
        x_spatial = self.sweight * x_spatial + self.sbias
        x_spatial = x_1 * self.sigmoid(x_spatial)
        out = torch.cat([x_channel, x_spatial], dim=1)
        out = out.contiguous().view(b, -1, h, w)
        return self.channel_shuffle(out, 2)


class SeedShuffleAttention(nn.Module):
    """The seed document's ShuffleAttention (1x1-conv gates)."""

    def __init__(self, channel, groups=64):
        super().__init__()
        self.groups = groups
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        mid_channel = channel // (groups * 2)
        self.affine1 = nn.Conv2d(mid_channel, mid_channel, 1)
        self.affine2 = nn.Conv2d(mid_channel, mid_channel, 1)
        self.sigmoid = nn.Sigmoid()
        self.gn = nn.GroupNorm(num_groups=mid_channel, num_channels=mid_channel)

    def channel_shuffle(self, x, groups):
        b, c, h, w = x.shape
        x = x.reshape(b, groups, -1, h, w)
        x = x.permute(0, 2, 1, 3, 4)
        return x.reshape(b, -1, h, w)

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b * self.groups, -1, h, w)
        x_0, x_1 = x.chunk(2, dim=1)
        xn = x_0 * self.sigmoid(self.affine1(self.avg_pool(x_0)))
        xs = x_1 * self.sigmoid(self.affine2(self.gn(x_1)))
        out = torch.cat([xn, xs], dim=1).reshape(b, -1, h, w)
        return self.channel_shuffle(out, 2)


class NotShuffleAttention(nn.Module):
    """Has a gn and groups but no SA parameters: must be left alone."""

    def __init__(self):
        super().__init__()
        self.groups = 2
        self.gn = nn.GroupNorm(4, 4)

    def forward(self, x):
        return self.gn(x)


def _net(layer):
    return nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), layer, nn.ReLU(), nn.Conv2d(32, 32, 1))


FOREIGN = [
    pytest.param(lambda: OfficialSaLayer(32, groups=4), sa_cuda.SALayer, id="official-sa_layer"),
    pytest.param(lambda: ExternalAttentionShuffleAttention(32, G=2), sa_cuda.SALayer, id="external-attention-G"),
    pytest.param(lambda: SeedShuffleAttention(32, groups=4), sa_cuda.ShuffleAttention, id="seed"),
    pytest.param(lambda: sa_cuda.reference.SALayer(32, 4), sa_cuda.SALayer, id="reference-SALayer"),
    pytest.param(lambda: sa_cuda.reference.ShuffleAttention(32, 8), sa_cuda.ShuffleAttention, id="reference-ShuffleAttention"),
]


@pytest.mark.parametrize("make_layer,fused_cls", FOREIGN)
def test_convert_keeps_outputs_gradients_and_parameters(make_layer, fused_cls):
    torch.manual_seed(0)
    model = _net(make_layer()).double()
    randomize_(model, seed=3)
    model.train(False)
    x, gy = make_input((2, 32, 7, 9), seed=1, dtype=torch.float64), make_input((2, 32, 7, 9), seed=2, dtype=torch.float64)
    before = forward_backward(model, x, gy)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    assert sa_cuda.convert(model) == 1
    assert type(model[1]) is fused_cls
    assert model.training is False and model[1].training is False
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    after = forward_backward(model, x, gy)
    for key in before:
        assert max_err(after[key], before[key]) <= 1e-10 * max(1.0, before[key].abs().max().item()), key
    optimizer.step()  # the optimizer built before the conversion still drives the model
    assert sa_cuda.convert(model) == 0  # fused modules are left alone


def test_convert_leaves_unknown_modules_and_counts_all():
    model = nn.Sequential(NotShuffleAttention(), nn.Sequential(OfficialSaLayer(16, 2), SeedShuffleAttention(16, 2)),
                          OfficialSaLayer(16, 4))
    assert sa_cuda.convert(model) == 3
    assert type(model[0]) is NotShuffleAttention
    assert [type(m) for m in (model[1][0], model[1][1], model[2])] == [sa_cuda.SALayer, sa_cuda.ShuffleAttention, sa_cuda.SALayer]
    assert model[2].groups == 4


def test_convert_keeps_hooks():
    model = nn.Sequential(OfficialSaLayer(16, 2))
    seen = []
    model[0].register_forward_hook(lambda mod, inp, out: seen.append(type(mod)))
    sa_cuda.convert(model)
    model(torch.randn(1, 16, 4, 4))
    assert seen == [sa_cuda.SALayer]


def test_fuse_single_layer_and_root_not_replaced():
    layer = OfficialSaLayer(16, 2)
    assert sa_cuda.convert(layer) == 0
    fused = sa_cuda.fuse(layer)
    assert isinstance(fused, sa_cuda.SALayer) and fused.cweight is layer.cweight
    assert sa_cuda.fuse(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [sa_cuda.SALayer, sa_cuda.ShuffleAttention])
def test_channels_last_in_channels_last_out(cls, device):
    layer = randomize_(cls(32, 4), seed=1).to(device)
    ref = randomize_(getattr(sa_cuda.reference, cls.__name__)(32, 4), seed=1).to(device)
    x = make_input((2, 32, 6, 5), seed=2, device=device).contiguous(memory_format=torch.channels_last)
    gy = make_input((2, 32, 6, 5), seed=3, device=device)
    out = layer(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    fused, R = forward_backward(layer, x, gy), forward_backward(ref, x, gy)
    for key in R:
        torch.testing.assert_close(fused[key], R[key], rtol=1e-5, atol=1e-5)


def test_autocast_cpu_bf16_and_grad_scaler():
    """Under torch.autocast the layer gets whatever dtype the previous op produced (bf16 after a
    conv) and computes with its fp32 parameters; a GradScaler training step works."""
    torch.manual_seed(0)
    model = _net(sa_cuda.SALayer(32, 4))
    randomize_(model, seed=4)
    ref = _net(sa_cuda.reference.SALayer(32, 4))
    ref.load_state_dict(model.state_dict())
    x = make_input((2, 32, 8, 8), seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        out_ref = ref(x)
    want = ref.double()(x.double())
    err, err_ref = max_err(out, want), max_err(out_ref, want)
    assert err <= 2 * err_ref + 1e-3, (err, err_ref)

    scaler = torch.amp.GradScaler("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model[1].sweight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert model[1].sweight.grad is not None and torch.isfinite(model[1].sweight.grad).all()
    assert not torch.equal(before, model[1].sweight.detach())


@pytest.mark.parametrize("cls", [sa_cuda.SALayer, sa_cuda.ShuffleAttention])
def test_torch_export_keeps_the_op(cls):
    model = _net(randomize_(cls(32, 4), seed=6)).eval()
    x = make_input((2, 32, 8, 8), seed=7)
    program = torch.export.export(model, (x,))
    assert "sa_cuda." in program.graph_module.code
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [sa_cuda.SALayer, sa_cuda.ShuffleAttention])
def test_save_load_round_trip(cls):
    layer = randomize_(cls(32, 4), seed=8)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = cls(32, 4)
    other.load_state_dict(torch.load(buffer), strict=True)
    x = make_input((1, 32, 5, 5), seed=9)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # the whole module
    buffer.seek(0)
    whole = torch.load(buffer, weights_only=False)
    assert type(whole) is cls
    torch.testing.assert_close(whole(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-exporter", "torchscript-exporter"])
@pytest.mark.parametrize("cls", [sa_cuda.SALayer, sa_cuda.ShuffleAttention])
def test_onnx_export_runs_the_reference_math(cls, dynamo, tmp_path):
    """During torch.onnx.export the fused modules run the reference code, so the ONNX graph holds
    standard ops only and an ONNX runtime reproduces the module's output."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _net(randomize_(cls(32, 4), seed=10)).eval()
    x = make_input((2, 32, 8, 8), seed=11)
    path = str(tmp_path / "model.onnx")
    if dynamo:
        torch.onnx.export(model, (x,), dynamo=True).save(path)
    else:
        torch.onnx.export(model, (x,), path, dynamo=False)
    graph = onnx.load(path).graph
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), {n.domain for n in graph.node}
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)
