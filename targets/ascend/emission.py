"""Emission: the walk over the fused graph that writes the ascend ONNX graph and its op plan.

`Emitter` holds the names, constants, casts and the op plan; standard ops pass through
(checked against CANN_ONNX_OPS), `polyport::ShapeValue` becomes shape arithmetic, and each
fused op is emitted by the lowering registered for it with `@lowers` (one module per op).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...errors import PolyportError
from ...ir.graph import Graph, Node, Value
from ...ir.onnx_export import ShapeValueWriter
from ...ir.onnx_proto import node_to_proto
from ...ir.ops import POLYPORT_DOMAIN
from ...ir.types import TensorType
from ...runtime.ascend_emulator import CANN_DOMAIN, KERNEL_DOMAIN
from . import limits as L

OPSET = 18                                # the newest default-domain opset ATC's ONNX parser accepts
SOC = "Ascend910B3"
NOT_RUN = ("generated and checked by polyport; NOT compiled with atc and NOT run on an Ascend device "
           "(no CANN toolkit or Ascend hardware was available)")
INT_MAX = 2147483647

# The standard ONNX ops CANN's graph engine takes from an ONNX model (opset <= 18), transcribed from the
# CANN "ATC tool / ONNX operator support list" (CANN 8.0, Atlas A2) as polyport's authors know it: not
# verified against a toolkit. A model whose standard part uses anything else is refused.
CANN_ONNX_OPS = frozenset("""
Abs Add And ArgMax ArgMin Cast Ceil Clip Concat Constant ConstantOfShape Cos CumSum Div Einsum Equal Erf Exp
Expand Flatten Floor Gather GatherElements GatherND Gemm Greater GreaterOrEqual Identity LayerNormalization
Less LessOrEqual Log MatMul Max Mean Min Mod Mul Neg Not Or Pad Pow Range Reciprocal ReduceL2 ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum Relu Reshape ScatterElements ScatterND Shape Sigmoid Sign Sin Size
Slice Softmax Softplus Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())

# Every op the emitted graph may hold in the custom domains, with what it is.
CANN_OPS = {
    "FusedInferAttentionScore": "aclnnFusedInferAttentionScoreV2",
    "ScatterPaKvCache": "aclnnScatterPaKvCache",
    "MoeGatingTopK": "aclnnMoeGatingTopK",
    "MoeInitRoutingV2": "aclnnMoeInitRoutingV2",
    "GroupedMatmul": "aclnnGroupedMatmulV4",
    "WeightQuantBatchMatmulV2": "aclnnWeightQuantBatchMatmulV2",
    "SwiGlu": "aclnnSwiGlu",
    "MoeFinalizeRoutingV2": "aclnnMoeFinalizeRoutingV2",
    "RmsNorm": "aclnnRmsNorm",
    "RotaryPositionEmbedding": "aclnnRotaryPositionEmbedding",
}
POLYPORT_KERNELS = {
    "MoeGatingTopKSqrtSoftplus": "moe_gating_topk_sqrtsoftplus",
    "MoeHashRoutingGate": "moe_hash_routing_gate",
}

F16, BF16, F32 = TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def dims(shape) -> Optional[list]:
    """A shape as the op plan writes it (symbolic dims as text)."""
    if shape is None:
        return None
    return [d if isinstance(d, int) else (str(d) if d is not None else None) for d in shape]


def tname(elem: int) -> str:
    return helper.tensor_dtype_to_np_dtype(elem).name if elem != TensorProto.BFLOAT16 else "bfloat16"


LOWERINGS: dict[str, Callable[["Emitter", Node], None]] = {}     # fused op type -> its lowering
DECOMPOSED: dict[str, Callable[["Emitter", Node], None]] = {}     # standard ops CANN's list lacks -> opset-18 ops


def lowers(op_type: str):
    """Register `fn(em, node)` as the lowering of `polyport::op_type`."""
    def deco(fn):
        assert op_type not in LOWERINGS, op_type
        LOWERINGS[op_type] = fn
        return fn
    return deco


def decomposes(op_type: str):
    """Register `fn(em, node)` as the opset-18 decomposition of the standard op `op_type` (newer than
    ATC's opset, or missing from CANN's list)."""
    def deco(fn):
        assert op_type not in DECOMPOSED, op_type
        DECOMPOSED[op_type] = fn
        return fn
    return deco


class Emitter:
    """Walks the fused graph once, emitting ONNX nodes and the op plan side by side."""

    def __init__(self, graph: Graph, compute: int):
        self.graph = graph
        self.compute = compute
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.plan: list[dict] = []
        self.fallbacks: list[dict] = []
        self.kernels: set[str] = set()
        self.elem: dict[str, int] = {}          # emitted value name -> ONNX elem type
        self.shape: dict[str, Optional[list]] = {}
        self.names: dict[Value, str] = {}       # IR value -> its emitted name (in its natural dtype)
        self.casts: dict[tuple[str, int], str] = {}
        self.const_names: dict[tuple[str, int], str] = {}
        self.used: set[str] = set()
        self.current: Optional[Node] = None
        self.fia_mask: Optional[str] = None
        self.shape_values = ShapeValueWriter(graph)
        self.done: set[Node] = set()            # nodes emitted (some ahead of their turn)
        self.paged: Any = None                  # a derived program's paged caches (targets/ascend/programs.py)

    # ---- names, constants, casts ----------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def const(self, array: np.ndarray, base: str) -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        self.elem[name] = helper.np_dtype_to_tensor_dtype(np.asarray(array).dtype)
        self.shape[name] = list(np.shape(array))
        return name

    def get(self, v: Optional[Value], want: Optional[int] = None) -> str:
        """The emitted name of IR value `v`, in float dtype `want` (a Cast or a converted constant)."""
        if v is None:
            return ""
        if v.const is not None:
            arr = np.asarray(v.const)
            natural = helper.np_dtype_to_tensor_dtype(arr.dtype) if arr.dtype != object else None
            if want is None or natural not in FLOATS:
                want = natural
            key = (v.name, want)
            if key not in self.const_names:
                if want != natural:
                    arr = arr.astype(helper.tensor_dtype_to_np_dtype(want))
                self.const_names[key] = self.const(arr, v.name if not any(k[0] == v.name for k in self.const_names)
                                                   else f"{v.name}__{tname(want)}")
            return self.const_names[key]
        name = self.names[v]
        have = self.elem[name]
        if want is None or have == want or have not in FLOATS:
            return name
        key = (name, want)
        if key not in self.casts:
            out = self.fresh(f"{name}__{tname(want)}")
            self.emit("Cast", [name], [(out, want, self.shape[name])], {"to": want}, note="dtype conversion")
            self.casts[key] = out
        return self.casts[key]

    def float_elem(self, v: Value) -> Optional[int]:
        if v.const is not None:
            return None
        name = self.names.get(v)
        return self.elem.get(name) if name is not None else None

    # ---- emission --------------------------------------------------------------------------------
    def emit(self, op: str, inputs: list[str], outputs: list[tuple[str, int, Optional[list]]],
             attrs: Optional[dict] = None, domain: str = "", note: str = "", proto: Optional[onnx.NodeProto] = None
             ) -> list[str]:
        src = self.current
        name = self.fresh(f"{src.name}/{op}" if src is not None else op)
        if proto is None:
            proto = helper.make_node(op, inputs, [o[0] for o in outputs], name=name, domain=domain or None,
                                     **(attrs or {}))
        else:
            proto.name = name
        self.nodes.append(proto)
        for o, elem, shape in outputs:
            if o:
                self.elem[o], self.shape[o] = elem, shape
        kind = ("cann_operator" if domain == CANN_DOMAIN else "ascend_c_kernel" if domain == KERNEL_DOMAIN
                else "onnx_standard_op")
        entry = {"index": len(self.plan), "name": name, "op": op, "domain": domain or "ai.onnx", "kind": kind,
                 "attributes": {a.name: _attr_json(helper.get_attribute_value(a)) for a in proto.attribute},
                 "inputs": [{"name": i, "dtype": tname(self.elem[i]) if i in self.elem else None,
                             "shape": self.shape.get(i)} if i else None for i in inputs],
                 "outputs": [{"name": o, "dtype": tname(e), "shape": s} for o, e, s in outputs if o],
                 "from": None if src is None else {"node": src.name, "op": src.qualified_op}}
        if domain == CANN_DOMAIN:
            entry["aclnn"] = CANN_OPS[op]
        if domain == KERNEL_DOMAIN:
            entry["kernel"] = f"kernels/{POLYPORT_KERNELS[op]}.cpp"
        if note:
            entry["note"] = note
        self.plan.append(entry)
        return [o[0] for o in outputs]

    def out(self, v: Value, elem: int, shape=None) -> tuple[str, int, Optional[list]]:
        name = self.fresh(v.name)
        self.names[v] = name
        return (name, elem, dims(v.shape) if shape is None else shape)

    def ints(self, values, base: str) -> str:
        return self.const(np.asarray(values, np.int64), base)

    # ---- the walk --------------------------------------------------------------------------------
    def run(self) -> None:
        g = self.graph
        self.used.update(v.name for v in g.outputs)      # graph outputs keep their signature names
        self.declare_inputs(g.inputs)
        self.walk()
        self.outputs = self.declare_outputs(g.outputs)

    def declare_inputs(self, values) -> None:
        for v in values:
            t = v.type
            if not isinstance(t, TensorType) or t.dtype is None:
                raise PolyportError(f"ascend: input {v.name} has type {t}; only tensors can be lowered")
            self.used.add(v.name)
            self.elem[v.name], self.shape[v.name] = t.dtype.onnx, dims(t.shape)
            self.names[v] = v.name
            if t.dtype.onnx in FLOATS and t.dtype.onnx != self.compute:
                self.names[v] = self.get(v, self.compute)

    def walk(self) -> None:
        """Emit every node in order; a lowering may emit a later node first (adding it to `done`)."""
        for node in self.graph.nodes:
            if node in self.done:
                continue
            self.lower(node)
        self.current = None

    def lower(self, node: Node) -> None:
        self.current = node
        self.done.add(node)
        if node.domain == POLYPORT_DOMAIN:
            fn = LOWERINGS.get(node.op_type)
            if fn is None:
                raise PolyportError(f"ascend: node {node.name} ({node.qualified_op}) has no Ascend mapping")
            fn(self, node)
        elif node.domain == "":
            self.standard(node)
        else:
            raise PolyportError(f"ascend: node {node.name} ({node.qualified_op}): domain {node.domain!r} "
                                "is not supported by CANN's ONNX parser")

    def declare_outputs(self, values) -> list:
        outs = []
        for v in values:
            t = v.type
            name = self.get(v)
            if name != v.name:   # the graph output keeps its signature name and dtype
                if self.elem[name] != t.dtype.onnx:
                    self.emit("Cast", [name], [(v.name, t.dtype.onnx, dims(t.shape))], {"to": t.dtype.onnx},
                              note="graph output in its signature dtype")
                else:
                    self.emit("Identity", [name], [(v.name, t.dtype.onnx, dims(t.shape))], note="graph output")
                name = v.name
            outs.append(helper.make_tensor_value_info(name, t.dtype.onnx, dims(t.shape)))
        return outs

    def standard(self, node: Node) -> None:
        own = DECOMPOSED.get(node.op_type)
        if own is not None:
            return own(self, node)
        if node.op_type not in CANN_ONNX_OPS:
            raise L.LimitError(f"node {node.name}: standard op {node.op_type} is not in CANN's ONNX operator "
                               f"support list (polyport's transcription, targets/ascend/emission.py CANN_ONNX_OPS)")
        if any(True for _ in node.subgraphs()):
            raise PolyportError(f"ascend: node {node.name} ({node.op_type}): control flow is not lowered")
        floats = [self.float_elem(v) for v in node.inputs if v is not None]
        computed = [e for e in floats if e in FLOATS]
        float_ins = [v for v in node.inputs if v is not None and v.dtype is not None and v.dtype.onnx in FLOATS]
        target = F32 if computed and self.compute not in computed else self.compute
        if node.op_type == "Cast":
            target = None
        names = [self.get(v, target if v is not None and v in float_ins else None) for v in node.inputs]
        proto = node_to_proto(node, names, [], {"": OPSET})
        outs = []
        for v in node.outputs:
            t = v.type
            elem = t.dtype.onnx if isinstance(t, TensorType) and t.dtype is not None else None
            if elem is None:
                raise PolyportError(f"ascend: node {node.name}: output {v.name} has no known dtype")
            if node.op_type == "Cast":
                src = self.elem.get(names[0])
                if elem in FLOATS:
                    elem = src if src in FLOATS else F32
                    for a in proto.attribute:
                        if a.name == "to":
                            a.i = elem
            elif elem in FLOATS and float_ins:
                elem = target
            outs.append(self.out(v, elem))
        proto.output.extend(o[0] for o in outs)
        self.emit(node.op_type, names, outs, proto=proto)

    def shape_value(self, node: Node) -> None:
        inits: list = []
        protos = self.shape_values.protos(node, inits)
        for t in inits:
            self.inits.append(t)
            self.used.add(t.name)
            self.elem[t.name], self.shape[t.name] = t.data_type, list(t.dims)
        v = node.outputs[0]
        self.names[v] = v.name
        self.used.add(v.name)
        for p in protos:
            for o in p.output:
                self.elem[o] = TensorProto.INT64
                self.shape.setdefault(o, None)
                self.used.add(o)
            self.shape[v.name] = dims(v.shape)
            self.emit(p.op_type, list(p.input), [(o, TensorProto.INT64, self.shape.get(o)) for o in p.output],
                      proto=p, note="shape arithmetic")

    # ---- checks shared by the fused lowerings ----------------------------------------------------
    def device_dtype(self, node: Node, v: Value, op: str) -> str:
        """The dtype `v` has on the device (f32/f16 activations run as the compute dtype)."""
        dt = v.dtype
        name = dt.name if dt is not None else "?"
        if name in ("f32", "f16"):
            return tname(self.compute)
        if name == "bf16":
            return "bfloat16"
        return {"f64": "float64", "i8": "int8", "i32": "int32", "i64": "int64"}.get(name, name)

    def check(self, node: Node, op: str, facts: dict) -> list[str]:
        return L.check(node.name, op, facts, self.fallbacks)


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker at opset <= 18, and only allowed ops in each domain."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise PolyportError(f"ascend: the emitted ONNX model fails onnx.checker: {e}") from None
    for n in model.graph.node:
        ok = (n.op_type in CANN_ONNX_OPS if n.domain in ("", "ai.onnx") else
              n.op_type in CANN_OPS if n.domain == CANN_DOMAIN else
              n.op_type in POLYPORT_KERNELS if n.domain == KERNEL_DOMAIN else False)
        if not ok:
            raise PolyportError(f"ascend: emitted node {n.name} ({n.domain}::{n.op_type}) is not an allowed op")


lowers("ShapeValue")(Emitter.shape_value)


def _attr_json(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (list, tuple)):
        return [_attr_json(x) for x in v]
    if isinstance(v, TensorProto):
        return {"tensor": tname(v.data_type), "dims": list(v.dims)}
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v
