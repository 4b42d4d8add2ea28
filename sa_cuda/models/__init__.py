"""Networks built on the SA layer: SA-ResNet-50/101/152 with the layout of SA-Net's code release.

``fused=True`` puts ``sa_cuda.SALayer`` (fused kernels) in every bottleneck, ``fused=False`` the
pure-PyTorch ``sa_cuda.reference.SALayer``; the parameter names are identical, so state_dicts load
strictly into either, and the release's checkpoints load into both (see
``convert_official_state_dict``).
"""

from .sa_resnet import (
    SABottleneck,
    SAResNet,
    convert_official_state_dict,
    sa_resnet50,
    sa_resnet101,
    sa_resnet152,
)

__all__ = [
    "SABottleneck",
    "SAResNet",
    "convert_official_state_dict",
    "sa_resnet50",
    "sa_resnet101",
    "sa_resnet152",
]
