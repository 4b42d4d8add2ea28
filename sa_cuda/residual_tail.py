"""Residual tails: ``relu(sa(x) + shortcut)`` inside a block's forward, run as one pass of the fused
layer's residual epilogue (``sa(x, identity=shortcut)``). ``sa_cuda.convert`` calls ``fuse_tails``
on every module that holds a fused SA layer as a direct child, once the layers are swapped; the
bottleneck of SA-Net's release and timm's ``Bottleneck``/``BasicBlock`` with an SA ``attn_layer``
end in such a tail (``out = sa(bn3(...)); out += identity; out = relu(out)``).

How a block is rewritten, and why the result computes what the block computed:

1. **Read.** The forward (and every method it calls on ``self``, read with ``ast``) may not assign
   to ``self`` (tracing would store proxies in the module), read ``self.training`` (the trace would
   freeze the branch in the current mode), pass ``self`` on, call ``super()`` or declare
   ``global``/``nonlocal``. The block's class keeps nn.Module's call machinery.
2. **Trace.** torch.fx traces the forward with every child module as one opaque call. fx's own
   Proxy has no in-place operators, so ``out += identity`` would be recorded as ``out = out +
   identity`` (no mutation, other dtype rules); the tracer here records augmented assignments as
   ``operator.iadd`` and friends, so the graph is the forward statement for statement. Python-level
   decisions (``if self.downsample is not None``, plain attributes, globals) are taken at
   conversion: convert a model once it is configured. A forward that cannot be traced (a branch on
   a tensor's value) or that would leave a trace in the block leaves the block alone.
3. **Match.** The tail is three nodes: A = ``sa(t)``, a call of a fused SA child (no hooks, called
   once, no other use of it or of its parameters in forward); P = A plus the shortcut s (``+``,
   ``+=`` into A, ``torch.add``, ``.add``, ``.add_`` into A; no ``alpha``); R = ReLU of P (an exact
   ``nn.ReLU`` child without hooks, ``torch.relu``, ``F.relu``, ``.relu``, ``.relu_``, in place or
   not). A's only user is P and P's only user is R.
4. **Move.** One call F = ``residual_tail(sa, t, s)`` takes the place of A, P and R, at P's place:
   s is read where the add read it, t later than A read it. That is the same t when nothing runs
   between A and P, or when t is the fresh output of an exact ``nn.BatchNorm2d``, ``SyncBatchNorm``,
   ``GroupNorm`` or ``Conv2d`` child that A alone reads (its memory is then reachable through t
   only). What runs in between must not reach the SA layer by other means (shared parameters,
   say); that is not checked.
5. **Run.** F runs the epilogue when s is a strided tensor of t's shape, dtype and device (then
   ``A + s`` and ``A += s`` have the same dtype); otherwise, or if the block's SA child was since
   replaced by another kind of module, it runs A, P and R as written.

The block keeps its class, attributes, parameters, state_dict and hooks: the rewritten forward (the
code fx generates for the graph, run with the block as ``self``) goes into the instance's
``__dict__`` as ``forward``, which nn.Module's call finds before the class's, and ``del
block.forward`` puts the original back. It survives ``copy.deepcopy``, pickling (``torch.save`` of
the model) and torch.compile; ``torch.jit.script`` does not see it.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import linecache
import operator
import pickle
import types
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._module_code import CALL_MACHINERY, HOOK_DICTS, MISSING, Skip, require, scan_methods
from .modules import SALayer, ShuffleAttention

__all__ = ["fuse_tails", "residual_tail"]

_FUSED_CLASSES = (SALayer, ShuffleAttention)
# Children whose output is a new tensor in every mode: a t they produce is reachable through t only.
_FRESH_OUTPUT = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.Conv2d)
_IN_PLACE_OPERATORS = ("add", "and", "floordiv", "lshift", "matmul", "mod", "mul", "or", "pow")
_IN_PLACE_OPERATORS += ("rshift", "sub", "truediv", "xor")
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)
_ADD_FUNCTIONS = (operator.add, torch.add)


def residual_tail(sa: nn.Module, x: Tensor, shortcut: object, add_in_place: bool) -> Tensor:
    """``relu(sa(x) + shortcut)`` (``sa(x) += shortcut`` when ``add_in_place``): the fused
    epilogue where it computes the same, else the three steps. What ``fuse_tails`` puts in place
    of a block's tail."""
    if (
        type(sa) in _FUSED_CLASSES
        and isinstance(x, Tensor)
        and isinstance(shortcut, Tensor)
        and shortcut.layout == torch.strided
        and (shortcut.shape, shortcut.dtype, shortcut.device) == (x.shape, x.dtype, x.device)
    ):
        return sa(x, identity=shortcut)
    out = sa(x)
    out = out.add_(shortcut) if add_in_place else out + shortcut
    return torch.relu(out)


def fuse_tails(block: nn.Module) -> int:
    """Rewrites ``block``'s forward so that each residual tail of a fused SA child runs as one
    epilogue (this module's docstring says when). Returns how many tails were fused; 0 when the
    block has no fused SA child, is an nn.Sequential (its children in a chain) or its tails are
    fused already. Raises ``Skip`` with the reason a
    block with a fused SA child is left alone (then nothing about it changed)."""
    children = {name for name, child in block._modules.items() if type(child) in _FUSED_CLASSES}
    if (
        not children
        or isinstance(block.__dict__.get("forward"), _FusedForward)
        or _static(type(block), "forward") is nn.Sequential.forward  # a chain: no shortcut
    ):
        return 0
    _check_code(block)
    graph = _trace(block)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target in children]
    if calls and all(call.kwargs.get("identity") is not None for call in calls):
        return 0  # every SA call gets its shortcut already (sa_cuda.models.SABottleneck)
    require(bool(calls), f"forward does not call {', '.join(sorted(children))}")
    fused = 0
    reasons = []
    for call in calls:
        try:
            _fuse_tail(block, graph, call)
            fused += 1
        except Skip as skip:
            reasons.append(str(skip))
    require(not reasons, "; ".join(reasons))
    graph.lint()
    block.__dict__["forward"] = _FusedForward(block, graph)
    return fused


# ---- 1. read -----------------------------------------------------------------------------------


def _check_code(block: nn.Module) -> None:
    cls = type(block)
    require("forward" not in vars(block), "the instance overrides forward in its __dict__")
    for name in CALL_MACHINERY:
        require(
            _static(cls, name) is _static(nn.Module, name),
            f"{cls.__name__} overrides nn.Module.{name}",
        )
    owner = next(klass for klass in cls.__mro__ if "forward" in vars(klass))
    require(owner is not nn.Module, f"{cls.__name__} has no forward")
    scan = scan_methods(owner, allow_missing_source=False)
    require(not scan.problems, scan.problems[0] if scan.problems else "")
    require(
        not scan.assigned,
        f"forward assigns self.{', self.'.join(sorted(scan.assigned))} (tracing would store "
        f"proxies there)",
    )
    require(
        "training" not in scan.names,
        "forward reads self.training (the trace would keep the branch of the current mode)",
    )


def _static(cls: type, name: str) -> object:
    return inspect.getattr_static(cls, name, MISSING)


# ---- 2. trace ----------------------------------------------------------------------------------


class _Proxy(fx.Proxy):
    """fx's Proxy with the in-place operators: ``a += b`` is recorded as ``operator.iadd(a, b)``
    (which fx's code generator writes back as ``a += b``), not as ``a = a + b``."""


def _in_place(name: str) -> Callable:
    target = getattr(operator, f"i{name}")

    def method(self: _Proxy, other: object) -> _Proxy:
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    return method


for _name in _IN_PLACE_OPERATORS:
    setattr(_Proxy, f"__i{_name}__", _in_place(_name))


class _Tracer(fx.Tracer):
    """Every child module is one call; tensors are proxied by _Proxy."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


def _trace(block: nn.Module) -> fx.Graph:
    before = dict(vars(block))
    try:
        graph = _Tracer().trace(block)
    except Exception as error:  # whatever stops the trace means: forward cannot be rewritten
        raise Skip(f"forward cannot be traced ({type(error).__name__}: {error})") from None
    finally:
        added = set(vars(block)) - set(before)
        for name in added:  # fx stores tensors forward reads from elsewhere on the block
            delattr(block, name)
        for name, value in before.items():
            block.__dict__[name] = value
    require(
        not added,
        f"forward reads tensor(s) the block does not hold ({', '.join(sorted(added))})",
    )
    return graph


# ---- 3. match, 4. move -------------------------------------------------------------------------


def _fuse_tail(block: nn.Module, graph: fx.Graph, call: fx.Node) -> None:
    """Replaces the tail of the SA call ``call`` (A) in graph by one residual_tail call."""
    name = call.target
    sa = block._modules[name]
    hooked = [kind for kind in HOOK_DICTS if getattr(sa, kind)]
    require(not hooked, f"{name} has hooks ({', '.join(hooked)}), which see its own output")
    uses = [
        n
        for n in graph.nodes
        if n.op in ("call_module", "get_attr")
        and (n.target == name or n.target.startswith(name + "."))
    ]
    require(uses == [call], f"forward uses {name} or its parameters more than once")
    require(
        len(call.args) == 1 and not call.kwargs and isinstance(call.args[0], fx.Node),
        f"{name} is called with {call.args}, {call.kwargs}, not with one tensor",
    )
    t = call.args[0]
    add, shortcut, add_in_place = _match_add(call, name)
    relu = _match_relu(block, add, name)
    between = _nodes_between(call, add)
    fresh = (
        t.op == "call_module"
        and type(block.get_submodule(t.target)) in _FRESH_OUTPUT
        and list(t.users) == [call]
    )
    require(
        not between or fresh,
        f"{', '.join(n.name for n in between)} run(s) between {name} and the add, and {name}'s "
        f"input is not a fresh norm or conv output that only {name} reads",
    )
    with graph.inserting_before(add):
        module = graph.get_attr(name)
        fused = graph.call_function(residual_tail, (module, t, shortcut, add_in_place))
    relu.replace_all_uses_with(fused)
    for node in (relu, add, call):
        graph.erase_node(node)


def _single_user(node: fx.Node, what: str) -> fx.Node:
    users = list(node.users)
    require(len(users) == 1, f"{what} has {len(users)} users, not 1 (the add of the shortcut)")
    return users[0]


def _match_add(call: fx.Node, name: str) -> tuple[fx.Node, fx.Node, bool]:
    """(P, s, in place) when call's only user adds a shortcut s to it."""
    add = _single_user(call, f"the output of {name}")
    args, kwargs = add.args, add.kwargs
    is_add = (add.op == "call_function" and add.target in _ADD_FUNCTIONS) or (
        add.op == "call_method" and add.target == "add"
    )
    in_place = (add.op == "call_function" and add.target is operator.iadd) or (
        add.op == "call_method" and add.target == "add_"
    )
    require(
        (is_add or in_place) and len(args) == 2 and not kwargs,
        f"the output of {name} goes to {add.format_node()}, not to an add of a shortcut",
    )
    require(
        args.count(call) == 1 and (not in_place or args[0] is call),
        f"{add.name} does not add a shortcut into the output of {name}",
    )
    shortcut = args[1] if args[0] is call else args[0]
    require(isinstance(shortcut, fx.Node), f"{add.name} adds the constant {shortcut!r}")
    return add, shortcut, in_place


def _match_relu(block: nn.Module, add: fx.Node, name: str) -> fx.Node:
    """The ReLU that is the add's only user."""
    relu = _single_user(add, f"the sum of {name} and the shortcut")
    args, kwargs = relu.args, relu.kwargs
    if relu.op == "call_module":
        module = block.get_submodule(relu.target)
        hooked = [kind for kind in HOOK_DICTS if getattr(module, kind)]
        is_relu = type(module) is nn.ReLU and not hooked and args == (add,) and not kwargs
    elif relu.op == "call_function":
        is_relu = (
            relu.target in _RELU_FUNCTIONS
            and args[:1] == (add,)
            and len(args) <= (2 if relu.target is F.relu else 1)
            and set(kwargs) <= ({"inplace"} if relu.target is F.relu else set())
        )
    else:
        is_relu = relu.op == "call_method" and relu.target in ("relu", "relu_") and args == (add,)
    require(
        is_relu,
        f"the sum of {name} and the shortcut goes to {relu.format_node()}, not to a ReLU "
        f"(an exact nn.ReLU without hooks, torch.relu, F.relu, .relu)",
    )
    return relu


def _nodes_between(first: fx.Node, last: fx.Node) -> list[fx.Node]:
    between, node = [], first.next
    while node is not last:
        between.append(node)
        node = node.next
    return between


# ---- the rewritten forward ---------------------------------------------------------------------


class _FusedForward:
    """A block's forward with fused tails: the code fx generates for the rewritten graph, called
    with the block as ``self``. Pickled as its source and its globals (modules by name)."""

    def __init__(self, block: nn.Module, graph: fx.Graph) -> None:
        code = graph.python_code(root_module="self")
        state = {"block": block, "source": code.src, "globals": _picklable(code.globals)}
        try:
            pickle.dumps(state["globals"])
        except Exception as error:
            raise Skip(f"forward calls something that cannot be pickled ({error})") from None
        self.__setstate__(state)

    def __call__(self, *args, **kwargs):
        return self._function(self.block, *args, **kwargs)

    def __getstate__(self) -> dict:
        return {"block": self.block, "source": self.source, "globals": self.globals}

    def __setstate__(self, state: dict) -> None:
        self.block, self.source, self.globals = state["block"], state["source"], state["globals"]
        namespace = {
            key: importlib.import_module(value.name) if isinstance(value, _ModuleName) else value
            for key, value in self.globals.items()
        }
        # A file name in linecache, so that tracebacks show the generated line.
        digest = hashlib.sha1(self.source.encode()).hexdigest()[:12]
        filename = f"<sa_cuda fused forward {digest}>"
        linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True), filename)
        exec(compile(self.source, filename, "exec"), namespace)
        self._function = namespace["forward"]

    def __repr__(self) -> str:
        return f"<sa_cuda fused forward of {type(self.block).__name__}>"


class _ModuleName:
    """A module in the generated code's globals, pickled as its name."""

    def __init__(self, name: str) -> None:
        self.name = name


def _picklable(namespace: dict) -> dict:
    return {
        key: _ModuleName(value.__name__) if isinstance(value, types.ModuleType) else value
        for key, value in namespace.items()
    }
