"""What a module's call runs, for the checks of ``sa_cuda.convert``: nn.Module's call machinery,
the hooks an instance holds, and what a forward's source does with ``self`` (read by ``ast``).

``Skip`` is the checks' verdict: raised with the human-readable reason a module is left alone."""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from dataclasses import dataclass, field

from torch import nn

# What nn.Module.__init__ puts in every instance; everything else in vars(module) is the user's.
MODULE_STATE = frozenset(vars(nn.Module()))
HOOK_STATE = tuple(sorted(name for name in MODULE_STATE if "hook" in name))
HOOK_DICTS = tuple(name for name in HOOK_STATE if name.endswith("hooks"))
# How module(x) reaches forward: a class overriding any of these changes what a call does.
CALL_MACHINERY = (
    "__call__",
    "_wrapped_call_impl",
    "_call_impl",
    "__getattr__",
    "__getattribute__",
)
MISSING = object()


class Skip(Exception):
    """Raised by the checks, with the human-readable reason the module is left alone."""


def require(condition: bool, reason: str) -> None:
    if not condition:
        raise Skip(reason)


@dataclass
class Scan:
    """What methods' source does with ``self`` (their first parameter)."""

    names: set = field(default_factory=set)  # every self.<name> touched
    assigned: set = field(default_factory=set)  # self.<name> = ..., del self.<name>
    problems: list = field(default_factory=list)  # self passed on, super(), global/nonlocal

    def merge(self, other: Scan) -> None:
        self.names |= other.names
        self.assigned |= other.assigned
        self.problems += other.problems


def scan_methods(owner: type, allow_missing_source: bool) -> Scan:
    """Scans forward and, transitively, every method of owner's own classes it calls on self."""
    total, pending, seen = Scan(), ["forward"], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        function = user_function(owner, name)
        if function is None:
            continue
        try:
            scan = scan_function(function)
        except Skip:
            if allow_missing_source:  # an exact registered class: the user vouched for its code
                continue
            raise
        total.merge(scan)
        pending.extend(scan.names)
    return total


def user_function(owner: type, name: str) -> types.FunctionType | None:
    """The plain function ``name`` resolves to on owner, when a class other than nn.Module and
    object defines it (staticmethods have no self to scan)."""
    for klass in owner.__mro__:
        if name in vars(klass):
            attr = vars(klass)[name]
            if klass in (nn.Module, object) or not isinstance(attr, types.FunctionType):
                return None
            return attr
    return None


def scan_function(function: types.FunctionType) -> Scan:
    label = function.__qualname__
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError) as error:
        raise Skip(f"the source of {label} is not available ({error})") from None
    definition = tree.body[0] if tree.body else None
    require(
        isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)),
        f"the source of {label} is not a def statement",
    )
    positional = definition.args.posonlyargs + definition.args.args
    require(bool(positional), f"{label} takes no self argument")
    self_name, scan, attribute_bases = positional[0].arg, Scan(), set()
    for node in ast.walk(definition):
        if isinstance(node, ast.Attribute) and is_name(node.value, self_name):
            scan.names.add(node.attr)
            attribute_bases.add(id(node.value))
            if not isinstance(node.ctx, ast.Load):
                scan.assigned.add(node.attr)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            scan.problems.append(f"{label} declares global/nonlocal names (side effects)")
        elif isinstance(node, ast.Call) and is_name(node.func, "super"):
            scan.problems.append(f"{label} calls super()")
    if any(
        is_name(node, self_name) and id(node) not in attribute_bases
        for node in ast.walk(definition)
    ):
        scan.problems.append(f"{label} passes {self_name} on to other code")
    return scan


def is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name
