"""Determinism and thread safety: forward, backward and every parameter gradient are bitwise
repeatable (CPU: with 1 and 2 threads; the CUDA kernels on their launch paths), and Python threads
running the layer concurrently give the serial results bitwise."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch
from conftest import (
    BACKENDS,
    VARIANTS,
    all_grads,
    make_input,
    make_ref,
    op_params,
    params_in_op_order,
)


def _fwd_bwd_functional(variant, backend, x, groups, params, gy):
    dev = backend.device
    return all_grads(
        lambda x_, *p: backend.apply(variant, x_, groups, p),
        x.to(dev),
        [p.to(dev) for p in params],
        gy.to(dev),
    )


def _assert_bitwise(a, b, what):
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (
            f"{what}: {key} differs"
        )


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"]
)
@pytest.mark.parametrize(
    "shape,groups",
    [((2, 64, 16, 16), 8), ((2, 256, 14, 14), 8), ((1, 8, 72, 64), 2), ((3, 16, 1, 1), 4)],
    ids=["2x64x16x16", "2x256x14x14", "1x8x72x64", "hw1"],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_bitwise_repeatable_across_threads(variant, shape, groups, dtype):
    """Forward, backward and every parameter gradient are bitwise identical over repeated runs
    with 2 threads and with 1 thread (parameter gradients are reduced in a fixed order)."""
    params = op_params(variant, shape[1], groups, 7, dtype)
    x, gy = make_input(shape, seed=8, dtype=dtype), make_input(shape, seed=9, dtype=dtype)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (2, 1, 2, 1):
            torch.set_num_threads(n)
            runs.append((n, _fwd_bwd_functional(variant, BACKENDS["cpu"], x, groups, params, gy)))
    finally:
        torch.set_num_threads(threads)
    for n, res in runs[1:]:
        _assert_bitwise(runs[0][1], res, f"{n} thread(s) vs 2 threads")


@pytest.mark.parametrize(
    "shape,groups,offset,channels_last",
    [
        pytest.param((2, 16, 7, 9), 2, 0, False, id="warp"),
        pytest.param((1, 8, 30, 32), 2, 1, False, id="block-misaligned"),
        pytest.param((1, 4, 65, 67), 1, 0, False, id="streamed"),
        pytest.param((1, 64, 9, 7), 1, 0, False, id="m32"),
        # the NHWC kernels: chunk partials merged in chunk order; one tile of 10 packs of 4
        # channels (two tiles of 32 channels on a GPU's small grids), windows 16 + 4 (m = 4); then
        # windows of m = 16 walked in 64-pixel tiles, two chunks
        pytest.param((2, 40, 17, 19), 5, 0, True, id="nhwc"),
        pytest.param((1, 64, 20, 20), 2, 0, True, id="nhwc-m16"),
    ],
)
@pytest.mark.parametrize("backend", ["emulated", "cuda"], indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_bitwise_repeatable(backend, variant, shape, groups, offset, channels_last):
    params = op_params(variant, shape[1], groups, 7)
    n = torch.Size(shape).numel()
    x = make_input((n + offset,), seed=8)[offset:].view(shape)
    gy = make_input(shape, seed=9)
    if channels_last:
        x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
    first = _fwd_bwd_functional(variant, backend, x, groups, params, gy)
    for _ in range(2):
        _assert_bitwise(
            first, _fwd_bwd_functional(variant, backend, x, groups, params, gy), "rerun"
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_concurrent_python_threads_match_serial(backend, variant):
    """4 Python threads, each running forward + backward on its own input with shared parameters
    (torch.autograd.grad: no shared .grad accumulation), give the serial results bitwise."""
    shapes = [((2, 32, 12, 12), 4), ((1, 32, 20, 20), 4), ((3, 32, 5, 7), 4), ((2, 32, 1, 1), 4)]
    if backend.name == "emulated":
        shapes = [((1, 16, 7, 9), 2), ((1, 16, 20, 20), 2), ((2, 16, 5, 3), 2), ((1, 16, 1, 1), 2)]
    params = [
        p.detach()
        for p in params_in_op_order(
            variant, make_ref(variant, shapes[0][0][1], shapes[0][1], seed=5)
        )
    ]
    tasks = []
    for i, (shape, groups) in enumerate(shapes * 2):
        tasks.append((make_input(shape, seed=20 + i), groups, make_input(shape, seed=40 + i)))

    def work(task):
        x, groups, gy = task
        return _fwd_bwd_functional(variant, backend, x, groups, params, gy)

    serial = [work(t) for t in tasks]
    rounds = 1 if backend.name == "emulated" else 3
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for r in range(rounds):
            for i, res in enumerate(pool.map(work, tasks)):
                _assert_bitwise(serial[i], res, f"round {r}, task {i}")


# ================================================================================================
