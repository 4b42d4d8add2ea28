"""Fused ops (kernels + autograd); the modules in sa_cuda.modules stand on these."""

from .shuffle_attention import ShuffleAttentionFunction, fused_available, sa_layer, shuffle_attention

__all__ = ["ShuffleAttentionFunction", "fused_available", "sa_layer", "shuffle_attention"]
