"""SA-ResNet with the official SA-Net layout: state_dict keys/shapes, strict loads, fused == eager."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CUDA_OK, CUDA_REASON, DEVICES, OpNames, randomize_

from sa_cuda import SALayer, reference
from sa_cuda.models import convert_official_state_dict, sa_resnet50, sa_resnet101, sa_resnet152
from sa_cuda.testing import assert_close_to_reference, max_err

# Key counts and parameter counts of the official models/sa_resnet.py (wofmanaf/SA-Net): 416 / 824 /
# 1232 state_dict entries; 25.56M / 44.55M / 60.2M parameters (the official README's numbers).
OFFICIAL = [(sa_resnet50, 416, 25.56e6), (sa_resnet101, 824, 44.55e6), (sa_resnet152, 1232, 60.2e6)]


@pytest.mark.parametrize("build,n_keys,n_params", OFFICIAL)
def test_official_key_set_and_shapes(build, n_keys, n_params):
    fused, eager = build(fused=True), build(fused=False)
    sd_fused, sd_eager = fused.state_dict(), eager.state_dict()
    assert len(sd_fused) == n_keys
    assert {k: tuple(v.shape) for k, v in sd_fused.items()} == {
        k: tuple(v.shape) for k, v in sd_eager.items()
    }
    assert abs(sum(p.numel() for p in fused.parameters()) - n_params) / n_params < 0.005
    # The SA layer after bn3 of a bottleneck, with G = 64 (m = 4 * planes / 128).
    assert tuple(sd_fused["layer1.0.sa.cweight"].shape) == (1, 2, 1, 1)
    assert tuple(sd_fused["layer4.2.sa.gn.weight"].shape) == (16,)
    assert "layer1.0.downsample.0.weight" in sd_fused and "fc.weight" in sd_fused
    assert sum(isinstance(m, SALayer) for m in fused.modules()) == sum(
        1 for k in sd_fused if k.endswith("sa.cweight")
    )
    eager.load_state_dict(sd_fused, strict=True)
    fused.load_state_dict(sd_eager, strict=True)


def test_official_checkpoint_format_loads():
    eager = sa_resnet50(fused=False)
    checkpoint = {
        "epoch": 1,
        "state_dict": {f"module.{k}": v for k, v in eager.state_dict().items()},
    }
    sa_resnet50(fused=True).load_state_dict(convert_official_state_dict(checkpoint), strict=True)


def test_fused_resnet_matches_eager():
    torch.manual_seed(0)
    eager = sa_resnet50(num_classes=10, fused=False).double().eval()
    for module in eager.modules():
        if isinstance(module, reference.SALayer):
            randomize_(module, seed=1)
    fused = sa_resnet50(num_classes=10, fused=True).double().eval()
    fused.load_state_dict(eager.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert max_err(fused(x), eager(x)) <= 1e-10


def test_fused_bottleneck_tail_is_one_op_and_trains_as_eager():
    """The fused SA-ResNet-50 runs each bottleneck's tail, relu(sa(bn3(...)) + identity), as the
    residual op (16 calls, no plain SA op), and a training step gives the eager model's loss and
    every parameter gradient (float64, train mode: BatchNorm on batch statistics)."""
    torch.manual_seed(0)
    eager = sa_resnet50(num_classes=10, fused=False).double()
    for module in eager.modules():
        if isinstance(module, reference.SALayer):
            randomize_(module, seed=1)
    fused = sa_resnet50(num_classes=10, fused=True).double()
    fused.load_state_dict(eager.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    target = torch.tensor([3, 7])
    losses = []
    for model in (eager, fused):
        with OpNames() as seen:
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
        losses.append(loss.item())
        if model is fused:
            assert seen.names.count("sa_cuda.sa_layer_residual_forward") == 16
            assert seen.names.count("sa_cuda.sa_layer_residual_backward") == 16
            assert "sa_cuda.sa_layer_forward" not in seen.names
    assert abs(losses[0] - losses[1]) <= 1e-12
    grads = dict(fused.named_parameters())
    for name, p in eager.named_parameters():
        assert max_err(grads[name].grad, p.grad) <= 1e-9 * max(1.0, p.grad.abs().max().item()), name


def test_inference_folds_every_batchnorm_into_its_convolution():
    """Inference needs no BatchNorm prologue in the SA kernel: torch.ao's fuse_modules folds every
    eval-mode BatchNorm into the convolution before it (bn3, the one before each SA layer, into
    conv3), by module names, without tracing the fused layers. The folded fused model runs no
    BatchNorm and gives the unfolded model's logits."""
    from sa_cuda.models.sa_resnet import SABottleneck

    torch.manual_seed(0)
    model = sa_resnet50(num_classes=10, fused=True).double().eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # running statistics and affine parameters far from the identity
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for t in (module.running_mean, module.weight, module.bias):
                    t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    pairs = [["conv1", "bn1"]]
    for name, block in model.named_modules():
        if isinstance(block, SABottleneck):
            pairs += [[f"{name}.conv{i}", f"{name}.bn{i}"] for i in (1, 2, 3)]
            if block.downsample is not None:
                pairs.append([f"{name}.downsample.0", f"{name}.downsample.1"])
    folded = torch.ao.quantization.fuse_modules(copy.deepcopy(model), pairs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, SALayer) for m in folded.modules()) == 16
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert max_err(got, want) <= 1e-9 * max(1.0, want.abs().max().item())


def test_sa_resnet50_traces_without_graph_breaks():
    """torch._dynamo.explain over the whole SA-ResNet-50 with fused SA layers: one graph, no break
    from the sa_cuda op (16 SA layers)."""
    torch._dynamo.reset()
    model = sa_resnet50(num_classes=10, fused=True).eval()
    explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # The fused SA layers are in the graph as the autograd.Function (16 of them), not run eagerly.
    ops = [
        str(n.target)
        for gm in explanation.graphs
        for n in gm.graph.nodes
        if n.op == "call_function"
    ]
    assert ops.count("autograd_function_apply") == 16


CUDA = pytest.mark.skipif(not CUDA_OK, reason=CUDA_REASON)


@CUDA
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_sa_resnet50_compile_cuda(mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = sa_resnet50(num_classes=10, fused=True).cuda().eval()
    compiled = torch.compile(eager, mode=mode, fullgraph=True)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        want = eager(x)
        for _ in range(3):  # reduce-overhead records, then replays a CUDA graph
            got = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@CUDA
def test_cuda_graph_capture_and_replay():
    torch.manual_seed(0)
    layer = randomize_(SALayer(256, 64), seed=2).cuda()
    static_x = torch.randn(8, 256, 28, 28, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        layer(static_x)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = layer(static_x)
    for seed in (3, 4):
        static_x.copy_(
            torch.randn(
                static_x.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)
            )
        )
        graph.replay()
        with torch.no_grad():
            torch.testing.assert_close(static_out, layer(static_x), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_training_step(dtype, device):
    """SA-ResNet-50 under autocast, in training mode: the fused model's output is as close to the
    float64 model as eager's autocast output is (sa_cuda.testing.assert_close_to_reference: 2x
    eager's error plus one ulp), and AMP training with a GradScaler gets to a step it takes.
    Measured against float64 and not against eager autocast: 50 layers of bf16 put eager itself 15%
    away from the float64 output (0.21 of max 1.39 on CPU), so two bf16 runs differ by as much as
    either errs."""
    torch.manual_seed(0)
    model = sa_resnet50(num_classes=10, fused=True).to(device)
    reference_model = sa_resnet50(num_classes=10, fused=False).to(device)
    reference_model.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 64, 64, device=device)
    want64 = copy.deepcopy(reference_model).double()(x.double())
    with torch.autocast(device, dtype=dtype):
        out, want = model(x), reference_model(x)
    assert torch.isfinite(out).all()
    assert_close_to_reference({"out": out}, {"out": want64}, dtype, eager={"out": want})
    # fp16 gradients overflow at the default initial scale 2**16 (eager's too, in conv1) and at
    # 2**15 and 2**14: the scaler skips such a step and halves the scale. Starting at 2**13 spares
    # three fp16 steps of a 50-layer model on the CPU (4 s each); it must still get to a step it
    # takes.
    scaler = torch.amp.GradScaler(device, init_scale=2.0**13)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(8):
        opt.zero_grad()
        with torch.autocast(device, dtype=dtype):
            loss = model(x).float().logsumexp(1).mean()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() >= scale:  # no inf/NaN found: the step was taken
            break
    else:
        pytest.fail(f"GradScaler skipped 8 steps (scale now {scaler.get_scale()})")
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
