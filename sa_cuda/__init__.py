"""sa_cuda: fused Shuffle Attention (SA-Net, Zhang & Yang, ICASSP 2021) for PyTorch.

Two layers (``sa_cuda.variants`` describes both: names, parameters, state_dict keys):
SALayer (``sa_layer``, the layer of SA-Net's code release, per-channel gate parameters) and
ShuffleAttention (``shuffle_attention``, the same layer with 1x1-conv gates).

- ``sa_cuda.SALayer`` / ``sa_cuda.ShuffleAttention``: drop-in fused modules.
- ``sa_cuda.sa_layer`` / ``sa_cuda.shuffle_attention``: functionals over explicit parameters.
- ``sa_cuda.reference``: the pure-PyTorch layers, the ground truth.
- ``sa_cuda.timm_attn``: the SA layer as timm's ``attn_layer`` (sa_cuda.integrations).
- ``torch.ops.sa_cuda.*``: the registered ops (see sa_cuda.ops).
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import (
    _C,  # noqa: F401  (loads the library that registers the ops)
    models,
    reference,
    variants,
)
from ._version import __version__
from .convert import ConvertReport, convert, fuse, reason_not_convertible
from .convert import register as register_convertible
from .integrations import timm_attn
from .modules import SALayer, ShuffleAttention
from .ops import (
    ShuffleAttentionFunction,
    ShuffleAttentionResidualFunction,
    fused_available,
    sa_layer,
    shuffle_attention,
)

__all__ = [
    "ConvertReport",
    "SALayer",
    "ShuffleAttention",
    "ShuffleAttentionFunction",
    "ShuffleAttentionResidualFunction",
    "convert",
    "fuse",
    "fused_available",
    "models",
    "reason_not_convertible",
    "reference",
    "register_convertible",
    "sa_layer",
    "shuffle_attention",
    "timm_attn",
    "variants",
    "__version__",
]
