"""Distributed training with the fused layers: DistributedDataParallel over gloo, 2 processes on
the CPU spawned by the test, eager and under torch.compile, and FSDP2's fully_shard. A few SGD steps
of a small SA network, each rank on half of every batch, must end with the parameters of one process
trained on the whole batches: float64 to rounding (the all-reduce sums the two halves' gradients in
another order than one backward does), float32 within 1e-5 of the largest parameter change.

The network has no BatchNorm (whose batch statistics DDP does not share, so each rank would
normalize its half differently): convolutions, the SA layers (their GroupNorm is per sample), ReLU,
pooling and a linear layer."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sa_cuda

WORLD = 2
STEPS = 4
BATCH = 8  # per step, split over the ranks
LR = 0.1


def small_net(dtype: torch.dtype, fused: bool = True) -> nn.Module:
    """The network, the same weights every call; ``fused=False``: the reference layers."""
    layers = sa_cuda if fused else sa_cuda.reference
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        layers.SALayer(16, 2),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        layers.ShuffleAttention(32, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    # the SA layers' initial gates are constants (zero weights): random ones, so that every
    # parameter of the layers gets a gradient that depends on the input
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (net[1], net[4]):
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net.to(dtype)


def batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(BATCH, 3, 12, 12, generator=gen).to(dtype),
            torch.randint(0, 10, (BATCH,), generator=gen),
        )
        for _ in range(STEPS)
    ]


def train(model: nn.Module, data, rank: int = 0, world: int = 1) -> None:
    """SGD with momentum on this rank's share of each batch; the loss is the mean over the share, so
    DDP's gradient average over equal shares is the whole batch's mean gradient."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    share = BATCH // world
    for x, y in data:
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors of the whole parameters (FSDP2 holds DTensor shards)."""
    out = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("_orig_mod.", "").replace("module.", "")] = p.detach().clone()
    return out


def _fsdp2_run(dtype):
    """FSDP2 (fully_shard) on this process group, or the reason it cannot run here."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # older torch: FSDP2 lived under torch.distributed._composable
        return f"no torch.distributed.fsdp.fully_shard: {e}"
    model = small_net(dtype)
    try:  # only the sharding itself may be unsupported; a failure in training is a failure
        for layer in (model[0], model[3], model[8]):
            fully_shard(layer)
        fully_shard(model)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        return f"FSDP2 fully_shard is not available on CPU with gloo: {type(e).__name__}: {e}"
    train(model, batches(dtype), dist.get_rank(), WORLD)
    return _full_state(model)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    # a rank that fails leaves the other in a collective: 2 minutes, not gloo's default 30
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=120),
    )
    torch.set_num_threads(1)
    results = {}
    for name, dtype, compiled in (
        ("ddp-fp64", torch.float64, False),
        ("ddp-fp32", torch.float32, False),
        ("ddp-compile-fp32", torch.float32, True),
    ):
        model = nn.parallel.DistributedDataParallel(small_net(dtype))
        if compiled:
            # aot_eager: Dynamo's capture with DDP's graph splits at the gradient buckets and
            # AOTAutograd's backward, without Inductor's code generation (minutes on 2 cores)
            model = torch.compile(model, backend="aot_eager")
        train(model, batches(dtype), rank, WORLD)
        results[name] = _full_state(model)
    results["fsdp2-fp64"] = _fsdp2_run(torch.float64)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results():
    """The ranks' parameters after training, per configuration (one spawn for all of them)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


def _single_process(
    dtype: torch.dtype, compiled: bool = False, fused: bool = True
) -> dict[str, torch.Tensor]:
    model = small_net(dtype, fused)
    if compiled:
        torch._dynamo.reset()
        model = torch.compile(model, backend="aot_eager")
    train(model, batches(dtype))
    return _full_state(model)


def _assert_same_parameters(got, want, initial, rtol):
    """Each parameter within rtol of the largest change any parameter made (the distance the
    training moved them: tighter than the parameters' own size)."""
    assert got.keys() == want.keys()
    moved = max((want[k] - initial[k]).abs().max().item() for k in want)
    assert moved > 1e-3  # the steps did train
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=rtol * moved, msg=key)


@pytest.mark.parametrize(
    "config,dtype,rtol",
    [("ddp-fp64", torch.float64, 1e-12), ("ddp-fp32", torch.float32, 1e-5)],
)
def test_ddp_matches_one_process(distributed_results, config, dtype, rtol):
    want = _single_process(dtype)
    initial = _full_state(small_net(dtype))
    # the one-process run itself against the same training with the reference layers
    _assert_same_parameters(want, _single_process(dtype, fused=False), initial, rtol)
    for rank in range(WORLD):
        _assert_same_parameters(distributed_results[rank][config], want, initial, rtol)


def test_ddp_under_compile_matches_one_process(distributed_results):
    want = _single_process(torch.float32, compiled=True)
    initial = _full_state(small_net(torch.float32))
    for rank in range(WORLD):
        got = distributed_results[rank]["ddp-compile-fp32"]
        _assert_same_parameters(got, want, initial, 1e-5)


def test_fsdp2_matches_one_process(distributed_results):
    result = distributed_results[0]["fsdp2-fp64"]
    if isinstance(result, str):
        pytest.skip(result)
    want = _single_process(torch.float64)
    initial = _full_state(small_net(torch.float64))
    for rank in range(WORLD):
        _assert_same_parameters(distributed_results[rank]["fsdp2-fp64"], want, initial, 1e-12)
