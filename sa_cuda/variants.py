"""The two Shuffle Attention layers, described once for the ops, the modules and convert.

- ``sa_layer`` / ``SALayer``: the layer of SA-Net's code release (github.com/wofmanaf/SA-Net).
  Its gates are per-channel parameters cweight, cbias, sweight, sbias, each (1, m, 1, 1).
- ``shuffle_attention`` / ``ShuffleAttention``: the same layer with 1x1-conv gates ``affine1`` and
  ``affine2`` (``nn.Conv2d(m, m, 1)``, weight (m, m, 1, 1) and bias (m,)).

Both normalise the spatial branch with ``gn = nn.GroupNorm(m, m)`` (weight and bias (m,)); m is
C / (2 * groups), the channels of one branch of one group. Every layer has six parameters, in this
order: channel-gate weight and bias, spatial-gate weight and bias, GroupNorm weight and bias.

The parameter names are the registered ops' argument names (csrc/ops.h, SA_DEFINE_OPS), read from
the op schemas here so that Python does not spell them a second time. The module's state_dict key
of a parameter is its argument name with the first "_" read as the submodule separator
(``gn_weight`` -> ``gn.weight``, ``affine1_bias`` -> ``affine1.bias``, ``cweight`` stays).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import _C  # noqa: F401  (registers the ops whose schemas name the parameters)

__all__ = ["Param", "Variant", "SA_LAYER", "SHUFFLE_ATTENTION", "VARIANTS", "variant"]


@dataclass(frozen=True)
class Param:
    """One parameter of a layer."""

    name: str  # the op's and the functional's argument name, e.g. "gn_weight"
    is_matrix: bool  # an (m, m) matrix (a 1x1-conv weight); otherwise it holds m values

    @property
    def state_key(self) -> str:
        """The module's state_dict key, e.g. "gn.weight"."""
        return self.name.replace("_", ".", 1)

    @property
    def submodule(self) -> str | None:
        """The submodule that holds the parameter ("gn", "affine1"), None for the layer's own."""
        owner, dot, _ = self.state_key.partition(".")
        return owner if dot else None

    def module_shape(self, m: int) -> tuple[int, ...]:
        """The parameter's shape in the module (the functionals also take (m,) / (m, m))."""
        if self.is_matrix:
            return (m, m, 1, 1)
        return (m,) if self.submodule else (1, m, 1, 1)


@dataclass(frozen=True)
class Variant:
    """One layer: its name (the functional and the op prefix), its module class name and its six
    parameters in op order."""

    name: str
    module_name: str
    params: tuple[Param, ...]

    # Derived once, the modules read them on every call. Plain attributes and not cached_property:
    # Dynamo cannot trace a cached_property's first read (Python 3.11's takes an RLock), and a
    # compiled module's first call may be the first read (tests/ops/test_compile.py).
    #: The op's argument names, in op order.
    param_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    #: The module's state_dict keys, in op order.
    state_keys: tuple[str, ...] = field(init=False, repr=False, compare=False)
    #: (submodule or None, attribute name) of each parameter: ("gn", "weight").
    param_paths: tuple[tuple[str | None, str], ...] = field(init=False, repr=False, compare=False)
    #: The 1x1-conv submodules of the gates (none for SALayer).
    gate_convs: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        derived = {
            "param_names": tuple(p.name for p in self.params),
            "state_keys": tuple(p.state_key for p in self.params),
            "param_paths": tuple(
                (p.submodule, p.state_key.rpartition(".")[2]) for p in self.params
            ),
            "gate_convs": tuple(p.submodule for p in self.params if p.is_matrix),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # the frozen dataclass's own way to set them

    @property
    def forward_op_name(self) -> str:
        return f"{self.name}_forward"

    @property
    def backward_op_name(self) -> str:
        return f"{self.name}_backward"

    @property
    def residual_forward_op_name(self) -> str:
        return f"{self.name}_residual_forward"

    @property
    def residual_backward_op_name(self) -> str:
        return f"{self.name}_residual_backward"


def _variant(name: str, module_name: str, conv_gates: bool) -> Variant:
    """The parameters are the forward op's arguments between ``groups`` and ``eps``; with 1x1-conv
    gates the two gate weights (the first and third parameters) are (m, m) matrices."""
    schema = getattr(torch.ops.sa_cuda, f"{name}_forward").default._schema
    names = [argument.name for argument in schema.arguments][2:-1]
    return Variant(
        name, module_name, tuple(Param(n, conv_gates and i in (0, 2)) for i, n in enumerate(names))
    )


SA_LAYER = _variant("sa_layer", "SALayer", conv_gates=False)
SHUFFLE_ATTENTION = _variant("shuffle_attention", "ShuffleAttention", conv_gates=True)
VARIANTS = (SA_LAYER, SHUFFLE_ATTENTION)
_BY_NAME = {v.name: v for v in VARIANTS}


def variant(name: str) -> Variant:
    """The Variant called ``name`` ("sa_layer" or "shuffle_attention"); ValueError otherwise."""
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(f"variant must be one of {sorted(_BY_NAME)}, got {name!r}")
    return _BY_NAME[name]
