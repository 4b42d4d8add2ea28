"""Fused ops (kernels + autograd); the modules in sa_cuda.modules stand on these.

- ``sa_layer`` / ``shuffle_attention``: the functionals (shuffle_attention.py).
- ``OpLibrary`` / ``register_library``: the eight ops of one op namespace with their fake kernels,
  vmap rules and autograd (library.py); ``SA_CUDA_LIBRARY`` is the one of sa_cuda._C.
- ``KERNEL_DTYPES`` and the argument checks the fake kernels share with the functionals
  (checks.py).
"""

from .checks import KERNEL_DTYPES
from .library import OpLibrary, register_library
from .shuffle_attention import (
    SA_CUDA_LIBRARY,
    ShuffleAttentionFunction,
    ShuffleAttentionResidualFunction,
    fused_available,
    sa_layer,
    shuffle_attention,
)

__all__ = [
    "KERNEL_DTYPES",
    "OpLibrary",
    "SA_CUDA_LIBRARY",
    "ShuffleAttentionFunction",
    "ShuffleAttentionResidualFunction",
    "fused_available",
    "register_library",
    "sa_layer",
    "shuffle_attention",
]
