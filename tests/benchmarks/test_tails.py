"""benchmarks.tails: the bottleneck tails timed inside a model. A fake clock, advanced by the
model's parts in their forward and backward, makes every time exact: the tail's own time must
be counted, once, and nothing of bn3, the downsample, the identity's producer or the rest of the
model."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from benchmarks import tails
from sa_cuda.models.sa_resnet import SABottleneck


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _Advance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, clock, fwd_s, bwd_s):
        clock.now += fwd_s
        ctx.clock, ctx.bwd_s = clock, bwd_s
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.clock.now += ctx.bwd_s
        return grad, None, None, None


class Costs(nn.Module):
    """The identity, taking fwd_s on the clock in the forward and bwd_s in the backward."""

    def __init__(self, clock: FakeClock, fwd_s: float, bwd_s: float) -> None:
        super().__init__()
        self.clock, self.fwd_s, self.bwd_s = clock, fwd_s, bwd_s

    def forward(self, x):
        return _Advance.apply(x, self.clock, self.fwd_s, self.bwd_s)


class Block(nn.Module):
    """A bottleneck's shape: conv3, bn3, the downsample after bn3 (as torchvision runs it), then
    the tail (10 s forward, 20 s backward, with a parameter, an add and a relu). Everything else
    costs 100 s and more, so that a time counted wrongly shows."""

    def __init__(self, clock: FakeClock, downsample: bool) -> None:
        super().__init__()
        self.conv3 = Costs(clock, 100.0, 200.0)
        self.bn3 = Costs(clock, 1000.0, 2000.0)
        self.downsample = Costs(clock, 10000.0, 20000.0) if downsample else None
        self.tail = Costs(clock, 10.0, 20.0)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        out = self.bn3(self.conv3(x))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.tail(out) * self.scale + identity)


def _model(clock: FakeClock) -> nn.Module:
    return nn.Sequential(
        Costs(clock, 5.0, 7.0),  # the stem
        nn.Sequential(Block(clock, downsample=True), Block(clock, downsample=False)),
        nn.Sequential(Block(clock, downsample=True)),
    )


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(tails, "time", fake)
    return fake


def test_tails_counted_once_per_step(clock):
    model = _model(clock)
    timer = tails.TailTimer(model)
    x = torch.randn(2, 3, requires_grad=True)
    assert [name for name, _ in timer.blocks] == ["1.0", "1.1", "2.0"]
    steps = []
    for _ in range(3):  # no hooks pile up from step to step
        model(x).sum().backward()
        steps.append(timer.end_step())
    assert steps == [{"1/fwd": 20.0, "1/bwd": 40.0, "2/fwd": 10.0, "2/bwd": 20.0}] * 3
    summary = tails.summarize(steps)
    assert summary["all/fwd"] == 30e3 and summary["all/bwd"] == 60e3 and summary["all"] == 90e3

    with torch.no_grad():
        model(x)
    assert timer.end_step() == {"1/fwd": 20.0, "2/fwd": 10.0}  # no graph, no backward

    model(x).sum().backward()
    timer.discard()
    assert timer.end_step() == {}
    timer.remove()
    model(x).sum().backward()
    assert timer.end_step() == {}


def test_tail_nodes_stop_at_bn3_and_identity():
    """On the real blocks: torchvision's tail is its relu and add, the fused SABottleneck's the
    one sa_cuda node, the reference SABottleneck's every small op of SA, its add and relu, and
    never a node of bn3 or before, nor a parameter's AccumulateGrad."""
    blocks = {
        "torchvision": torchvision.models.resnet.Bottleneck(64, 16),
        "fused": SABottleneck(64, 16, sa_groups=8, fused=True),
        "reference": SABottleneck(64, 16, sa_groups=8, fused=False),
    }
    found = {}
    for name, block in blocks.items():
        stop = {}
        block.bn3.register_forward_hook(lambda m, a, out: stop.update(bn3=out.grad_fn))
        x = torch.randn(2, 64, 8, 8, requires_grad=True).mul(1.0)
        out = block(x)
        found[name] = [
            type(n).__name__ for n in tails.tail_nodes(out.grad_fn, [stop["bn3"], x.grad_fn])
        ]
    assert found["torchvision"] == ["ReluBackward0", "AddBackward0"]
    assert found["fused"] == ["ShuffleAttentionResidualFunctionBackward"]
    reference = found["reference"]
    assert {"ReluBackward0", "AddBackward0", "SigmoidBackward0", "NativeGroupNormBackward0"} <= set(
        reference
    )
    every = {n for names in found.values() for n in names}
    assert not every & {"AccumulateGrad", "NativeBatchNormBackward0", "ConvolutionBackward0"}


def test_no_bottleneck_refused():
    with pytest.raises(ValueError, match="model: no bottleneck block"):
        tails.TailTimer(nn.Sequential(nn.Linear(2, 2)))
