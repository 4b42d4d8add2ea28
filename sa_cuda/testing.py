"""Accuracy criteria of sa_cuda, shared by the test suite (tests/) and the benchmarks (benchmarks/).

A fused result (output or gradient) is compared with the float64 reference (sa_cuda.reference run
in float64 on the same inputs and parameter values) and with eager PyTorch in the fused result's
own dtype (the error the framework itself makes in that dtype).
"""

from __future__ import annotations

import torch

# fp32 check: max|fused - ref64| <= FP32_REL * max(1, max|ref64|) (or 2x the eager fp32 error,
# for ill-conditioned cases where even eager misses by more)
FP32_REL = 1e-4


def accuracy_bound(dtype: torch.dtype, max_abs_ref: float, err_eager: float | None) -> float:
    """The largest max|fused - ref64| accepted for a tensor of ``dtype`` whose float64 reference
    has max|ref64| = ``max_abs_ref``, given eager's error in the same dtype (None: no eager).

    fp32 (and fp64): max(rel * max(1, max|ref64|), 2 * err_eager), rel = FP32_REL (fp64: 1e-10).
    bf16/fp16 (flash-attention criterion, DESIGN.md section 5):
    2 * err_eager + eps(dtype) * max|ref64| + 1e-10 (2 * eps * max|ref64| without eager).
    """
    if dtype in (torch.float32, torch.float64):
        rel = FP32_REL if dtype == torch.float32 else 1e-10
        bound = rel * max(1.0, max_abs_ref)
        return bound if err_eager is None else max(bound, 2.0 * err_eager)
    eps = torch.finfo(dtype).eps
    if err_eager is None:
        return 2.0 * eps * max_abs_ref + 1e-10
    return 2.0 * err_eager + eps * max_abs_ref + 1e-10
