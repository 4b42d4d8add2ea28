"""``python -m sa_cuda``: version and build information."""

from __future__ import annotations

import torch

import sa_cuda
from sa_cuda import _C


def _build_info() -> str:
    try:
        from sa_cuda._build_info import CUDA_ARCHS
    except ImportError:  # built by other means than setup.py
        return "unknown"
    return CUDA_ARCHS


def build_info() -> dict:
    cuda_built = _C.cuda_built()
    return {
        "sa_cuda": sa_cuda.__version__,
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda,
        "CPU kernels": f"built ({_C.cpu_capability()})",
        "CUDA kernels": f"built (TORCH_CUDA_ARCH_LIST {_build_info()})"
        if cuda_built
        else "not built",
        "CUDA device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "fused on this machine": ", ".join(
            d
            for d in ("cpu", "cuda")
            if (d == "cpu" or torch.cuda.is_available()) and sa_cuda.fused_available(d)
        ),
    }


if __name__ == "__main__":
    for key, value in build_info().items():
        print(f"{key:>22}: {value}")
