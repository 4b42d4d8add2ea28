"""What was built, and that every public entry point reaches the kernels it should."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import sa_cuda
from sa_cuda import _C

OPS = ("sa_layer_forward", "sa_layer_backward", "shuffle_attention_forward", "shuffle_attention_backward")


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sa_cuda::{op}", "CPU")


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered_when_built(op):
    """CI sets SA_CUDA_REQUIRE_CUDA=1: there the CUDA kernels must have been compiled and linked."""
    if os.environ.get("SA_CUDA_REQUIRE_CUDA") == "1":
        assert _C.cuda_built(), "SA_CUDA_REQUIRE_CUDA=1 but sa_cuda._C has no CUDA kernels"
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"sa_cuda::{op}", "CUDA")
    assert has_cuda_kernel == _C.cuda_built()
    assert sa_cuda.fused_available("cuda") == _C.cuda_built()


def test_python_m_sa_cuda_prints_build_info():
    out = subprocess.run([sys.executable, "-m", "sa_cuda"], capture_output=True, text=True, check=True).stdout
    assert f"sa_cuda: {sa_cuda.__version__}" in out
    assert f"CPU kernels: built ({_C.cpu_capability()})" in out
    assert ("CUDA kernels: built" in out) == _C.cuda_built()
    if _C.cuda_built():
        from sa_cuda._build_info import CUDA_ARCHS
        assert CUDA_ARCHS and f"TORCH_CUDA_ARCH_LIST {CUDA_ARCHS})" in out
