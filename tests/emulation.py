"""Builds (once, cached under build/emulation) and loads the emulation build of the CUDA kernels:
torch.ops.sa_cuda_emu.* run csrc/cuda's kernels on CPU tensors through the SIMT emulator."""

from __future__ import annotations

import functools
import os

import torch
from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


@functools.lru_cache(maxsize=None)
def load_emulation():
    build = os.path.join(ROOT, "build", "emulation")
    os.makedirs(build, exist_ok=True)
    load(
        name="sa_cuda_emulation",
        sources=[os.path.join(CSRC, "host.cpp"), os.path.join(CSRC, "emulation", "emulated_ops.cpp")],
        extra_include_paths=[CSRC],
        extra_cflags=["-O2", "-std=c++20", "-pthread"],
        extra_ldflags=["-pthread"],
        build_directory=build,
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.sa_cuda_emu
