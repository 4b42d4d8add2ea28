"""Residual tails: ``relu(sa(x) + shortcut)`` inside a block's forward, run as one pass of the fused
layer's residual epilogue (``sa(x, identity=shortcut)``). ``sa_cuda.convert`` calls ``fuse_tails``
on every module that holds a fused SA layer as a direct child, once the layers are swapped; the
bottleneck of SA-Net's release and timm's ``Bottleneck``/``BasicBlock`` with an SA ``attn_layer``
end in such a tail (``out = sa(bn3(...)); out += identity; out = relu(out)``).

How a block is rewritten, and why the result computes what the block computed:

1. **Read.** The class's ``forward(self, x)`` (a plain function: no decorator, no default, no
   other parameter) must be written in the straight-line code that blocks are written in, checked
   on its source with ``ast``: assignments to local names, ``+=``, ``return``, and ``if self.<name>
   is (not) None:``; expressions of local names, ``+``, calls of child modules
   (``self.conv1(out)``), of ``torch.relu``, ``torch.relu_``, ``torch.add``, ``F.relu`` (with a
   constant ``inplace``) and of the methods ``.relu()``, ``.relu_()``, ``.add()``, ``.add_()``.
   Nothing else: no ``with`` (grad mode, autocast), no other attribute of ``self`` (its mode, a
   child's flag, a plain value), no global value, no helper method, no statement whose value is
   discarded (a side effect), no name from an enclosing function, no child held under two names
   (fx calls a child by its first name). Code in that grammar has no Python-level decision except
   whether a child is None, so a trace records it faithfully. The source is read from the
   class's file, and compiling that file must give the bytecode that runs (the file may have been
   edited since it was imported).
2. **Trace.** torch.fx traces the forward with every child module as one opaque call. fx's own
   Proxy has no in-place operators, so ``out += identity`` would be recorded as ``out = out +
   identity`` (no mutation, other dtype rules); the tracer here records them as ``operator.iadd``,
   so the graph is the forward statement for statement.
3. **Match.** The tail is three nodes: A = ``sa(t)``, a call of a fused SA child (no hooks, called
   once); P = A plus the shortcut s (``+``, ``+=`` into A, ``torch.add``, ``.add``, ``.add_`` into
   A); R = ReLU of P (an exact ``nn.ReLU`` child without hooks, or a relu function or method). A's
   only user is P and P's only user is R.
4. **Move.** One call F = ``residual_tail(sa, t, s)`` takes the place of A, P and R, at P's place:
   s is read where the add read it, t later than A read it. That is the same t when nothing runs
   between A and P, or when t is the fresh output of an exact ``nn.BatchNorm2d``, ``SyncBatchNorm``,
   ``GroupNorm`` or ``Conv2d`` child without hooks that A alone reads (its memory is then
   reachable through t only). What runs in between must not reach the SA layer by other means
   (shared parameters, say); that is not checked.
5. **Run.** Each call first checks that what the proof used still holds: the class's forward has
   the bytecode that was checked, every child and None it reads is the object it was at
   conversion, every global function it calls is the one it was, the SA layer, the ReLU module
   and the fresh producer run their classes' forward without hooks, and no global module hook is
   registered. Otherwise the class's own forward runs. F runs the epilogue when s is a strided
   tensor of t's shape, dtype and device in the memory format of the op's output (then ``A + s``,
   ``s + A`` and ``A += s`` have its dtype and strides); otherwise the three steps, in the order
   written. In float64 and float32 the result is the three steps' to the bit; in bfloat16 and
   half the sum is rounded once instead of twice (as within the fused layer).

The block keeps its attributes, parameters, state_dict and hooks. Its class becomes a subclass of
its class (same name; ``isinstance`` holds) whose forward runs the code fx generated for the
rewritten graph, kept in the instance's ``__dict__`` under ``_sa_cuda_tail``. Instances pickle as
the original class plus that state, so deepcopy, ``torch.save`` of the model and DataParallel's
replicas work (a replica has other children: it runs the class's forward); torch.compile compiles
it; ``torch.jit.script`` does not.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import linecache
import operator
import pickle
import types
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from ._module_code import CALL_MACHINERY, HOOK_DICTS, MISSING, Skip, require
from .models.sa_resnet import SABottleneck
from .modules import SALayer, ShuffleAttention
from .ops.library import layout_of

__all__ = ["fuse_tails", "residual_tail"]

_TAIL_ATTR = "_sa_cuda_tail"  # where a block keeps its rewritten forward
_FUSED_CLASSES = (SALayer, ShuffleAttention)
# Children whose output is a new tensor in every mode: a t they produce is reachable through t only.
_FRESH_OUTPUT = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.Conv2d)
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)
_ADD_FUNCTIONS = (operator.add, torch.add)
_SOURCE_FUNCTIONS = (*_RELU_FUNCTIONS, torch.add)  # the functions forward may call
_SOURCE_METHODS = {"relu": 0, "relu_": 0, "add": 1, "add_": 1}  # tensor methods: their arguments
# The hooks every module call runs (register_module_forward_hook and friends).
_GLOBAL_CALL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


def residual_tail(sa: nn.Module, x: Tensor, shortcut: object, add: str) -> Tensor:
    """``relu(sa(x) + shortcut)``, the sum as the block wrote it (``add``: "into" for ``sa(x) +=
    shortcut``, "after" for ``sa(x) + shortcut``, "before" for ``shortcut + sa(x)``): the fused
    epilogue where it gives the same tensor (values, dtype, strides), else the three steps. What
    ``fuse_tails`` puts in place of a block's tail."""
    if (
        isinstance(x, Tensor)
        and isinstance(shortcut, Tensor)
        and shortcut.layout == torch.strided
        and (shortcut.shape, shortcut.dtype, shortcut.device) == (x.shape, x.dtype, x.device)
        # the strides the op's output has (layout_of(x)): those of the eager sum in either order
        and shortcut.is_contiguous(memory_format=layout_of(x))
    ):
        return sa(x, identity=shortcut)
    out = sa(x)
    if add == "into":
        out += shortcut
    else:
        out = out + shortcut if add == "after" else shortcut + out
    return torch.relu(out)


def fuse_tails(block: nn.Module) -> int:
    """Rewrites ``block``'s forward so that each residual tail of a fused SA child runs as one
    epilogue (this module's docstring says when). Returns how many tails were fused; 0 when the
    block has no fused SA child, is an nn.Sequential (its children in a chain), is
    sa_cuda.models.SABottleneck (which passes its shortcut itself) or is fused already. Raises
    ``Skip`` with the reason a block with a fused SA child is left alone (then nothing about it
    changed)."""
    children = {name for name, child in block._modules.items() if type(child) in _FUSED_CLASSES}
    forward = _static(type(block), "forward")
    if (
        not children
        or _TAIL_ATTR in vars(block)
        or forward in (nn.Sequential.forward, SABottleneck.forward)
    ):
        return 0
    source = _check_source(block)
    graph = _trace(block)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target in children]
    require(bool(calls), f"forward does not call {', '.join(sorted(children))}")
    watched, reasons = {}, []
    for call in calls:
        try:
            watched.update(_fuse_tail(block, graph, call))
        except Skip as skip:
            reasons.append(str(skip))
    require(not reasons, "; ".join(reasons))
    graph.lint()
    reads = {name: getattr(block, name) for name in source.reads}
    code = _TailCode(graph, reads, sorted(watched.items()), source.functions, source.digest)
    block.__class__ = _tailed_class(type(block))
    block.__dict__[_TAIL_ATTR] = code
    return len(calls)


def _static(cls: type, name: str) -> object:
    return inspect.getattr_static(cls, name, MISSING)


# ---- 1. read -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """What step 1 found in forward's source: the names it reads on self (children called,
    attributes compared with None), the global functions it calls (their dotted names, with their
    index in _SOURCE_FUNCTIONS), and the digest of its bytecode."""

    reads: set
    functions: list
    digest: str


def _check_source(block: nn.Module) -> _Source:
    """Raises Skip unless the class and forward's source are as step 1 of the module docstring
    says, the source is what runs (the file may have changed since it was imported) and no child
    forward reads is also held under another name (fx would call it by that one)."""
    cls = type(block)
    require("forward" not in vars(block), "the instance overrides forward in its __dict__")
    for name in CALL_MACHINERY:
        require(
            _static(cls, name) is _static(nn.Module, name),
            f"{cls.__name__} overrides nn.Module.{name}",
        )
    function = _static(cls, "forward")
    require(
        isinstance(function, types.FunctionType) and not hasattr(function, "__wrapped__"),
        f"{cls.__name__}.forward is not a plain function",
    )
    definition, digest = _running_source(function)
    require(not definition.decorator_list, f"{function.__qualname__} is decorated")
    args = definition.args
    require(
        len(args.posonlyargs + args.args) == 2
        and not (args.vararg or args.kwarg or args.kwonlyargs or args.defaults),
        f"{function.__qualname__} takes other parameters than (self, x)",
    )
    self_arg, input_arg = (arg.arg for arg in args.posonlyargs + args.args)
    grammar = _Grammar(block, function, self_arg, input_arg)
    body = definition.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    grammar.statements(body)
    paths = {}
    for path, module in block.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    for name in sorted(grammar.reads):
        names = paths.get(id(getattr(block, name)), [name])
        require(
            len(names) == 1, f"{name} is also held as {', '.join(n for n in names if n != name)}"
        )
    return _Source(grammar.reads, grammar.functions, digest)


def _running_source(function: types.FunctionType) -> tuple[ast.FunctionDef, str]:
    """The definition of ``function`` in its file and the digest of its bytecode, when compiling
    the file now gives that bytecode (the file may have changed since it was imported; the whole
    file, as the compiler's output depends on the module, e.g. on what it imports)."""
    label = function.__qualname__
    try:
        path = inspect.getsourcefile(function)
        with open(path, encoding="utf-8") as file:
            tree, compiled = _parsed_file(path, file.read())
    except (OSError, TypeError, SyntaxError, ValueError) as error:
        raise Skip(f"the source of {label} is not available ({error})") from None
    parts = [part for part in label.split(".") if part != "<locals>"]
    definitions, codes = [tree], [compiled]
    for part in parts:
        definitions = [
            node
            for scope in definitions
            for node in ast.walk(scope)
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name == part
            and node is not scope
        ]
        codes = [c for scope in codes for c in _nested_codes(scope) if c.co_name == part]
    digest = _code_digest(function.__code__)
    require(
        len(definitions) == len(codes) == 1 and isinstance(definitions[0], ast.FunctionDef),
        f"the definition of {label} in {path} is not one function",
    )
    require(
        _code_digest(codes[0]) == digest,
        f"the source of {label} in {path} is not the code that runs (changed since import)",
    )
    return definitions[0], digest


@functools.lru_cache(maxsize=8)
def _parsed_file(path: str, text: str) -> tuple[ast.Module, types.CodeType]:
    """A file's syntax tree (read, never changed) and its compiled code, once per text: a model's
    blocks are mostly of one class, whose file convert would otherwise compile once a block."""
    tree = ast.parse(text, path)
    return tree, compile(tree, path, "exec")


def _nested_codes(code: types.CodeType) -> list[types.CodeType]:
    """The code objects defined inside ``code``, at any depth of nested code."""
    found = []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found += [const, *_nested_codes(const)]
    return found


def _code_digest(code: types.CodeType) -> str:
    """What a function's bytecode does (instructions, names, constants, nested code), not where
    its lines are."""
    parts = [code.co_code.hex(), repr((code.co_names, code.co_varnames, code.co_freevars))]
    for const in code.co_consts:
        is_code = isinstance(const, types.CodeType)
        parts.append(_code_digest(const) if is_code else repr((type(const), const)))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _resolve(namespace: dict, chain: tuple[str, ...]) -> object:
    """The object the dotted global name ``chain`` (("torch", "relu")) stands for in namespace."""
    value = namespace.get(chain[0], MISSING)
    for name in chain[1:]:
        if not isinstance(value, types.ModuleType):
            return MISSING
        value = getattr(value, name, MISSING)
    return value


_STATEMENT_NAMES = {
    ast.Expr: "a statement whose value is dropped (a side effect)",
    ast.With: "a with block (a grad mode or autocast the trace would drop)",
    ast.For: "a loop",
    ast.While: "a loop",
    ast.Assign: "an assignment to several targets",
}


class _Grammar:
    """Checks forward's statements against the grammar of step 1; raises Skip naming the first
    construct outside it."""

    def __init__(
        self, block: nn.Module, function: types.FunctionType, self_name: str, input_name: str
    ) -> None:
        self.block, self.function, self.self_name = block, function, self_name
        self.local_names = {input_name}
        self.reads = set()  # the names read on self: children called, attributes tested
        self.functions = []  # (dotted name, index in _SOURCE_FUNCTIONS) of each function called

    def refuse(self, node: ast.AST, what: str) -> None:
        text = ast.unparse(node).splitlines()[0]
        raise Skip(f"forward has {what} (`{text}`), outside the code a trace records faithfully")

    def statements(self, body: list[ast.stmt]) -> None:
        for node in body:
            self.statement(node)

    def statement(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            self.expression(node.value)
            self.target(node.targets[0])
        elif isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add):
            self.expression(node.value)
            self.expression(node.target)
        elif isinstance(node, ast.If):
            self.none_test(node.test)
            self.statements(node.body)
            self.statements(node.orelse)
        elif isinstance(node, ast.Return) and node.value is not None:
            self.expression(node.value)
        elif not isinstance(node, ast.Pass):
            what = _STATEMENT_NAMES.get(type(node), f"a `{type(node).__name__}` statement")
            self.refuse(node, what)

    def target(self, node: ast.expr) -> None:
        if not isinstance(node, ast.Name):
            self.refuse(node, "an assignment to something else than a local name")
        self.local_names.add(node.id)

    def none_test(self, node: ast.expr) -> None:
        """``self.<name> is None`` / ``is not None``, name a child or an attribute holding None."""
        ok = (
            isinstance(node, ast.Compare)
            and len(node.ops) == 1
            and isinstance(node.ops[0], (ast.Is, ast.IsNot))
            and isinstance(node.comparators[0], ast.Constant)
            and node.comparators[0].value is None
            and self.self_attribute(node.left)
        )
        if not ok:
            self.refuse(node, "a condition other than `self.<child> is (not) None`")
        name = node.left.attr
        value = getattr(self.block, name, MISSING)
        if not (value is None or name in self.block._modules):
            self.refuse(node, f"a test of self.{name}, which is neither a child nor None")
        self.reads.add(name)

    def self_attribute(self, node: ast.expr) -> bool:
        return (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == self.self_name
        )

    def expression(self, node: ast.expr) -> None:
        if isinstance(node, ast.Name) and node.id in self.local_names:
            return
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            self.expression(node.left)
            self.expression(node.right)
        elif isinstance(node, ast.Call) and not any(isinstance(a, ast.Starred) for a in node.args):
            self.call(node)
        else:
            self.refuse(node, "an expression other than local names, +, and calls of children")

    def call(self, node: ast.Call) -> None:
        func = node.func
        if self.self_attribute(func):  # self.<child>(...); None where an `is None` test guards it
            value = getattr(self.block, func.attr, MISSING)
            child = func.attr in self.block._modules and isinstance(value, nn.Module)
            if not (child or value is None) or node.keywords:
                self.refuse(node, f"a call of self.{func.attr} that is not a child module's")
            self.reads.add(func.attr)
            for arg in node.args:
                self.expression(arg)
        elif self.source_function(func) is not None:
            target = self.source_function(func)
            inplace = [k for k in node.keywords if k.arg == "inplace"]
            constant = all(isinstance(k.value, ast.Constant) for k in inplace)
            if len(inplace) != len(node.keywords) or not constant:
                self.refuse(node, "a keyword argument other than a constant inplace")
            args = node.args
            if target is F.relu and len(args) == 2:
                if not isinstance(args[1], ast.Constant):
                    self.refuse(node, "an inplace argument that is not a constant")
                args = args[:1]
            for arg in args:
                self.expression(arg)
        elif (
            isinstance(func, ast.Attribute)
            and _SOURCE_METHODS.get(func.attr) == len(node.args)
            and not node.keywords
        ):
            self.expression(func.value)
            for arg in node.args:
                self.expression(arg)
        else:
            self.refuse(node, "a call of something else than a child, a relu or an add")

    def source_function(self, node: ast.expr) -> object:
        """The function of _SOURCE_FUNCTIONS that the dotted global name ``node`` (``torch.relu``,
        ``F.relu``) stands for, recorded in self.functions; None for anything else (a local or
        closure name, another function)."""
        chain = []
        while isinstance(node, ast.Attribute):
            chain.insert(0, node.attr)
            node = node.value
        closure = self.function.__code__.co_freevars
        if not isinstance(node, ast.Name) or node.id in self.local_names or node.id in closure:
            return None
        chain.insert(0, node.id)
        target = _resolve(self.function.__globals__, tuple(chain))
        index = next((i for i, f in enumerate(_SOURCE_FUNCTIONS) if f is target), None)
        if index is None:
            return None
        self.functions.append((tuple(chain), index))
        return target


# ---- 2. trace ----------------------------------------------------------------------------------


class _Proxy(fx.Proxy):
    """fx's Proxy with ``+=`` (the one augmented assignment the grammar allows): ``a += b`` is
    recorded as ``operator.iadd(a, b)`` (which fx's code generator writes back as ``a += b``), not
    as ``a = a + b``."""

    def __iadd__(self, other: object) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})


class _Tracer(fx.Tracer):
    """Every child module is one call; tensors are proxied by _Proxy."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


def _trace(block: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(block)
    except Exception as error:  # whatever stops the trace means: forward cannot be rewritten
        raise Skip(f"forward cannot be traced ({type(error).__name__}: {error})") from None


# ---- 3. match, 4. move -------------------------------------------------------------------------


def _fuse_tail(block: nn.Module, graph: fx.Graph, call: fx.Node) -> dict[str, type]:
    """Replaces the tail of the SA call ``call`` (A) in graph by one residual_tail call; returns
    the children whose hooks and forward the run-time check watches, with their classes."""
    name = call.target
    require(not _hooked(block._modules[name]), f"{name} has hooks, which see its own output")
    uses = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    require(uses == [call], f"forward calls {name} more than once")
    require(
        len(call.args) == 1 and not call.kwargs and isinstance(call.args[0], fx.Node),
        f"{name} is called with {call.args}, {call.kwargs}, not with one tensor",
    )
    t = call.args[0]
    add, shortcut, order = _match_add(call, name)
    relu = _match_relu(block, add, name)
    watched = {name: type(block._modules[name])}
    if relu.op == "call_module":
        watched[relu.target] = nn.ReLU
    if _nodes_between(call, add):
        producer = block._modules.get(t.target) if t.op == "call_module" else None
        fresh = (
            type(producer) in _FRESH_OUTPUT and not _hooked(producer) and list(t.users) == [call]
        )
        require(
            fresh,
            f"{', '.join(n.name for n in _nodes_between(call, add))} run(s) between {name} and "
            f"the add, and {name}'s input is not a fresh norm or conv output (without hooks) that "
            f"only {name} reads",
        )
        watched[t.target] = type(producer)
    with graph.inserting_before(add):
        module = graph.get_attr(name)
        fused = graph.call_function(residual_tail, (module, t, shortcut, order))
    relu.replace_all_uses_with(fused)
    for node in (relu, add, call):
        graph.erase_node(node)
    return watched


def _hooked(module: nn.Module) -> bool:
    """Hooks or an instance forward: the module's call does more than its class's forward."""
    return "forward" in vars(module) or any(getattr(module, kind) for kind in HOOK_DICTS)


def _single_user(node: fx.Node, what: str) -> fx.Node:
    users = list(node.users)
    require(len(users) == 1, f"{what} has {len(users)} users, not 1 (the add of the shortcut)")
    return users[0]


def _match_add(call: fx.Node, name: str) -> tuple[fx.Node, fx.Node, str]:
    """(P, s, how) when call's only user adds a shortcut s to it; how: residual_tail's add."""
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
    return add, shortcut, "into" if in_place else "after" if args[0] is call else "before"


def _match_relu(block: nn.Module, add: fx.Node, name: str) -> fx.Node:
    """The ReLU that is the add's only user."""
    relu = _single_user(add, f"the sum of {name} and the shortcut")
    args = relu.args
    if relu.op == "call_module":
        module = block._modules[relu.target]
        is_relu = type(module) is nn.ReLU and not _hooked(module) and args == (add,)
    elif relu.op == "call_function":
        is_relu = relu.target in _RELU_FUNCTIONS and args[:1] == (add,)
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


class _TailCode:
    """A block's forward with fused tails: the code fx generated for the rewritten graph (called
    with the block as ``self``) and what the rewrite relied on, checked at every call (step 5):
    the digest of the class forward's bytecode, the children and Nones it read, the global
    functions it called, and the children whose hooks would see what changed, with their classes.
    Pickled as its source and its globals (modules by name)."""

    def __init__(
        self, graph: fx.Graph, reads: dict, watched: list, functions: list, digest: str
    ) -> None:
        code = graph.python_code(root_module="self")
        state = {"source": code.src, "globals": _picklable(code.globals)}
        try:
            pickle.dumps(state["globals"])
        except Exception as error:
            raise Skip(f"forward calls something that cannot be pickled ({error})") from None
        state.update(reads=reads, watched=watched, functions=functions, digest=digest)
        self.__setstate__(state)

    def holds_for(self, block: nn.Module) -> bool:
        """What the rewrite relied on still holds for ``block``."""
        function = _static(type(block)._sa_cuda_original_class, "forward")
        return (
            self.same_code(function)
            and all(getattr(block, name, MISSING) is value for name, value in self.reads.items())
            and all(
                _resolve(function.__globals__, chain) is _SOURCE_FUNCTIONS[index]
                for chain, index in self.functions
            )
            and all(_unchanged(block._modules.get(name), cls) for name, cls in self.watched)
            and not any(getattr(_module_globals, hooks) for hooks in _GLOBAL_CALL_HOOKS)
        )

    def same_code(self, function: object) -> bool:
        """function's bytecode is the one checked (its digest is kept per code object)."""
        code = getattr(function, "__code__", None)
        if code is not self._code_seen:
            self._code_seen = code
            self._code_same = code is not None and _code_digest(code) == self.digest
        return self._code_same

    def __call__(self, block: nn.Module, *args, **kwargs):
        return self._function(block, *args, **kwargs)

    def __getstate__(self) -> dict:
        keys = ("source", "globals", "reads", "watched", "functions", "digest")
        return {key: getattr(self, key) for key in keys}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._code_seen = self._code_same = None
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


def _unchanged(child: object, cls: type) -> bool:
    """A watched child still calls cls's forward, without hooks."""
    return (
        child is not None
        and _static(type(child), "forward") is _static(cls, "forward")
        and not _hooked(child)
    )


class _ModuleName:
    """A module in the generated code's globals, pickled as its name."""

    def __init__(self, name: str) -> None:
        self.name = name


def _picklable(namespace: dict) -> dict:
    return {
        key: _ModuleName(value.__name__) if isinstance(value, types.ModuleType) else value
        for key, value in namespace.items()
    }


def _tailed_forward(self: nn.Module, *args, **kwargs):
    """The forward of a block with fused tails: its _TailCode where that holds, else its class's."""
    code = self.__dict__.get(_TAIL_ATTR)
    if code is not None and code.holds_for(self):
        return code(self, *args, **kwargs)
    return type(self)._sa_cuda_original_class.forward(self, *args, **kwargs)


def _tailed_reduce_ex(self: nn.Module, protocol: int):
    """Pickles (and deep-copies) as the original class and the instance's state."""
    state = object.__reduce_ex__(self, protocol)
    return (_rebuild_tailed, (type(self)._sa_cuda_original_class,), *state[2:])


def _rebuild_tailed(cls: type) -> nn.Module:
    tailed = _tailed_class(cls)
    return tailed.__new__(tailed)


@functools.cache
def _tailed_class(cls: type) -> type:
    """The subclass a block of class ``cls`` takes when its tails are fused."""
    namespace = {
        "forward": _tailed_forward,
        "__reduce_ex__": _tailed_reduce_ex,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "_sa_cuda_original_class": cls,
    }
    return type(cls.__name__, (cls,), namespace)
