"""What was built, and that every public entry point reaches the kernels it should."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch

import sa_cuda
from sa_cuda import _C

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OPS = (
    "sa_layer_forward",
    "sa_layer_backward",
    "shuffle_attention_forward",
    "shuffle_attention_backward",
)


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
    out = subprocess.run(
        [sys.executable, "-m", "sa_cuda"], capture_output=True, text=True, check=True
    ).stdout
    assert f"sa_cuda: {sa_cuda.__version__}" in out
    assert f"CPU kernels: built ({_C.cpu_capability()})" in out
    assert ("CUDA kernels: built" in out) == _C.cuda_built()
    if _C.cuda_built():
        from sa_cuda._build_info import CUDA_ARCHS

        assert CUDA_ARCHS and f"TORCH_CUDA_ARCH_LIST {CUDA_ARCHS})" in out


def test_installed_metadata_has_the_version():
    """pip's metadata of the install of this tree (scripts/setup_env.sh's `pip install -e`) states the
    version sa_cuda reports; they differ when sa_cuda/_version.py changed after the install."""
    installs = [
        dist
        for dist in importlib.metadata.distributions(name="sa-cuda")
        if json.loads(dist.read_text("direct_url.json") or "{}").get("url") == f"file://{ROOT}"
    ]
    if not installs:
        pytest.skip("this tree is not pip-installed (built in place only)")
    for dist in installs:
        assert dist.version == sa_cuda.__version__, (
            "stale install: pip install --no-build-isolation -e ."
        )
