"""Memory of the fused op: what autograd saves for backward (x itself and the [B, C] statistics,
no x-sized intermediate), and no growth of resident memory over many calls."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from conftest import VARIANTS, make_fused_like, make_input, make_ref


def saved_bytes(module, x):
    """(bytes of tensors saved for backward whose storage is neither a parameter's nor x's,
    list of those tensors, all saved tensors)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    known = {p.untyped_storage().data_ptr() for p in module.parameters()}
    known.add(x.untyped_storage().data_ptr())
    new, seen = [], set()
    for t in saved:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known and ptr not in seen:
            seen.add(ptr)
            new.append(t)
    return sum(t.untyped_storage().nbytes() for t in new), new, saved


@pytest.mark.parametrize(
    "dtype,stat_bytes",
    [(torch.float32, 4), (torch.float64, 8), (torch.bfloat16, 4)],
    ids=["fp32", "fp64", "bf16"],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_autograd_saves_only_x_and_statistics(variant, dtype, stat_bytes):
    """The fused forward saves x itself (no copy), the parameters, and 2 * B * C statistics
    (float32; float64 for float64 x): exactly 2 * B * C * 4 new bytes for float32 input. The eager
    reference saves several x-sized intermediates."""
    B, C_, H, W = 4, 64, 14, 14
    ref = make_ref(variant, C_, 8, seed=1, dtype=dtype)
    fused = make_fused_like(variant, ref)
    x = make_input((B, C_, H, W), seed=2, dtype=dtype).requires_grad_(True)
    nbytes, new, saved = saved_bytes(fused, x)
    assert nbytes == 2 * B * C_ * stat_bytes, [(tuple(t.shape), t.dtype) for t in new]
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
    ref_bytes, _, _ = saved_bytes(ref, x)
    x_bytes = x.numel() * x.element_size()
    assert ref_bytes >= x_bytes, (ref_bytes, x_bytes)  # the difference the fused op makes
    print(
        f"{variant} {dtype}: fused saves {nbytes} new bytes, the reference {ref_bytes} "
        f"({ref_bytes / x_bytes:.2f} x the input's {x_bytes})"
    )


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm")
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_memory_growth_over_1000_calls(variant):
    """Resident memory does not grow over 1000 forward + backward calls (after 100 warm-up
    calls): < 10 MB, i.e. no leak of even ~10 KB per call."""
    ref = make_ref(variant, 32, 4, seed=1)
    fused = make_fused_like(variant, ref)
    x0, gy = make_input((2, 32, 8, 8), seed=2), make_input((2, 32, 8, 8), seed=3)

    def step():
        x = x0.clone().requires_grad_(True)
        fused(x).backward(gy)
        fused.zero_grad(set_to_none=True)

    for _ in range(100):
        step()
    gc.collect()
    before = _rss_bytes()
    for _ in range(1000):
        step()
    gc.collect()
    growth = _rss_bytes() - before
    assert growth < 10 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB over 1000 calls"
