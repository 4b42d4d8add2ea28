"""Swap Shuffle Attention layers in an existing model for the fused modules, in place.

``convert(model)`` replaces a submodule only when it is sure that the fused module computes exactly
what the submodule computed, forward and backward. A module is replaced when ALL of these hold:

1. **Structure** (every module, registered or not): its parameters are exactly one variant's set,
   with the right shapes, m = gn.num_channels:

   - ``"sa_layer"`` (SA-Net's ``sa_layer``, External-Attention-pytorch's ``ShuffleAttention``):
     ``cweight``, ``cbias``, ``sweight``, ``sbias`` (1, m, 1, 1), ``gn.weight``, ``gn.bias`` (m,)
     -> ``sa_cuda.SALayer``;
   - ``"shuffle_attention"`` (1x1-conv gates): ``affine1``/``affine2`` =
     ``nn.Conv2d(m, m, 1)`` with bias (and stride 1, no padding, dilation 1, groups 1, zeros
     padding mode), ``gn.weight``, ``gn.bias`` -> ``sa_cuda.ShuffleAttention``;

   no buffers; submodules only ``gn`` (exactly ``nn.GroupNorm(m, m)`` with affine parameters), the
   variant's convs, and optionally ``avg_pool`` (exactly ``nn.AdaptiveAvgPool2d(1)``) and
   ``sigmoid`` (exactly ``nn.Sigmoid``), none of them with hooks or children of their own (the
   fused layer never calls its submodules, so their hooks would stop firing); a positive int groups
   attribute (``groups`` or ``G``; the registered name for registered classes), which gives
   C = 2 * m * groups; instance attributes only of plain types (int, float, str, bool, None,
   tuples of those), which the fused module keeps.
2. **Code**: the class that runs is the code that was checked. For a registered class (see
   ``register``; ``sa_cuda.reference.SALayer`` and ``ShuffleAttention`` are built in) the user
   vouches for the code; a subclass of it counts only if it overrides nothing that forward uses.
   An unregistered class must define ``forward`` in a direct subclass of ``nn.Module`` (a subclass
   of a published layer may compute anything, e.g. ``2 * sa(x) + x``), and no class between it and
   ``type(module)`` may override ``forward``, nn.Module's call machinery, or any ``self.<name>``
   that forward (or a method it calls) touches, found by parsing the source with ``ast``. The
   instance may not override those names in its ``__dict__`` either. An unregistered forward may
   read only the parameters, the submodules, the groups attribute and class-level methods or
   constants; it may not assign to ``self``, pass ``self`` on, call ``super()`` or declare
   ``global``/``nonlocal`` names (state or side effects the fused layer would not reproduce).
3. **Behaviour** (unregistered classes only): a probe runs the class's forward function on a
   float64 CPU copy of the module, without its hooks and with random parameters (the default init,
   cweight = sweight = 0, makes the gates constant and would hide e.g. a max-pool gate), on three
   random inputs of different shapes, and compares the output and every gradient (input and
   parameters) with ``sa_cuda.reference`` to 1e-10 relative. Any mismatch or exception: left alone.

Everything else is left alone, output unchanged to the bit; ``convert(model, report=True)`` says
which look-alikes were skipped and why, and ``reason_not_convertible(layer)`` tells for one layer.
Instances of the fused classes are left alone (converting twice replaces nothing). The model
itself is never replaced (use ``fuse``). Limits: the probe runs the forward once per shape on the
copy, so global module hooks see the copy's submodule calls, and a side effect outside the module
that does not change the result (e.g. appending to a global list) cannot be seen.

The fused module takes over the original's Parameter objects and submodules (an optimizer built
before the conversion keeps updating the same tensors; state_dict keys and their order, devices,
dtypes and requires_grad stay the same), its hook dicts (the same dict objects: every hook kind
keeps firing on the fused module and ``handle.remove()`` on an old handle still works; the
deprecated ``register_backward_hook`` sees the inputs of the fused op, x and the parameters, as
grad_input), its plain instance attributes (e.g. External-Attention's ``G`` and ``channel``) and
its training flag. A layer used at several places is replaced everywhere by one fused module.

Residual tails (``tails=True``, the default): once the layers are swapped, every module holding a
fused SA layer as a direct child (the model too) whose forward ends in ``relu(sa(t) + shortcut)``
gets a forward that runs the tail as the layer's residual epilogue, where
``sa_cuda.residual_tail`` proves it the same computation (its docstring says how); the others are
reported in ``ConvertReport.skipped_tails`` with the reason.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import modules, reference, residual_tail
from ._module_code import (
    CALL_MACHINERY,
    HOOK_DICTS,
    HOOK_STATE,
    MISSING,
    MODULE_STATE,
    Scan,
    Skip,
    require,
    scan_methods,
)
from .modules import SALayer, ShuffleAttention
from .ops.checks import is_positive_int
from .variants import SA_LAYER, SHUFFLE_ATTENTION, VARIANTS, Variant

__all__ = ["ConvertReport", "convert", "fuse", "reason_not_convertible", "register"]

_FUSED_CLASSES = (SALayer, ShuffleAttention)
_FOREIGN_GROUPS_ATTRS = ("groups", "G")  # SA-Net, External-Attention-pytorch
# What marks a look-alike: the layer's own gate parameters (SALayer's cweight, ...) or gate convs.
_OWN_PARAMS = tuple(p.state_key for v in VARIANTS for p in v.params if p.submodule is None)
_GATE_CONVS = tuple(conv for v in VARIANTS for conv in v.gate_convs)
_OPTIONAL_SUBMODULES = ("avg_pool", "sigmoid")
_PROBE_SHAPES = ((2, 3, 5), (1, 4, 4), (3, 1, 6))  # (B, H, W): batch 1, square and 1-row planes
_PROBE_RTOL = 1e-10


# ---- the two variants and the registry ---------------------------------------------------------


@dataclass(frozen=True)
class _Variant:
    """A layer of sa_cuda.variants with what convert needs of it."""

    spec: Variant
    fused_cls: type
    functional: Callable[..., Tensor]  # sa_cuda.reference's math over explicit parameters

    @property
    def param_names(self) -> tuple[str, ...]:
        """The state_dict keys, in the functional's argument order."""
        return self.spec.state_keys

    @property
    def gate_convs(self) -> tuple[str, ...]:
        return self.spec.gate_convs

    def param_shapes(self, m: int) -> dict[str, tuple[int, ...]]:
        return {p.state_key: p.module_shape(m) for p in self.spec.params}


_VARIANTS = {
    v.name: _Variant(v, getattr(modules, v.module_name), getattr(reference, v.name))
    for v in VARIANTS
}
_REGISTRY: dict[type, tuple[_Variant, str]] = {}


def register(cls: type, variant: str, groups_attr: str = "groups") -> type:
    """Declares that ``cls`` (an nn.Module subclass) computes Shuffle Attention ``variant``
    (``"sa_layer"``: the gate parameters cweight/cbias/sweight/sbias + gn; ``"shuffle_attention"``:
    1x1 convs affine1/affine2 + gn) with its group count in the attribute ``groups_attr``.
    Exported as ``sa_cuda.register_convertible``; returns ``cls``.

    You vouch for the class's code: ``convert`` then skips the behavioural probe for it (and for
    subclasses that override nothing its forward uses) but still checks every instance's
    structure (parameters, submodules, hooks, attributes)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"sa_cuda.convert.register: cls must be an nn.Module subclass, got {cls!r}")
    if variant not in _VARIANTS:
        raise ValueError(
            f"sa_cuda.convert.register: variant must be one of {sorted(_VARIANTS)}, got {variant!r}"
        )
    if not (isinstance(groups_attr, str) and groups_attr.isidentifier()):
        raise ValueError(
            f"sa_cuda.convert.register: groups_attr must be an attribute name, got {groups_attr!r}"
        )
    _REGISTRY[cls] = (_VARIANTS[variant], groups_attr)
    return cls


for _spec in VARIANTS:
    register(getattr(reference, _spec.module_name), _spec.name)


def _registered_base(cls: type) -> type | None:
    return next((base for base in cls.__mro__ if base in _REGISTRY), None)


# ---- public entry points -----------------------------------------------------------------------


@dataclass
class ConvertReport:
    """What ``convert(model, report=True)`` did. ``replaced``: (qualified name(s), class name) per
    distinct module replaced (a layer used at several places lists them, comma-separated).
    ``skipped``: (qualified name(s), class name, reason) per look-alike left alone: a module with
    a ``gn`` and SA parameters or affine1/affine2 convs, or of a registered class ("" = the model
    itself). ``int(report)`` and ``report.count``: the number of modules replaced.
    ``fused_tails``: (qualified name(s), class name) per block whose residual tail(s)
    ``relu(sa(x) + shortcut)`` now run as the fused layer's epilogue (sa_cuda.residual_tail);
    ``skipped_tails``: (qualified name(s), class name, reason) per block with a fused SA child whose
    tail is left as it was."""

    replaced: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    fused_tails: list[tuple[str, str]] = field(default_factory=list)
    skipped_tails: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.replaced)

    def __int__(self) -> int:
        return self.count


def convert(model: nn.Module, report: bool = False, tails: bool = True) -> int | ConvertReport:
    """Replaces, in place, every Shuffle Attention submodule of ``model`` that passes the checks of
    this module's docstring by its fused equivalent. Then, with ``tails`` (the default), rewrites
    the forward of every module (``model`` included) holding a fused SA layer whose output goes
    into ``relu(... + shortcut)`` so that the tail runs as the layer's residual epilogue, where
    ``sa_cuda.residual_tail`` proves it the same computation. Returns how many distinct modules
    were replaced, or with ``report=True`` a ``ConvertReport``. ``model`` itself is not replaced
    (use ``fuse``)."""
    if not isinstance(tails, bool):
        raise ValueError(f"sa_cuda.convert: tails must be a bool, got {tails!r}")
    result = ConvertReport()
    if _looks_like_shuffle_attention(model):
        why = reason_not_convertible(model) or (
            "the model itself cannot be replaced in place; use sa_cuda.fuse(model)"
        )
        result.skipped.append(("", type(model).__name__, why))
    for module, places in _places(model):
        if not _looks_like_shuffle_attention(module):
            continue
        where = ", ".join(place.name for place in places)
        try:
            plan = _plan(module)
        except Skip as skip:
            result.skipped.append((where, type(module).__name__, str(skip)))
            continue
        fused = _build_fused(module, plan)
        for place in places:
            setattr(place.parent, place.key, fused)
        result.replaced.append((where, type(module).__name__))
    if tails:
        _fuse_tails(model, result)
    return result if report else result.count


def _fuse_tails(model: nn.Module, result: ConvertReport) -> None:
    root = [(model, [_Place(model, "", "")])]
    for module, places in root + _places(model):
        where = ", ".join(place.name for place in places)
        try:
            if residual_tail.fuse_tails(module):
                result.fused_tails.append((where, type(module).__name__))
        except Skip as skip:
            result.skipped_tails.append((where, type(module).__name__, str(skip)))


def fuse(module: nn.Module) -> nn.Module | None:
    """The fused equivalent of one Shuffle Attention module (sharing its parameters, submodules,
    hooks and attributes), or None when ``module`` does not pass the checks of this module's
    docstring (``reason_not_convertible`` says why) or is fused already."""
    try:
        plan = _plan(module)
    except Skip:
        return None
    return _build_fused(module, plan)


def reason_not_convertible(module: nn.Module) -> str | None:
    """None when ``fuse(module)`` would replace ``module``, else the reason it is left alone."""
    try:
        _plan(module)
    except Skip as skip:
        return str(skip)
    return None


# ---- the decision ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    variant: _Variant
    m: int
    groups: int
    attributes: dict  # the original's plain instance attributes, for the fused module


def _looks_like_shuffle_attention(module: nn.Module) -> bool:
    if isinstance(module, _FUSED_CLASSES):
        return False
    if _registered_base(type(module)) is not None:
        return True
    return "gn" in module._modules and (
        any(n in module._parameters for n in _OWN_PARAMS)
        or any(n in module._modules for n in _GATE_CONVS)
    )


def _plan(module: nn.Module) -> _Plan:
    """Runs every check, cheapest first; raises Skip when the module must be left alone."""
    require(not isinstance(module, _FUSED_CLASSES), "already a fused sa_cuda module")
    registered = _registered_base(type(module))
    variant = _REGISTRY[registered][0] if registered is not None else _foreign_variant(module)
    m = _check_structure(module, variant)
    forward, scan = _check_code(module, registered)
    if registered is not None:
        groups_attr = _REGISTRY[registered][1]
    else:
        groups_attr = _foreign_groups_attr(module, scan)
    groups = getattr(module, groups_attr, None)
    require(is_positive_int(groups), f"{groups_attr} = {groups!r} is not a positive int")
    attributes = _carried_attributes(module, variant, groups)
    if registered is None:
        _check_reads(module, scan, groups_attr)
        _probe(module, forward, variant, m, groups)
    return _Plan(variant, m, groups, attributes)


def _foreign_variant(module: nn.Module) -> _Variant:
    has_convs = any(name in module._modules for name in _GATE_CONVS)
    return _VARIANTS[(SHUFFLE_ATTENTION if has_convs else SA_LAYER).name]


def _is_plain(value: object) -> bool:
    if isinstance(value, tuple):
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, (int, float, str))


def _type_name(value: object) -> str:
    return type(value).__name__ if value is not None else "None"


# ---- 1. structure ------------------------------------------------------------------------------


def _check_structure(module: nn.Module, variant: _Variant) -> int:
    """m = gn.num_channels, when the module has exactly the variant's parameters and submodules."""
    gn = module._modules.get("gn")
    require(type(gn) is nn.GroupNorm, f"gn is {_type_name(gn)}, not exactly nn.GroupNorm")
    m = gn.num_channels
    require(
        gn.num_groups == m and gn.affine,
        f"gn is GroupNorm({gn.num_groups}, {m}, affine={gn.affine}), not GroupNorm(m, m) with "
        f"affine parameters",
    )
    _check_submodules(module, variant, m)
    _check_parameters(module, variant, m)
    return m


def _check_submodules(module: nn.Module, variant: _Variant, m: int) -> None:
    extra = sorted(set(module._modules) - {"gn", *_OPTIONAL_SUBMODULES, *variant.gate_convs})
    require(not extra, f"extra submodule(s) {', '.join(extra)}")
    for name in variant.gate_convs:
        require(name in module._modules, f"no {name} submodule")
    for name, sub in module._modules.items():
        require(sub is not None, f"submodule {name} is None")
        require(not sub._modules, f"{name} has submodules of its own")
        hooked = [kind for kind in HOOK_DICTS if getattr(sub, kind)]
        require(
            not hooked,
            f"{name} has hooks ({', '.join(hooked)}); the fused layer does not call its submodules",
        )
    for name in variant.gate_convs:
        conv = module._modules[name]
        require(type(conv) is nn.Conv2d, f"{name} is {_type_name(conv)}, not exactly nn.Conv2d")
        config = (
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
        )
        require(
            config == (m, m, (1, 1), (1, 1), (0, 0), (1, 1), 1, True, "zeros"),
            f"{name} is {conv!r}, not Conv2d({m}, {m}, kernel_size=1) with bias",
        )
    pool = module._modules.get("avg_pool", MISSING)
    require(
        pool is MISSING or (type(pool) is nn.AdaptiveAvgPool2d and pool.output_size in (1, (1, 1))),
        f"avg_pool is {pool!r}, not nn.AdaptiveAvgPool2d(1)",
    )
    sigmoid = module._modules.get("sigmoid", MISSING)
    require(
        sigmoid is MISSING or type(sigmoid) is nn.Sigmoid,
        f"sigmoid is {_type_name(sigmoid)}, not exactly nn.Sigmoid",
    )


def _check_parameters(module: nn.Module, variant: _Variant, m: int) -> None:
    owners = [("", module)] + [(f"{name}.", sub) for name, sub in module._modules.items()]
    found = {prefix + key: p for prefix, owner in owners for key, p in owner._parameters.items()}
    extra = sorted(set(found) - set(variant.param_names))
    missing = sorted(set(variant.param_names) - set(found))
    require(not extra, f"extra parameter(s) {', '.join(extra)}")
    require(not missing, f"missing parameter(s) {', '.join(missing)}")
    for name, shape in variant.param_shapes(m).items():
        param = found[name]
        require(isinstance(param, nn.Parameter), f"{name} is {_type_name(param)}, not a Parameter")
        require(tuple(param.shape) == shape, f"{name} has shape {tuple(param.shape)}, not {shape}")
    buffers = [prefix + key for prefix, owner in owners for key in owner._buffers]
    require(not buffers, f"buffer(s) {', '.join(buffers)}, which the fused layer would not use")


def _carried_attributes(module: nn.Module, variant: _Variant, groups: int) -> dict:
    """The original's own instance attributes (plain values only) for the fused module; none may
    hide something the fused layer has (its fallback path runs the reference code on it)."""
    fused_cls, carried = variant.fused_cls, {}
    for name, value in vars(module).items():
        if name in MODULE_STATE:
            continue
        require(
            _is_plain(value),
            f"instance attribute {name!r} holds a {_type_name(value)}; "
            f"only plain values are carried over",
        )
        if name == "groups":  # the fused module's own attribute: it must say the same
            require(
                value == groups, f"groups = {value!r}, but the layer computes with {groups} groups"
            )
            continue
        same_on_class = inspect.getattr_static(fused_cls, name, MISSING) is inspect.getattr_static(
            type(module), name, MISSING
        )
        require(
            same_on_class and name not in _fused_instance_names(fused_cls),
            f"instance attribute {name!r} would hide the fused layer's {name}",
        )
        carried[name] = value
    return carried


@functools.cache
def _fused_instance_names(fused_cls: type) -> frozenset:
    with torch.device("meta"):
        template = fused_cls(2, 1)
    return frozenset(
        {*vars(template), *template._parameters, *template._modules, *template._buffers}
    )


# ---- 2. code -----------------------------------------------------------------------------------


def _check_code(module: nn.Module, registered: type | None) -> tuple[Callable, Scan]:
    """(the forward function, what it touches on self), when the module's class runs the code
    that was vouched for (registered) or will be probed (foreign)."""
    cls = type(module)
    owner = registered if registered is not None else _foreign_forward_owner(cls)
    scan = scan_methods(owner, allow_missing_source=registered is cls)
    for name in sorted({"forward", *CALL_MACHINERY, *scan.names}):
        on_class = inspect.getattr_static(cls, name, MISSING)
        require(
            on_class is inspect.getattr_static(owner, name, MISSING),
            f"{cls.__name__} overrides {name!r} of {owner.__name__}",
        )
        if name in vars(module):
            slot = name in module._parameters or name in module._modules or name in module._buffers
            require(
                not (
                    slot
                    or name == "forward"
                    or name in CALL_MACHINERY
                    or (on_class is not MISSING and not _is_plain(on_class))
                ),
                f"the instance overrides {name!r} in its __dict__",
            )
    forward = inspect.getattr_static(cls, "forward")
    require(
        registered is not None or isinstance(forward, types.FunctionType),
        f"{cls.__name__}.forward is a {_type_name(forward)}, not a plain function",
    )
    return forward, scan


def _foreign_forward_owner(cls: type) -> type:
    """The class that defines forward, when it is a direct nn.Module subclass that keeps
    nn.Module's call machinery."""
    owner = next(klass for klass in cls.__mro__ if "forward" in vars(klass))
    require(owner is not nn.Module, f"{cls.__name__} has no forward")
    require(
        owner.__bases__ == (nn.Module,),
        f"forward is defined by {owner.__name__}, a subclass of "
        f"{', '.join(base.__name__ for base in owner.__bases__)} (not a registered class), "
        f"which may change what the layer computes",
    )
    for name in CALL_MACHINERY:
        require(
            inspect.getattr_static(owner, name) is inspect.getattr_static(nn.Module, name),
            f"{owner.__name__} overrides nn.Module.{name}",
        )
    return owner


def _foreign_groups_attr(module: nn.Module, scan: Scan) -> str:
    """groups or G, preferring the one forward reads (the probe confirms the choice)."""
    read = [name for name in _FOREIGN_GROUPS_ATTRS if name in scan.names]
    for name in read or _FOREIGN_GROUPS_ATTRS:
        if is_positive_int(getattr(module, name, None)):
            return name
    raise Skip("no positive int groups attribute (groups or G)")


def _check_reads(module: nn.Module, scan: Scan, groups_attr: str) -> None:
    """An unregistered forward may read only what the fused layer uses too: the parameters, the
    submodules, the groups attribute, and class-level methods or constants."""
    require(not scan.problems, scan.problems[0] if scan.problems else "")
    cls = type(module)
    for name in sorted(scan.names):
        require(
            name not in scan.assigned,
            f"forward assigns self.{name} (state the fused layer would not keep)",
        )
        if name == groups_attr or name in module._parameters or name in module._modules:
            continue
        require(
            name not in vars(module),
            f"forward reads self.{name}, an instance attribute the fused layer ignores",
        )
        attr = inspect.getattr_static(cls, name, MISSING)
        require(
            attr is not MISSING, f"forward reads self.{name}, which {cls.__name__} does not have"
        )
        is_method = isinstance(attr, (types.FunctionType, staticmethod, classmethod))
        require(
            is_method or _is_plain(attr),
            f"forward reads self.{name}, a {_type_name(attr)} whose value may depend on state",
        )


# ---- 3. behaviour ------------------------------------------------------------------------------


def _probe(module: nn.Module, forward: Callable, variant: _Variant, m: int, groups: int) -> None:
    """Compares forward(copy, x), output and gradients, with the reference math on random
    parameters and inputs; raises Skip on any difference or exception."""
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            generator = torch.Generator().manual_seed(0)
            twin = _probe_twin(module, generator)
            for batch, height, width in _PROBE_SHAPES:
                x = torch.randn(
                    (batch, 2 * m * groups, height, width),
                    generator=generator,
                    dtype=torch.float64,
                    requires_grad=True,
                )
                _compare_with_reference(twin, forward, variant, groups, x, generator)
    except Skip:
        raise
    except Exception as error:  # whatever the forward raises means: not Shuffle Attention
        raise Skip(
            f"the probe (forward on a float64 CPU copy) raised {type(error).__name__}: {error}"
        ) from None


def _probe_twin(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """A float64 CPU copy of module without hooks (none fires, no hook owner is copied), with
    random parameters that require grad."""
    no_hooks = {
        id(getattr(sub, kind)): OrderedDict() for sub in module.modules() for kind in HOOK_DICTS
    }
    twin = copy.deepcopy(module, no_hooks).to_empty(device="cpu").to(torch.float64)
    with torch.no_grad():
        for param in twin.parameters():
            is_matrix = param.dim() == 4 and param.shape[0] > 1  # a 1x1 conv weight (m, m, 1, 1)
            std = 1.5 / math.sqrt(param.shape[1]) if is_matrix else 0.75  # gates not saturated
            param.normal_(0.0, std, generator=generator)
            param.requires_grad_(True)
    return twin


def _compare_with_reference(
    twin: nn.Module,
    forward: Callable,
    variant: _Variant,
    groups: int,
    x: Tensor,
    generator: torch.Generator,
) -> None:
    named = dict(twin.named_parameters())
    params = [named[name] for name in variant.param_names]
    where = f"on a {list(x.shape)} probe"
    got = forward(twin, x)  # the function itself: no __call__, so no hook of the module fires
    want = variant.functional(x, groups, *params, eps=twin.gn.eps)
    require(
        isinstance(got, Tensor) and got.shape == want.shape and got.dtype == want.dtype,
        f"forward returns {_type_name(got)} {list(getattr(got, 'shape', []))} {where}, not a "
        f"float64 tensor {list(want.shape)}",
    )
    grad_out = torch.randn(want.shape, generator=generator, dtype=want.dtype)
    inputs = [x, *params]
    got_grads = (
        torch.autograd.grad(got, inputs, grad_out, allow_unused=True)
        if got.requires_grad
        else [None] * len(inputs)
    )
    want_grads = torch.autograd.grad(want, inputs, grad_out)
    labels = ["output", "gradient of x", *(f"gradient of {name}" for name in variant.param_names)]
    for label, value, expected in zip(labels, [got, *got_grads], [want, *want_grads]):
        require(value is not None, f"forward gives no {label} {where}")
        error = (value.detach() - expected).abs().max().item()
        scale = max(1.0, expected.abs().max().item())
        require(
            error <= _PROBE_RTOL * scale,  # also False for NaN
            f"{label} differs from Shuffle Attention's by {error:.3g} {where}",
        )


# ---- the replacement ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Place:
    parent: nn.Module
    key: str
    name: str  # qualified name


def _places(model: nn.Module) -> list[tuple[nn.Module, list[_Place]]]:
    """Every distinct submodule of model, in module order, with every place it occupies (a layer
    used twice, even in the same parent, has two places)."""
    by_name = dict(model.named_modules(remove_duplicate=False))  # a shared module has several names
    found: dict[int, tuple[nn.Module, list[_Place]]] = {}
    for name, module in by_name.items():
        if name:
            parent_name, _, key = name.rpartition(".")
            place = _Place(by_name[parent_name], key, name)
            found.setdefault(id(module), (module, []))[1].append(place)
    return list(found.values())


def _build_fused(module: nn.Module, plan: _Plan) -> nn.Module:
    with torch.device("meta"):  # no memory and no RNG draws: its parameters are replaced below
        fused = plan.variant.fused_cls(2 * plan.m * plan.groups, plan.groups)
    own_submodules = dict(fused._modules)
    for name, param in module._parameters.items():
        setattr(fused, name, param)
    for name, sub in module._modules.items():
        setattr(fused, name, sub)
    _order_like(fused._parameters, list(module._parameters))  # state_dict keys in the same order
    _order_like(fused._modules, list(module._modules))
    for name, sub in own_submodules.items():
        if fused._modules[name] is sub:  # avg_pool / sigmoid the original did not have
            sub.training = module.training
    fused.training = module.training  # not train(): that would also set the taken-over gn's flag
    for name, value in plan.attributes.items():
        setattr(fused, name, value)
    _take_over_hooks(module, fused)
    return fused


def _order_like(entries: dict, order: list) -> None:
    for key in [*order, *(key for key in list(entries) if key not in order)]:
        entries[key] = entries.pop(key)


def _take_over_hooks(module: nn.Module, fused: nn.Module) -> None:
    """The fused module uses the original's hook dicts themselves, so hooks fire on it and an
    old RemovableHandle still removes them; ``_is_full_backward_hook`` says how _backward_hooks
    are run (full or deprecated)."""
    for name in HOOK_STATE:
        fused.__dict__[name] = getattr(module, name)
    for hook in fused._load_state_dict_pre_hooks.values():
        # register_load_state_dict_pre_hook keeps a weak reference to the module it passes to the
        # hook: point it at the fused module (the original may now be garbage collected).
        bound = getattr(hook, "module", None)
        with_module = getattr(hook, "with_module", False)
        if with_module and isinstance(bound, weakref.ref) and bound() is module:
            hook.module = weakref.ref(fused)
