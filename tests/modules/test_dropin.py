"""Drop-in use: memory format, autocast, torch.export, ONNX, save/load (sa_cuda.convert on foreign
Shuffle Attention classes: tests/test_convert.py)."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import DEVICES, forward_backward, make_input, randomize_
from torch import nn

import sa_cuda
from sa_cuda.testing import max_err


def _net(layer):
    return nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), layer, nn.ReLU(), nn.Conv2d(32, 32, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [sa_cuda.SALayer, sa_cuda.ShuffleAttention])
def test_channels_last_in_channels_last_out(cls, device):
    layer = randomize_(cls(32, 4), seed=1).to(device)
    ref = randomize_(getattr(sa_cuda.reference, cls.__name__)(32, 4), seed=1).to(device)
    x = make_input((2, 32, 6, 5), seed=2, device=device).contiguous(
        memory_format=torch.channels_last
    )
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


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the shape checks become constants
@pytest.mark.parametrize("cls", [sa_cuda.SALayer, sa_cuda.ShuffleAttention])
def test_jit_trace(cls):
    """torch.jit.trace with its sanity check (which traces again under no_grad and compares the
    graphs): the traced module gives the module's output on other shapes, and its gradients."""
    model = _net(randomize_(cls(32, 4), seed=1))
    x = make_input((2, 32, 6, 5), seed=2)
    traced = torch.jit.trace(model, (x,))
    x2 = make_input((3, 32, 4, 7), seed=3)
    gy = make_input((3, 32, 4, 7), seed=4)
    got, want = forward_backward(traced, x2, gy), forward_backward(model, x2, gy)
    for key in want:
        assert torch.equal(got[key], want[key]), key


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
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), {
        n.domain for n in graph.node
    }
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)
