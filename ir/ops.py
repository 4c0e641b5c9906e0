"""The op registry: each op's type inference and NumPy reference, registered once.

Standard ONNX ops take their schema from `onnx.defs`; the ones polyport models
symbolically register a type-inference function here (see `onnx_shapes.py`),
and the rest fall back to ONNX's own per-node inference. Their reference
implementations come from `onnx.reference`. polyport's own ops (domain
`polyport`) register all three: schema, inference and reference.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .. import errors
from .graph import Node, Value
from .symbolic import Dim
from .types import Type

POLYPORT_DOMAIN = "polyport"

# infer(node, ctx) -> output types.  reference(node, inputs, ctx) -> output arrays.
InferFn = Callable[[Node, "InferContext"], Sequence[Type]]
ReferenceFn = Callable[[Node, Sequence[Any], "RunContext"], Sequence[Any]]


@dataclasses.dataclass
class AttrSpec:
    kind: type                       # int, float, str, list, ...
    default: Any = None              # None: required
    doc: str = ""
    choices: tuple = ()              # the values a str attribute may take (empty: any)


@dataclasses.dataclass
class OpDef:
    domain: str
    name: str
    infer: Optional[InferFn] = None
    reference: Optional[ReferenceFn] = None
    # polyport ops: (input names, output names, attributes). Optional inputs end in '?'.
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    attrs: dict[str, AttrSpec] = dataclasses.field(default_factory=dict)
    doc: str = ""


_REGISTRY: dict[tuple[str, str], OpDef] = {}


def _key(domain: str, name: str) -> tuple[str, str]:
    return ("" if domain == "ai.onnx" else domain, name)


def op_def(domain: str, name: str) -> OpDef:
    """The (possibly empty) definition of an op, created on first use."""
    key = _key(domain, name)
    if key not in _REGISTRY:
        _REGISTRY[key] = OpDef(key[0], name)
    return _REGISTRY[key]


def lookup(domain: str, name: str) -> Optional[OpDef]:
    return _REGISTRY.get(_key(domain, name))


def infers(*names: str, domain: str = ""):
    """Decorator registering a type-inference function for one or more ops."""
    def wrap(fn: InferFn) -> InferFn:
        for n in names:
            op_def(domain, n).infer = fn
        return fn
    return wrap


def reference(*names: str, domain: str = ""):
    """Decorator registering a NumPy reference implementation for one or more ops."""
    def wrap(fn: ReferenceFn) -> ReferenceFn:
        for n in names:
            op_def(domain, n).reference = fn
        return fn
    return wrap


def define(name: str, *, inputs: Sequence[str], outputs: Sequence[str], attrs: dict[str, AttrSpec] | None = None,
           doc: str = "", domain: str = POLYPORT_DOMAIN) -> OpDef:
    """Declare a polyport op's schema (inference and reference are registered with the decorators)."""
    d = op_def(domain, name)
    d.inputs, d.outputs, d.attrs, d.doc = tuple(inputs), tuple(outputs), dict(attrs or {}), doc
    return d


def checked_attrs(op_type: str, attrs: dict, *, where: str = "", domain: str = POLYPORT_DOMAIN) -> dict:
    """`attrs` for a new `domain::op_type` node, checked against its schema: known names, required
    ones present, kinds (ints widen to float; bools to int), choices. Defaults are not stored:
    `attrs_of` supplies them, so a node says only what differs from the schema."""
    d = lookup(domain, op_type)
    what = f"{where + ': ' if where else ''}{domain}::{op_type}"
    if d is None or not d.attrs and not d.inputs:
        raise errors.UnsupportedOpError(f"{what}: no such op")
    unknown = sorted(set(attrs) - set(d.attrs))
    if unknown:
        raise errors.PolyportError(f"{what}: unknown attribute {unknown[0]!r}; known: {', '.join(d.attrs)}")
    out = {}
    for name, spec in d.attrs.items():
        if name not in attrs:
            if spec.default is None:
                raise errors.PolyportError(f"{what}: attribute {name!r} is required")
            continue
        v = attrs[name]
        if spec.kind is float and isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            v = float(v)
        elif spec.kind is int and isinstance(v, (bool, int, np.integer)):
            v = int(v)
        elif not isinstance(v, spec.kind):
            raise errors.PolyportError(f"{what}: attribute {name!r} must be {spec.kind.__name__}, got {v!r}")
        if spec.choices and v not in spec.choices:
            raise errors.PolyportError(f"{what}: attribute {name!r} is {v!r}; one of {', '.join(spec.choices)}")
        out[name] = v
    return out


def attrs_of(node: Node) -> dict:
    """A polyport node's attributes with the schema's defaults filled in (the one place defaults are read)."""
    d = lookup(node.domain, node.op_type)
    full = {n: s.default for n, s in (d.attrs.items() if d else ()) if s.default is not None}
    full.update(node.attrs)
    return full


@dataclasses.dataclass
class InferContext:
    """What type inference may ask about a node's inputs beyond their types."""
    opset: int

    def value(self, v: Optional[Value]) -> Optional[np.ndarray]:
        return known_value(v)


@dataclasses.dataclass
class RunContext:
    """What a reference implementation may need at run time."""
    bindings: dict[str, int]   # symbol -> value, bound from the inputs' shapes
    opset: int = 0


def known_value(v: Optional[Value]) -> Optional[np.ndarray]:
    """The value of `v` where it is known before running: a constant (NumPy array)
    or a symbolic shape vector (an object array of ints and SymExprs)."""
    if v is None:
        return None
    if v.const is not None:
        return v.const
    node = v.producer
    if node is not None and node.domain == POLYPORT_DOMAIN and node.op_type == "ShapeValue":
        return shape_value_array(node.attrs["dims"], bool(node.attrs.get("scalar", 0)))
    return None


def shape_value_array(dims: Sequence[Dim], scalar: bool) -> np.ndarray:
    arr = np.empty(len(dims), dtype=object)
    for i, d in enumerate(dims):
        arr[i] = d
    return arr.reshape(()) if scalar else arr
