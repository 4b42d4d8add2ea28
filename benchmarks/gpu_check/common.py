"""Shared by the GPU check's Python helpers: import paths, the two kernel backends, the JSON writer.

The helpers reuse the benchmark harness (the package benchmarks: shapes, modules, inputs, timers,
the correctness check), the accuracy criterion (sa_cuda.testing) and the test suite's fixtures
(tests/conftest.py: randomised parameters, parameter order of the ops; tests/emulation.py: the
emulation build), so the repository root and tests/ go on sys.path here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
for folder in (ROOT, ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import sa_cuda  # noqa: E402  (registers torch.ops.sa_cuda)
from benchmarks import configs  # noqa: E402

DTYPES = configs.DTYPES
VARIANTS = tuple(configs.VARIANTS)

# Where the kernels under test run: "cuda" = the compiled CUDA kernels on the GPU (torch.ops.sa_cuda
# on CUDA tensors); "emulated" = the same kernel source run by the SIMT emulator on CPU tensors
# (torch.ops.sa_cuda_emu, built by tests/emulation.py), how the CPU mode exercises this code.
BACKENDS = ("cuda", "emulated")


def backend_ops(backend: str):
    """(ops namespace, device) of a backend."""
    if backend == "cuda":
        if not (torch.cuda.is_available() and sa_cuda.fused_available("cuda")):
            raise SystemExit(
                "backend cuda: no CUDA device, or sa_cuda was built without CUDA kernels"
            )
        return torch.ops.sa_cuda, torch.device("cuda")
    if backend == "emulated":
        from emulation import load_emulation

        return load_emulation(), torch.device("cpu")
    raise SystemExit(f"unknown backend {backend!r}; choose from {BACKENDS}")


def caching_allocator_active(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "0") != "1"


def write_json(path: str | os.PathLike | None, data: dict) -> None:
    """Writes atomically (a reader, or a step killed by its time box, never sees half a file)."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
