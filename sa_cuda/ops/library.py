"""One library of the fused ops: the eight ops of one op namespace (forward and backward of both
variants, plain and with the residual epilogue), with their fake kernels, vmap rules and autograd,
and the path every functional call takes through them.

Two namespaces hold the same eight op schemas (csrc/ops.h): ``sa_cuda`` (the CPU and CUDA kernels,
sa_cuda._C) and ``sa_cuda_emu`` (the CUDA kernels run on CPU tensors by the SIMT emulator, built
only by the tests: tests/emulation.py). ``register_library(namespace)`` equips one namespace and
returns its ``OpLibrary``; sa_cuda.ops does it for ``sa_cuda`` at import, tests/emulation.py for
``sa_cuda_emu`` after loading the emulation build. Everything above the ops (the functionals'
``library=`` keyword, ``OpLibrary.apply``, the modules) is then one code path for both. (The
emulated kernels cannot sit behind the sa_cuda ops themselves: they take CPU tensors, and the CPU
dispatch key of the sa_cuda ops belongs to the CPU kernels.)

Why the autograd is a torch.autograd.Function per library and not ``torch.library.
register_autograd`` on the forward op: torch.func (grad, vjp, vmap of grad) cannot transform a
C++-defined op's registered autograd (it needs an autograd.Function with ``setup_context``), and
the fused layer must work under torch.func. Each library therefore builds its own
autograd.Function class over its own ops; ``sa_cuda.ShuffleAttentionFunction`` is the one of
``sa_cuda``. The variant travels through it as its name, a constant for torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..variants import SA_LAYER, VARIANTS, Variant
from ..variants import variant as variant_named
from . import vmap as _vmap
from .checks import check_backward_args, check_forward_args, stat_dtype

__all__ = ["OpLibrary", "layout_of", "register_library"]

# Dispatch key names are not always the upper-cased device type ("meta" -> "Meta").
_DISPATCH_KEYS = {"meta": "Meta", "privateuseone": "PrivateUse1"}


class _NoSecondDerivative(torch.autograd.Function):
    """The identity on the gradients of the fused backward, hung on the graph of x and the
    parameters when a backward runs with create_graph=True: differentiating those gradients again
    (a gradient penalty, grad of grad) reaches this node and raises, instead of silently giving a
    second derivative without the kernel's part. First-order uses of create_graph=True (which
    torch.func.grad makes) are unaffected."""

    generate_vmap_rule = True

    @staticmethod
    def forward(n_grads: int, *grads_then_inputs: Tensor):
        return tuple(g.clone() for g in grads_then_inputs[:n_grads])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "sa_cuda: double backward (differentiating a gradient) through the fused Shuffle "
            "Attention op is not supported: its backward is a fused kernel. Use the "
            "sa_cuda.reference layers for higher-order gradients"
        )


def _guard_second_derivative(grads: list, tensors: tuple) -> list:
    """With create_graph=True: the gradients, routed through _NoSecondDerivative (hung on the
    graph of the differentiable ``tensors``)."""
    inputs = [t for t in tensors if t.requires_grad]
    kept = [g for g in grads if g is not None]
    if not (inputs and kept):
        return grads
    wrapped = iter(_NoSecondDerivative.apply(len(kept), *kept, *inputs))
    return [None if g is None else next(wrapped) for g in grads]


def _without_grad(op, *args):
    """``op(*args)`` with grad mode off. A backward runs with it off already unless
    create_graph=True, so ``torch.no_grad()`` is entered only then: its enter and exit are Python
    calls that a training step pays for every layer, with cold caches
    (docs/kernels.md#python-per-call)."""
    if not torch.is_grad_enabled():
        return op(*args)
    with torch.no_grad():
        return op(*args)


def _autograd_function(forward_ops: dict, backward_ops: dict) -> type[torch.autograd.Function]:
    """The autograd.Function over one library's ops (keyed by variant name)."""

    class ShuffleAttentionFunction(torch.autograd.Function):
        """Autograd over the fused ops: saves x and the per-plane mean/rstd, nothing else.

        ``apply(variant, x, groups, eps, *params) -> (out, mean, rstd)`` with variant "sa_layer" or
        "shuffle_attention"; mean and rstd are not differentiable. Works under torch.func
        (``vmap``, ``grad``, ``vjp``, their compositions): the vmap rules of the ops
        (sa_cuda/ops/vmap.py) fold a mapped x into the batch. The backward is a fused kernel and
        is not itself differentiable: first-order gradients work with create_graph=True, and
        differentiating them again raises.
        """

        generate_vmap_rule = True

        @staticmethod
        def forward(variant: str, x: Tensor, groups: int, eps: float, *params: Tensor):
            return forward_ops[variant](x, groups, *params, eps)

        @staticmethod
        def setup_context(ctx, inputs, output):
            variant, x, groups, _, *params = inputs
            _, mean, rstd = output
            ctx.mark_non_differentiable(mean, rstd)
            ctx.save_for_backward(x, mean, rstd, *params)
            ctx.variant, ctx.groups = variant, groups

        @staticmethod
        def backward(ctx, grad_out: Tensor, _grad_mean, _grad_rstd):
            create_graph = torch.is_grad_enabled()
            x, mean, rstd, *params = ctx.saved_tensors
            op = backward_ops[ctx.variant]
            grad_x, *param_grads = _without_grad(op, grad_out, x, mean, rstd, ctx.groups, *params)
            needs = ctx.needs_input_grad
            grads = [grad_x if needs[1] else None] + [
                g if needs[4 + i] else None for i, g in enumerate(param_grads)
            ]
            if create_graph:
                grads = _guard_second_derivative(grads, (x, *params))
            return (None, grads[0], None, None, *grads[1:])

    return ShuffleAttentionFunction


def _residual_autograd_function(
    forward_ops: dict, backward_ops: dict
) -> type[torch.autograd.Function]:
    """The autograd.Function over one library's residual ops (keyed by variant name)."""

    class ShuffleAttentionResidualFunction(torch.autograd.Function):
        """Autograd over the fused residual ops, out = relu(SA(x) + identity): saves x, out (relu's
        mask; the next block's input, kept anyway) and the per-plane mean/rstd: what SA and relu
        save apart. Not identity: a downsampling block's shortcut would then stay alive too (11.7
        MiB more saved in an SA-ResNet-50 training step at batch 8, 112x112).

        ``apply(variant, x, identity, groups, eps, *params) -> (out, mean, rstd)``; mean and rstd
        are not differentiable. torch.func and create_graph=True as ShuffleAttentionFunction.
        """

        generate_vmap_rule = True

        @staticmethod
        def forward(variant: str, x: Tensor, identity: Tensor, groups: int, eps: float, *params):
            return forward_ops[variant](x, identity, groups, *params, eps)

        @staticmethod
        def setup_context(ctx, inputs, output):
            variant, x, _identity, groups, _, *params = inputs
            out, mean, rstd = output
            ctx.mark_non_differentiable(mean, rstd)
            ctx.save_for_backward(x, out, mean, rstd, *params)
            ctx.variant, ctx.groups = variant, groups

        @staticmethod
        def backward(ctx, grad_out: Tensor, _grad_mean, _grad_rstd):
            create_graph = torch.is_grad_enabled()
            x, out, mean, rstd, *params = ctx.saved_tensors
            op = backward_ops[ctx.variant]
            grad_x, grad_identity, *param_grads = _without_grad(
                op, grad_out, out, x, mean, rstd, ctx.groups, *params
            )
            needs = ctx.needs_input_grad
            grads = [grad_x if needs[1] else None, grad_identity if needs[2] else None] + [
                g if needs[5 + i] else None for i, g in enumerate(param_grads)
            ]
            if create_graph:
                # identity's own second derivatives are 0 (relu's mask is piecewise constant);
                # the guard hangs every gradient, grad_identity too, on x's and the parameters'.
                grads = _guard_second_derivative(grads, (x, *params))
            return (None, grads[0], grads[1], None, None, *grads[2:])

    return ShuffleAttentionResidualFunction


def _combined_forward(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """``function`` with its forward and setup_context run as one ``forward(ctx, *inputs)``, the
    same backward, and the same name. Outside torch.func transforms the two are the same
    Function, but torch (2.11-2.14) binds the arguments of a Function that defines setup_context
    with ``inspect.signature`` on every ``apply``: about 25 us a call of the 36 us this one's took
    (a tiny input, one thread), paid by every training step's every SA layer. torch.func needs the
    setup_context form, so ``OpLibrary.apply`` takes this one only where no functorch transform is
    active and nothing traces (torch.compile, torch.jit.trace: the public Function, as before)."""
    forward, setup_context = function.forward, function.setup_context

    def combined(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    members = {"forward": staticmethod(combined), "backward": staticmethod(function.backward)}
    members["__doc__"] = function.__doc__
    return type(function.__name__, (torch.autograd.Function,), members)


def layout_of(x: Tensor) -> torch.memory_format:
    """The memory format of the ops' out and grad_x for an x (csrc/host.cpp, is_channels_last):
    channels_last when x is channels_last-contiguous and not also NCHW-contiguous (C = 1 or
    H = W = 1, where both are the same bytes); NCHW-contiguous for every other x."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def _fake_kernels(variant: Variant):
    """(forward, backward, residual forward, residual backward) fake kernels: the argument checks,
    then outputs of the real shapes."""

    def fake_forward(x, groups, *params_and_eps):
        *params, eps = params_and_eps
        check_forward_args(variant, x, groups, tuple(params), eps)
        return _fake_forward_outputs(x)

    def fake_backward(grad_out, x, mean, rstd, groups, *params):
        check_backward_args(variant, grad_out, x, mean, rstd, groups, params)
        return _fake_grads(x, params)

    def fake_residual_forward(x, identity, groups, *params_and_eps):
        *params, eps = params_and_eps
        check_forward_args(variant, x, groups, tuple(params), eps, identity=identity)
        return _fake_forward_outputs(x)

    def fake_residual_backward(grad_out, out, x, mean, rstd, groups, *params):
        check_backward_args(variant, grad_out, x, mean, rstd, groups, params, out=out)
        grad_x, *param_grads = _fake_grads(x, params)
        return (grad_x, torch.empty_like(x, memory_format=layout_of(x)), *param_grads)

    return fake_forward, fake_backward, fake_residual_forward, fake_residual_backward


def _fake_forward_outputs(x) -> tuple:
    """(out, mean, rstd) as the real forward returns them: out in x's layout (layout_of), the
    [B, C] statistics in stat_dtype."""
    stat = x.new_empty((x.shape[0], x.shape[1]), dtype=stat_dtype(x))
    return torch.empty_like(x, memory_format=layout_of(x)), stat, torch.empty_like(stat)


def _fake_grads(x, params) -> tuple:
    """grad_x and the parameter gradients as the real backward returns them: every gradient
    contiguous (also for a non-contiguous parameter, e.g. a transposed (m, m) weight; plain
    empty_like(p) would keep p's strides and mislead Inductor)."""
    return (
        torch.empty_like(x, memory_format=layout_of(x)),
        *(torch.empty_like(p, memory_format=torch.contiguous_format) for p in params),
    )


def _constant_at_trace_time(fn):
    """Marks fn as torch.compiler.assume_constant_result does: Dynamo calls it at trace time and
    puts its value in the graph instead of tracing it. That decorator imports Dynamo (two to three
    seconds, a third of ``import sa_cuda``) only to set this attribute; tests/ops/test_compile.py
    checks that both mark a function alike and that importing sa_cuda leaves Dynamo unloaded."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_at_trace_time
def _autocast_available(device_type: str) -> bool:
    """Whether autocast knows the device type (torch.is_autocast_enabled raises for one it does
    not, e.g. meta). A constant per device type; Dynamo before 2.14 cannot trace the check itself
    (a graph break), so it takes the value at trace time."""
    return torch.amp.is_autocast_available(device_type)


@_constant_at_trace_time
def _has_kernel(qualified_op_name: str, device_type: str) -> bool:
    """Whether the op has a kernel for the device type. Dynamo cannot trace the dispatcher query
    (a torch.* call returning a bool: a graph break, an error under fullgraph=True), so it takes
    the value at trace time; kernels are registered when the extension loads, before any trace."""
    key = _DISPATCH_KEYS.get(device_type, device_type.upper())
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualified_op_name, key)
    except RuntimeError:  # no dispatch key of that name: no kernel for this device type
        return False


def _compute_dtype(x: Tensor, params: tuple) -> torch.dtype:
    """Outside autocast the layer computes in the promoted dtype of x and its parameters, as the
    eager layer does (bf16 x with fp32 parameters gives fp32). Under autocast it keeps x's dtype
    (the parameters are used in fp32 anyway), which is what the next autocast op wants."""
    dtype = x.dtype
    for p in params:
        if p.dtype != dtype:
            break
    else:  # one dtype: both rules give it
        return dtype
    device_type = x.device.type
    if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return dtype
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


class OpLibrary:
    """The fused ops of one namespace, equipped with fake kernels, vmap rules and autograd. Made
    by ``register_library``; one per namespace."""

    def __init__(self, namespace: str):
        ops = getattr(torch.ops, namespace)
        self.namespace = namespace
        self._forward_ops = {v.name: getattr(ops, v.forward_op_name) for v in VARIANTS}
        self._backward_ops = {v.name: getattr(ops, v.backward_op_name) for v in VARIANTS}
        self._residual_forward_ops = {
            v.name: getattr(ops, v.residual_forward_op_name) for v in VARIANTS
        }
        self._residual_backward_ops = {
            v.name: getattr(ops, v.residual_backward_op_name) for v in VARIANTS
        }
        #: The autograd.Function over these ops (``sa_cuda.ShuffleAttentionFunction`` for sa_cuda).
        self.function = _autograd_function(self._forward_ops, self._backward_ops)
        #: The autograd.Function over the residual ops (``sa_cuda.ShuffleAttentionResidualFunction``
        #: for sa_cuda).
        self.residual_function = _residual_autograd_function(
            self._residual_forward_ops, self._residual_backward_ops
        )
        # The same two Functions for calls outside torch.func transforms and tracing (apply).
        self._untransformed = {
            False: _combined_forward(self.function),
            True: _combined_forward(self.residual_function),
        }
        for variant in VARIANTS:
            ops_in_order = (
                self._forward_ops[variant.name],
                self._backward_ops[variant.name],
                self._residual_forward_ops[variant.name],
                self._residual_backward_ops[variant.name],
            )
            for op, fake in zip(ops_in_order, _fake_kernels(variant)):
                torch.library.register_fake(op.default)(fake)
            _vmap.register(*(op.default for op in ops_in_order))

    def __repr__(self) -> str:
        return f"OpLibrary({self.namespace!r})"

    def forward_op(self, variant: str):
        """torch.ops.<namespace>.<variant>_forward."""
        return self._forward_ops[variant_named(variant).name]

    def backward_op(self, variant: str):
        """torch.ops.<namespace>.<variant>_backward."""
        return self._backward_ops[variant_named(variant).name]

    def residual_forward_op(self, variant: str):
        """torch.ops.<namespace>.<variant>_residual_forward."""
        return self._residual_forward_ops[variant_named(variant).name]

    def residual_backward_op(self, variant: str):
        """torch.ops.<namespace>.<variant>_residual_backward."""
        return self._residual_backward_ops[variant_named(variant).name]

    def available(self, device: torch.device | str) -> bool:
        """True when this library has kernels for ``device``'s type."""
        device_type = torch.device(device).type
        return _has_kernel(self._forward_ops[SA_LAYER.name]._qualified_op_name, device_type)

    def apply(
        self,
        variant: str,
        x: Tensor,
        groups: int,
        params: tuple,
        eps: float,
        identity: Tensor | None = None,
    ) -> Tensor:
        """The functionals' path: argument checks, the compute dtype, the autograd.Function, and
        the memory format of x. ``params``: the variant's six parameters in op order. With
        ``identity``: the residual epilogue, relu(SA(x) + identity), in the dtype that eager's
        ``relu(sa(x) + identity)`` has."""
        spec = variant_named(variant)
        check_forward_args(spec, x, groups, params, eps, param_shapes=True, identity=identity)
        dtype = _compute_dtype(x, params)
        if identity is not None:
            dtype = torch.promote_types(dtype, identity.dtype)
            if identity.dtype != dtype:
                identity = identity.to(dtype)
        if dtype != x.dtype:
            x = x.to(dtype)
        return self.dispatch(spec.name, x, groups, params, float(eps), identity)

    def dispatch(
        self,
        variant: str,
        x: Tensor,
        groups: int,
        params: tuple,
        eps: float,
        identity: Tensor | None = None,
    ) -> Tensor:
        """``apply`` after its checks and conversions: the forward op alone where nothing is
        differentiated or traced, the autograd.Function otherwise. For arguments that pass
        ``apply``'s checks and that it would not convert (the modules' short path,
        sa_cuda/modules); the ops check them again (csrc/host.cpp) before touching memory."""
        # The ops return out (and grad_x) in x's memory format (layout_of).
        differentiable = torch.is_grad_enabled() and (
            x.requires_grad
            or any(p.requires_grad for p in params)
            or (identity is not None and identity.requires_grad)
        )
        # Nothing to differentiate (inference, no_grad, inference_mode): the forward op alone.
        # Under torch.compile(fullgraph=True) this is also the path that compiles: Dynamo
        # (torch 2.14.1) fails on an autograd.Function applied with grad disabled
        # (KeyError(AutogradFunctionContextVariable), "Observed exception"). torch.jit.trace
        # keeps the Function whatever the grad mode: its sanity check traces again under
        # no_grad and compares the two graphs.
        tracing = torch.jit.is_tracing()
        residual = identity is not None
        if not (differentiable or tracing):
            if residual:
                op = self._residual_forward_ops[variant]
                return op(x, identity, groups, *params, eps)[0]
            return self._forward_ops[variant](x, groups, *params, eps)[0]
        # The public Function where torch.func, torch.compile or torch.jit.trace may see it; the
        # same one without setup_context elsewhere (_combined_forward says why).
        if tracing or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            function = self.residual_function if residual else self.function
        else:
            function = self._untransformed[residual]
        if residual:
            return function.apply(variant, x, identity, groups, eps, *params)[0]
        return function.apply(variant, x, groups, eps, *params)[0]


_LIBRARIES: dict[str, OpLibrary] = {}


def register_library(namespace: str) -> OpLibrary:
    """The OpLibrary of the op namespace ``namespace`` (whose eight ops must be registered, e.g.
    "sa_cuda" or "sa_cuda_emu"); registers its fake kernels and vmap rules the first time."""
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = OpLibrary(namespace)
    return _LIBRARIES[namespace]
