"""Drop-in modules: the references' parameters, init and state_dict keys, fused forward/backward."""

from .shuffle_attention import SALayer, ShuffleAttention

__all__ = ["SALayer", "ShuffleAttention"]
