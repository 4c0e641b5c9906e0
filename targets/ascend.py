"""The ascend target: what an Ascend (CANN) deployment consumes, checked against CANN's limits.

No CANN toolkit exists where polyport is built: everything here is GENERATED AND
CHECKED, NEVER RUN ON ASCEND. The artifact's `ascend/` folder holds

    model.onnx      opset 18 (what ATC accepts), fp16 weights; standard ops only from
                    CANN_ONNX_OPS; each fused op a node (or a chain of nodes) in the custom
                    domain CANN_DOMAIN named after the CANN operator it maps to:
                      Attention -> FusedInferAttentionScore (BNSD, sparse_mode, pre/next_tokens;
                                   sinks via its softmax_lse output: out * sigmoid(lse - sink))
                      MoE       -> MoeGatingTopK -> MoeInitRoutingV2 -> GroupedMatmul (gate|up)
                                   -> SwiGlu -> GroupedMatmul (down) -> MoeFinalizeRoutingV2
                      RMSNorm   -> RmsNorm
                      Rotary    -> RotaryPositionEmbedding (mode half / interleave)
                      GatedMLP  -> MatMul (gate|up concatenated) -> SwiGlu -> MatMul
                    and the ops CANN lacks in KERNEL_DOMAIN (polyport's Ascend C kernels).
    op_plan.json    every call in order: op, domain, kind, attributes, input/output dtypes and
                    shapes (symbolic dims as text), the IR node it came from
    atc.sh          the atc command line (generated, not run)
    kernels/        msopgen op descriptions (JSON) and Ascend C sources for polyport's kernels

Rotary maps to aclnnRotaryPositionEmbedding (one tensor, mode 0 half / 1 interleave),
not aclnnApplyRotaryPosEmb: the latter rotates q and k together in place in BSND
layout, while the IR's Rotary is per tensor in BNSD.
"""
from __future__ import annotations

import json
import math
import string
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import PolyportError
from ..ir.graph import Graph, Node, Value
from ..ir.onnx_proto import node_to_proto
from ..ir.ops import POLYPORT_DOMAIN
from ..ir.symbolic import SymExpr
from ..ir.types import TensorType
from . import ascend_limits as L
from .base import CompileOptions, Target, register_target
from .devices import ASCEND_910B3

CANN_DOMAIN = "com.huawei.cann"          # CANN built-in operators (ATC maps them by op type)
KERNEL_DOMAIN = "polyport.ascendc"        # polyport's own Ascend C kernels (kernels/*.cpp)
OPSET = 18                                # the newest default-domain opset ATC's ONNX parser accepts
SOC = "Ascend910B3"
NOT_RUN = ("generated and checked by polyport; NOT compiled with atc and NOT run on an Ascend device "
           "(no CANN toolkit or Ascend hardware was available)")
INT_MAX = 2147483647
KERNEL_TEMPLATES = Path(__file__).parent / "kernels" / "ascend"

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
    "MoeGatingTopK": "aclnnMoeGatingTopK",
    "MoeInitRoutingV2": "aclnnMoeInitRoutingV2",
    "GroupedMatmul": "aclnnGroupedMatmulV4",
    "SwiGlu": "aclnnSwiGlu",
    "MoeFinalizeRoutingV2": "aclnnMoeFinalizeRoutingV2",
    "RmsNorm": "aclnnRmsNorm",
    "RotaryPositionEmbedding": "aclnnRotaryPositionEmbedding",
}
POLYPORT_KERNELS = {
    "MoeGatingTopKSqrtSoftplus": "moe_gating_topk_sqrtsoftplus",
    "MoeHashRoutingGate": "moe_hash_routing_gate",
}

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def _dims(shape) -> Optional[list]:
    if shape is None:
        return None
    return [d if isinstance(d, int) else (str(d) if d is not None else None) for d in shape]


def _tname(elem: int) -> str:
    return helper.tensor_dtype_to_np_dtype(elem).name if elem != TensorProto.BFLOAT16 else "bfloat16"


class _Lowering:
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
        self.sym_cache: dict[str, str] = {}
        self.fia_mask: Optional[str] = None
        from ..frontend.onnx_export import _Exporter
        self.exporter = _Exporter(graph)

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
                                                   else f"{v.name}__{_tname(want)}")
            return self.const_names[key]
        name = self.names[v]
        have = self.elem[name]
        if want is None or have == want or have not in FLOATS:
            return name
        key = (name, want)
        if key not in self.casts:
            out = self.fresh(f"{name}__{_tname(want)}")
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
                 "inputs": [{"name": i, "dtype": _tname(self.elem[i]) if i in self.elem else None,
                             "shape": self.shape.get(i)} if i else None for i in inputs],
                 "outputs": [{"name": o, "dtype": _tname(e), "shape": s} for o, e, s in outputs if o],
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
        return (name, elem, _dims(v.shape) if shape is None else shape)

    def ints(self, values, base: str) -> str:
        return self.const(np.asarray(values, np.int64), base)

    # ---- the walk --------------------------------------------------------------------------------
    def run(self) -> None:
        g = self.graph
        self.used.update(v.name for v in g.outputs)      # graph outputs keep their signature names
        for v in g.inputs:
            t = v.type
            if not isinstance(t, TensorType) or t.dtype is None:
                raise PolyportError(f"ascend: input {v.name} has type {t}; only tensors can be lowered")
            self.used.add(v.name)
            self.elem[v.name], self.shape[v.name] = t.dtype.onnx, _dims(t.shape)
            self.names[v] = v.name
            if t.dtype.onnx in FLOATS and t.dtype.onnx != self.compute:
                self.names[v] = self.get(v, self.compute)
        for node in g.nodes:
            self.current = node
            if node.domain == POLYPORT_DOMAIN:
                fn = getattr(self, f"lower_{node.op_type}", None)
                if fn is None:
                    raise PolyportError(f"ascend: node {node.name} ({node.qualified_op}) has no Ascend mapping")
                fn(node)
            elif node.domain == "":
                self.standard(node)
            else:
                raise PolyportError(f"ascend: node {node.name} ({node.qualified_op}): domain {node.domain!r} "
                                    "is not supported by CANN's ONNX parser")
        self.current = None
        outs = []
        for v in g.outputs:
            t = v.type
            name = self.get(v)
            if name != v.name:   # the graph output keeps its signature name and dtype
                if self.elem[name] != t.dtype.onnx:
                    self.emit("Cast", [name], [(v.name, t.dtype.onnx, _dims(t.shape))], {"to": t.dtype.onnx},
                              note="graph output in its signature dtype")
                else:
                    self.emit("Identity", [name], [(v.name, t.dtype.onnx, _dims(t.shape))], note="graph output")
                name = v.name
            outs.append(helper.make_tensor_value_info(name, t.dtype.onnx, _dims(t.shape)))
        self.outputs = outs

    def standard(self, node: Node) -> None:
        own = getattr(self, f"standard_{node.op_type}", None)    # opset > 18 ops CANN lacks, decomposed
        if own is not None:
            return own(node)
        if node.op_type not in CANN_ONNX_OPS:
            raise L.LimitError(f"node {node.name}: standard op {node.op_type} is not in CANN's ONNX operator "
                               f"support list (polyport's transcription, targets/ascend.py CANN_ONNX_OPS)")
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

    def lower_ShapeValue(self, node: Node) -> None:
        inits: list = []
        protos = self.exporter._shape_value(node, self.sym_cache, inits)
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
            self.shape[v.name] = _dims(v.shape)
            self.emit(p.op_type, list(p.input), [(o, TensorProto.INT64, self.shape.get(o)) for o in p.output],
                      proto=p, note="shape arithmetic")

    # ---- checks shared by the fused lowerings ----------------------------------------------------
    def device_dtype(self, node: Node, v: Value, op: str) -> str:
        """The dtype `v` has on the device (f32/f16 activations run as the compute dtype)."""
        dt = v.dtype
        name = dt.name if dt is not None else "?"
        if name in ("f32", "f16"):
            return _tname(self.compute)
        if name == "bf16":
            return "bfloat16"
        return {"f64": "float64", "i8": "int8", "i32": "int32", "i64": "int64"}.get(name, name)

    def check(self, node: Node, op: str, facts: dict) -> list[str]:
        return L.check(node.name, op, facts, self.fallbacks)

    # ---- RMSNorm -> RmsNorm ----------------------------------------------------------------------
    def lower_RMSNorm(self, node: Node) -> None:
        x, w = node.inputs
        self.check(node, "RmsNorm", {"dtype": self.device_dtype(node, x, "RmsNorm")})
        xs = _dims(x.shape)
        y = self.out(node.outputs[0], self.compute)
        rstd = (self.fresh(f"{node.name}_rstd"), F32, None if xs is None else xs[:-1] + [1])
        self.emit("RmsNorm", [self.get(x, self.compute), self.get(w, self.compute)], [y, rstd],
                  {"epsilon": float(node.attrs["epsilon"])}, CANN_DOMAIN)

    # ---- Rotary -> RotaryPositionEmbedding -------------------------------------------------------
    def lower_Rotary(self, node: Node) -> None:
        x, cos, sin = node.inputs
        d = x.shape[-1]
        rd = node.attrs.get("rotary_dim", 0) or d
        mode = "interleave" if node.attrs.get("interleaved", 0) else "half"
        self.check(node, "RotaryPositionEmbedding", {"dtype": self.device_dtype(node, x, "RotaryPositionEmbedding"),
                                                     "head_dim": rd, "mode": mode})
        xn = self.get(x, self.compute)
        xs = _dims(x.shape)
        c, s = self.get(cos, self.compute), self.get(sin, self.compute)
        if rd == d:
            self.emit("RotaryPositionEmbedding", [xn, c, s], [self.out(node.outputs[0], self.compute)],
                      {"mode": 0 if mode == "half" else 1}, CANN_DOMAIN)
            return
        if not isinstance(d, int):
            raise PolyportError(f"node {node.name}: partial rotary needs a static head dim, got {d}")
        axes = self.ints([-1], f"{node.name}_axes")
        rot = self.emit("Slice", [xn, self.ints([0], f"{node.name}_s0"), self.ints([rd], f"{node.name}_e0"), axes],
                        [(self.fresh(f"{node.name}_rot"), self.compute, xs[:-1] + [rd])],
                        note="partial rotary: rotated part")[0]
        rest = self.emit("Slice", [xn, self.ints([rd], f"{node.name}_s1"), self.ints([d], f"{node.name}_e1"), axes],
                         [(self.fresh(f"{node.name}_pass"), self.compute, xs[:-1] + [d - rd])],
                         note="partial rotary: pass-through part")[0]
        y = self.emit("RotaryPositionEmbedding", [rot, c, s],
                      [(self.fresh(f"{node.name}_roped"), self.compute, xs[:-1] + [rd])],
                      {"mode": 0 if mode == "half" else 1}, CANN_DOMAIN)[0]
        self.emit("Concat", [y, rest], [self.out(node.outputs[0], self.compute)], {"axis": -1})

    # ---- Attention -> FusedInferAttentionScore ---------------------------------------------------
    def lower_Attention(self, node: Node) -> None:
        q, k, v = node.inputs[:3]
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        sinks = node.inputs[4] if len(node.inputs) > 4 else None
        a = node.attrs
        causal, window = bool(a.get("causal", 0)), int(a.get("window", 0))
        dqk, dv = q.shape[-1], v.shape[-1]
        if mask is not None and mask.dtype is not None and mask.dtype.name == "bool" and (causal or window):
            raise L.LimitError(f"node {node.name}: CANN FusedInferAttentionScore takes one atten_mask; a boolean "
                               "mask combined with causal/window masking is not lowered (sparse_mode 0 needs the "
                               "full combined mask)")
        if causal:
            sparse, pre, nxt = (4, window - 1, 0) if window else (3, INT_MAX, 0)
        else:
            sparse, pre, nxt = (4, window - 1, INT_MAX) if window else (0, INT_MAX, INT_MAX)
        d = max(dqk, dv) if isinstance(dqk, int) and isinstance(dv, int) else dqk
        facts = {"dtype": self.device_dtype(node, q, L.FIA), "input_layout": "BNSD", "head_dim": d,
                 "num_heads": a["num_heads"], "num_key_value_heads": a["kv_heads"], "sparse_mode": sparse,
                 "value_head_dim_equals_qk_head_dim": dqk == dv}
        if isinstance(q.shape[0], int):
            facts["batch"] = q.shape[0]
        self.check(node, L.FIA, facts)
        cd = self.compute

        def padded(val: Value, have: int, tag: str) -> str:
            name = self.get(val, cd)
            if have == d:
                return name
            pads = self.ints([0, 0, 0, 0, 0, 0, 0, d - have], f"{node.name}_{tag}_pads")
            return self.emit("Pad", [name, pads], [(self.fresh(f"{node.name}_{tag}_padded"), cd,
                                                    _dims(val.shape)[:-1] + [d])],
                             note=f"FIA needs equal q/k and v head dims: zero-pad {tag} {have} -> {d}")[0]

        qn, kn, vn = padded(q, dqk, "q"), padded(k, dqk, "k"), padded(v, dv, "v")
        pse = atten = ""
        if mask is not None:
            if mask.dtype.name == "bool":
                atten = self.emit("Not", [self.get(mask)], [(self.fresh(f"{node.name}_atten_mask"),
                                                            TensorProto.BOOL, _dims(mask.shape))],
                                  note="FIA atten_mask: true = masked out")[0]
            else:
                pse = self.get(mask, cd)
        elif sparse in (2, 3, 4) and self.fia_mask is not None:
            atten = self.fia_mask
        elif sparse in (2, 3, 4):
            # sparse_mode 2/3/4 take the fixed, compressed 2048 x 2048 upper-triangular mask (built once)
            shape = self.ints([2048, 2048], f"{node.name}_mask_shape")
            ones = self.emit("ConstantOfShape", [shape], [(self.fresh(f"{node.name}_ones"), TensorProto.BOOL,
                                                          [2048, 2048])], {"value": helper.make_tensor(
                                                              "value", TensorProto.BOOL, [1], [True])},
                             note="FIA compressed mask for sparse_mode 2/3/4")[0]
            atten = self.emit("Trilu", [ones, self.ints(1, f"{node.name}_diag")],
                              [(self.fresh(f"{node.name}_atten_mask"), TensorProto.BOOL, [2048, 2048])],
                              {"upper": 1}, note="FIA compressed mask for sparse_mode 2/3/4")[0]
            self.fia_mask = atten
        qs = _dims(q.shape)
        out_shape = qs[:-1] + [d]
        outs = [(self.fresh(f"{node.name}_fia_out"), cd, out_shape)]
        if sinks is not None:
            outs.append((self.fresh(f"{node.name}_softmax_lse"), F32, qs[:-1] + [1]))
        res = self.emit("FusedInferAttentionScore", [qn, kn, vn, pse, atten], outs,
                        {"num_heads": int(a["num_heads"]), "num_key_value_heads": int(a["kv_heads"]),
                         "scale": float(a["scale"]), "input_layout": "BNSD", "sparse_mode": sparse,
                         "pre_tokens": pre, "next_tokens": nxt, "inner_precise": 0,
                         "softmax_lse_flag": int(sinks is not None)}, CANN_DOMAIN)
        y = res[0]
        final = self.out(node.outputs[0], cd)
        if d != dv:
            target = (self.fresh(f"{node.name}_sliced"), cd, qs[:-1] + [dv]) if sinks is not None else final
            y = self.emit("Slice", [y, self.ints([0], f"{node.name}_o0"), self.ints([dv], f"{node.name}_o1"),
                                    self.ints([-1], f"{node.name}_oax")], [target],
                          note=f"drop the zero-padded value features {dv}..{d}")[0]
        if sinks is not None:
            nh = a["num_heads"]
            sink = self.get(sinks, F32)
            sink4 = self.emit("Reshape", [sink, self.ints([1, nh, 1, 1], f"{node.name}_sink_shape")],
                              [(self.fresh(f"{node.name}_sink4"), F32, [1, nh, 1, 1])],
                              note="attention sinks: FIA has no sink input; out * sigmoid(lse - sink) is exact")[0]
            diff = self.emit("Sub", [res[1], sink4], [(self.fresh(f"{node.name}_lse_minus_sink"), F32,
                                                      qs[:-1] + [1])])[0]
            gate = self.emit("Sigmoid", [diff], [(self.fresh(f"{node.name}_sink_gate"), F32, qs[:-1] + [1])])[0]
            gate16 = self.emit("Cast", [gate], [(self.fresh(f"{node.name}_sink_gate16"), cd, qs[:-1] + [1])],
                               {"to": cd})[0]
            self.emit("Mul", [y, gate16], [final])
        elif d == dv:
            # FIA's output is the node's output: rename in place
            self.nodes[-1].output[0] = final[0]
            self.plan[-1]["outputs"][0]["name"] = final[0]
            self.elem[final[0]], self.shape[final[0]] = cd, final[2]

    # ---- gated activations (SwiGlu, clamp and non-SiLU fallbacks) --------------------------------
    def gated(self, node: Node, h: str, rows: list, inter: int, activation: str, clamp: float) -> str:
        cd = self.compute
        self.check(node, "SwiGlu", {"dtype": _tname(cd), "split_dim_even": True})
        if not clamp and activation == "silu":
            return self.emit("SwiGlu", [h], [(self.fresh(f"{node.name}_swiglu"), cd, rows + [inter])],
                             {"dim": -1}, CANN_DOMAIN)[0]
        split = self.ints([inter, inter], f"{node.name}_split")
        g, u = self.emit("Split", [h, split], [(self.fresh(f"{node.name}_gate"), cd, rows + [inter]),
                                               (self.fresh(f"{node.name}_up"), cd, rows + [inter])], {"axis": -1},
                         note="split gate|up")
        if clamp:
            c = self.const(np.asarray(clamp, helper.tensor_dtype_to_np_dtype(cd)), f"{node.name}_clamp")
            nc = self.const(np.asarray(-clamp, helper.tensor_dtype_to_np_dtype(cd)), f"{node.name}_nclamp")
            g = self.emit("Min", [g, c], [(self.fresh(f"{node.name}_gate_clamped"), cd, rows + [inter])],
                          note="SwiGLU limit: CANN's SwiGlu has no clamp")[0]
            u = self.emit("Clip", [u, nc, c], [(self.fresh(f"{node.name}_up_clamped"), cd, rows + [inter])],
                          note="SwiGLU limit: CANN's SwiGlu has no clamp")[0]
        if activation == "silu":
            both = self.emit("Concat", [g, u], [(self.fresh(f"{node.name}_gate_up"), cd, rows + [2 * inter])],
                             {"axis": -1})[0]
            return self.emit("SwiGlu", [both], [(self.fresh(f"{node.name}_swiglu"), cd, rows + [inter])],
                             {"dim": -1}, CANN_DOMAIN)[0]
        msg = (f"node {node.name}: CANN SwiGlu is SiLU-only, activation {activation!r}; used fallback: "
               "decomposed standard ops (Erf/Tanh, Mul, Add)")
        warnings.warn(msg, L.AscendFallbackWarning, stacklevel=2)
        self.fallbacks.append({"node": node.name, "cann_op": "SwiGlu", "limit": "activation silu",
                               "actual": activation, "fallback": "decomposed standard ops", "message": msg})
        if activation not in ("gelu", "gelu_tanh"):
            raise PolyportError(f"node {node.name}: unknown activation {activation!r}")
        act = self.gelu(g, node.name, cd, rows + [inter], tanh=activation == "gelu_tanh")
        return self.emit("Mul", [act, u], [(self.fresh(f"{node.name}_gated"), cd, rows + [inter])])[0]

    def gelu(self, x: str, base: str, cd: int, sh, *, tanh: bool, out=None) -> str:
        """GELU in opset-18 ops (CANN's list has no Gelu): 0.5 x (1 + erf(x / sqrt 2)), or the tanh form."""
        npd = helper.tensor_dtype_to_np_dtype(cd)
        if not tanh:
            t = self.emit("Div", [x, self.const(np.asarray(math.sqrt(2.0), npd), f"{base}_sqrt2")],
                          [(self.fresh(f"{base}_gs"), cd, sh)])[0]
            t = self.emit("Erf", [t], [(self.fresh(f"{base}_erf"), cd, sh)])[0]
        else:
            cube = self.emit("Mul", [x, x], [(self.fresh(f"{base}_g2"), cd, sh)])[0]
            cube = self.emit("Mul", [cube, x], [(self.fresh(f"{base}_g3"), cd, sh)])[0]
            cube = self.emit("Mul", [cube, self.const(np.asarray(0.044715, npd), f"{base}_c")],
                             [(self.fresh(f"{base}_g3c"), cd, sh)])[0]
            t = self.emit("Add", [x, cube], [(self.fresh(f"{base}_inner"), cd, sh)])[0]
            t = self.emit("Mul", [t, self.const(np.asarray(0.7978845608028654, npd), f"{base}_k")],
                          [(self.fresh(f"{base}_inner2"), cd, sh)])[0]
            t = self.emit("Tanh", [t], [(self.fresh(f"{base}_tanh"), cd, sh)])[0]
        t = self.emit("Add", [t, self.const(np.asarray(1.0, npd), f"{base}_one")],
                      [(self.fresh(f"{base}_1p"), cd, sh)])[0]
        t = self.emit("Mul", [t, x], [(self.fresh(f"{base}_gx"), cd, sh)])[0]
        return self.emit("Mul", [t, self.const(np.asarray(0.5, npd), f"{base}_half")],
                         [out or (self.fresh(f"{base}_act"), cd, sh)])[0]

    def standard_Gelu(self, node: Node) -> None:
        """ONNX Gelu (opset 20; ATC takes opset 18): decomposed, computed in the compute dtype."""
        approx = node.attrs.get("approximate", "none")
        x = node.inputs[0]
        out = self.out(node.outputs[0], self.compute)
        self.gelu(self.get(x, self.compute), node.name, self.compute, out[2], tanh=approx == "tanh", out=out)

    def gate_up_weight(self, node: Node, wg: Value, wu: Value, axis: int) -> str:
        if wg.const is None or wu.const is None:
            raise PolyportError(f"node {node.name}: ascend needs constant expert/MLP weights")
        arr = np.concatenate([np.asarray(wg.const), np.asarray(wu.const)], axis=axis)
        return self.const(arr.astype(helper.tensor_dtype_to_np_dtype(self.compute)), f"{node.name}_w_gate_up")

    # ---- GatedMLP -> MatMul (gate|up) -> SwiGlu -> MatMul ----------------------------------------
    def lower_GatedMLP(self, node: Node) -> None:
        x, wg, wu, wd = node.inputs
        cd = self.compute
        xs = _dims(x.shape)
        inter = wg.shape[-1]
        w = self.gate_up_weight(node, wg, wu, -1)
        h = self.emit("MatMul", [self.get(x, cd), w], [(self.fresh(f"{node.name}_gate_up"), cd,
                                                      xs[:-1] + [2 * inter])], note="gate|up projection")[0]
        act = self.gated(node, h, xs[:-1], inter, node.attrs.get("activation", "silu"), node.attrs.get("clamp", 0.0))
        self.emit("MatMul", [act, self.get(wd, cd)], [self.out(node.outputs[0], cd)], note="down projection")

    # ---- MoE -> MoeGatingTopK -> MoeInitRoutingV2 -> GMM -> SwiGlu -> GMM -> MoeFinalizeRoutingV2 ------
    def lower_MoE(self, node: Node) -> None:
        x, router_w, e_bias, wg, wu, wd = node.inputs[:6]
        hash_table = node.inputs[6] if len(node.inputs) > 6 else None
        token_ids = node.inputs[7] if len(node.inputs) > 7 else None
        a = node.attrs
        cd = self.compute
        k, scoring = int(a["top_k"]), a.get("scoring", "softmax")
        groups, topk_group = int(a.get("n_group", 1)), int(a.get("topk_group", 1))
        e, hdim, inter = wg.shape[0], wg.shape[1], wg.shape[2]
        xs = _dims(x.shape)
        t = x.shape[0]
        for dim in x.shape[1:-1]:
            t = dim * t
        rows_t = [str(t) if isinstance(t, SymExpr) else t]
        xn = self.get(x, cd)
        if len(xs) != 2:
            xn = self.emit("Reshape", [xn, self.ints([-1, hdim], f"{node.name}_flat")],
                           [(self.fresh(f"{node.name}_x2d"), cd, rows_t + [hdim])], note="tokens as rows")[0]
        # router: fp32 as DeepSeek-V3/vLLM-Ascend keep it (the gate weight is tiny)
        x32 = self.emit("Cast", [xn], [(self.fresh(f"{node.name}_x_f32"), F32, rows_t + [hdim])], {"to": F32},
                        note="router in fp32")[0]
        logits = self.emit("MatMul", [x32, self.get(router_w, F32)],
                           [(self.fresh(f"{node.name}_router_logits"), F32, rows_t + [e])], note="router")[0]
        renorm = int(a.get("renormalize", 0))
        scaling = float(a.get("routed_scaling", 1.0))
        gate_outs = [(self.fresh(f"{node.name}_topk_weights"), F32, rows_t + [k]),
                     (self.fresh(f"{node.name}_topk_ids"), TensorProto.INT32, rows_t + [k])]
        if hash_table is not None:
            self.kernels.add("MoeHashRoutingGate")
            ids = self.get(token_ids)
            if len(token_ids.shape) != 1:
                ids = self.emit("Reshape", [ids, self.ints([-1], f"{node.name}_ids_flat")],
                                [(self.fresh(f"{node.name}_ids"), TensorProto.INT64, rows_t)])[0]
            table = self.const(np.asarray(hash_table.const).astype(np.int32), f"{node.name}_hash_table")
            w, idx = self.emit("MoeHashRoutingGate", [logits, ids, table], gate_outs,
                               {"k": k, "norm_type": scoring, "renorm": renorm,
                                "routed_scaling_factor": scaling, "eps": 1e-20}, KERNEL_DOMAIN,
                               note="CANN has no token->expert table routing: polyport Ascend C kernel")
        elif scoring == "sqrtsoftplus":
            self.kernels.add("MoeGatingTopKSqrtSoftplus")
            w, idx = self.emit("MoeGatingTopKSqrtSoftplus", [logits, self.get(e_bias, F32)], gate_outs,
                               {"k": k, "k_group": topk_group, "group_count": groups, "group_select_mode": 1,
                                "renorm": renorm, "routed_scaling_factor": scaling, "eps": 1e-20}, KERNEL_DOMAIN,
                               note="MoeGatingTopK has norm_type softmax/sigmoid only: polyport Ascend C kernel")
        else:
            facts = {"dtype": "float32", "expert_count": e, "k": k, "group_count": groups, "norm_type": scoring}
            if groups > 1:
                facts["experts_per_group"] = e // groups
            broken = [lim.name for lim in L.LIMITS[L.GATING] if lim.name in facts and not lim.ok(facts[lim.name])
                      and lim.fallback is not None]
            if broken and groups > 1:
                lim = next(l for l in L.LIMITS[L.GATING] if l.name == broken[0])
                raise L.LimitError(f"node {node.name}: CANN {L.GATING} requires {lim.describe()}, got "
                                   f"{facts[lim.name]!r} ({lim.source}); the decomposed fallback does not do "
                                   f"group-limited selection (n_group={groups})")
            if self.check(node, L.GATING, facts):
                w, idx = self.decomposed_gating(node, logits, e_bias, rows_t, e, k, scoring, renorm, scaling)
            else:
                w, idx = self.emit("MoeGatingTopK", [logits, self.get(e_bias, F32)], gate_outs,
                                   {"k": k, "k_group": topk_group, "group_count": groups, "group_select_mode": 1,
                                    "renorm": renorm, "norm_type": 0 if scoring == "softmax" else 1,
                                    "out_flag": 0, "routed_scaling_factor": scaling, "eps": 1e-20}, CANN_DOMAIN)
        self.check(node, "MoeInitRoutingV2", {"expert_count": e, "dtype": _tname(cd)})
        tk = t * k
        rows_tk = [str(tk) if isinstance(tk, SymExpr) else tk]
        ex, row_idx, counts = self.emit(
            "MoeInitRoutingV2", [xn, idx],
            [(self.fresh(f"{node.name}_expanded_x"), cd, rows_tk + [hdim]),
             (self.fresh(f"{node.name}_expanded_row_idx"), TensorProto.INT32, rows_tk),
             (self.fresh(f"{node.name}_expert_tokens_cumsum"), TensorProto.INT64, [e])],
            {"active_num": 0, "expert_capacity": 0, "expert_num": int(e), "drop_pad_mode": 0,
             "expert_tokens_count_or_cumsum_flag": 1, "expert_tokens_before_capacity_flag": 0}, CANN_DOMAIN)
        self.check(node, "GroupedMatmul", {"group_count": e, "dtype": _tname(cd), "k_dim": hdim, "n_dim": 2 * inter})
        w_gu = self.gate_up_weight(node, wg, wu, -1)
        gmm_attrs = {"split_item": 3, "group_type": 0, "group_list_type": 0, "act_type": 0}
        h = self.emit("GroupedMatmul", [ex, w_gu, counts],
                      [(self.fresh(f"{node.name}_gate_up"), cd, rows_tk + [2 * inter])], gmm_attrs, CANN_DOMAIN,
                      note="gate|up of every expert: weights [E, H, 2I]")[0]
        act = self.gated(node, h, rows_tk, inter, a.get("activation", "silu"), a.get("clamp", 0.0))
        down = self.emit("GroupedMatmul", [act, self.get(wd, cd), counts],
                         [(self.fresh(f"{node.name}_down"), cd, rows_tk + [hdim])], gmm_attrs, CANN_DOMAIN,
                         note="down of every expert: weights [E, I, H]")[0]
        scales = self.emit("Cast", [w], [(self.fresh(f"{node.name}_scales"), cd, rows_t + [k])], {"to": cd})[0]
        final = self.out(node.outputs[0], cd)
        fin_out = final if len(xs) == 2 else (self.fresh(f"{node.name}_y2d"), cd, rows_t + [hdim])
        y = self.emit("MoeFinalizeRoutingV2", [down, row_idx, "", "", "", scales, idx], [fin_out],
                      {"drop_pad_mode": 0}, CANN_DOMAIN)[0]
        if len(xs) != 2:
            shp = self.emit("Shape", [self.get(x, cd)], [(self.fresh(f"{node.name}_xshape"), TensorProto.INT64,
                                                         [len(xs)])])[0]
            self.emit("Reshape", [y, shp], [final])

    def decomposed_gating(self, node, logits, e_bias, rows, e, k, scoring, renorm, scaling):
        sh = rows + [e]
        scores = self.emit("Softmax" if scoring == "softmax" else "Sigmoid", [logits],
                           [(self.fresh(f"{node.name}_scores"), F32, sh)], {"axis": -1} if scoring == "softmax" else {},
                           note="decomposed gating (fallback)")[0]
        choice = scores
        if e_bias is not None:
            choice = self.emit("Add", [scores, self.get(e_bias, F32)], [(self.fresh(f"{node.name}_choice"), F32, sh)])[0]
        _, idx64 = self.emit("TopK", [choice, self.ints([k], f"{node.name}_k")],
                             [(self.fresh(f"{node.name}_topv"), F32, rows + [k]),
                              (self.fresh(f"{node.name}_topi"), TensorProto.INT64, rows + [k])], {"axis": 1})
        w = self.emit("GatherElements", [scores, idx64], [(self.fresh(f"{node.name}_w"), F32, rows + [k])],
                      {"axis": 1})[0]
        if renorm:
            s = self.emit("ReduceSum", [w, self.ints([-1], f"{node.name}_ax")],
                          [(self.fresh(f"{node.name}_wsum"), F32, rows + [1])], {"keepdims": 1})[0]
            s = self.emit("Add", [s, self.const(np.asarray(1e-20, np.float32), f"{node.name}_eps")],
                          [(self.fresh(f"{node.name}_wsum_eps"), F32, rows + [1])])[0]
            w = self.emit("Div", [w, s], [(self.fresh(f"{node.name}_wn"), F32, rows + [k])])[0]
        w = self.emit("Mul", [w, self.const(np.asarray(scaling, np.float32), f"{node.name}_scaling")],
                      [(self.fresh(f"{node.name}_topk_weights"), F32, rows + [k])])[0]
        idx = self.emit("Cast", [idx64], [(self.fresh(f"{node.name}_topk_ids"), TensorProto.INT32, rows + [k])],
                        {"to": TensorProto.INT32})[0]
        return w, idx


def _attr_json(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (list, tuple)):
        return [_attr_json(x) for x in v]
    if isinstance(v, TensorProto):
        return {"tensor": _tname(v.data_type), "dims": list(v.dims)}
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v


# ---- kernels, atc.sh -----------------------------------------------------------------------------
KERNEL_DESCS = {
    "MoeGatingTopKSqrtSoftplus": {
        "inputs": [("x", ["float"]), ("bias", ["float"], "optional")],
        "outputs": [("y", ["float"]), ("expert_idx", ["int32"])],
        "attrs": [("k", "int"), ("k_group", "int"), ("group_count", "int"), ("group_select_mode", "int"),
                  ("renorm", "int"), ("routed_scaling_factor", "float"), ("eps", "float")],
        "doc": "scores = sqrt(softplus(x)); choice = scores + bias; group-limited top-k over choice; "
               "y = scores[idx] (renormalised if renorm) * routed_scaling_factor",
    },
    "MoeHashRoutingGate": {
        "inputs": [("x", ["float"]), ("token_ids", ["int64"]), ("table", ["int32"])],
        "outputs": [("y", ["float"]), ("expert_idx", ["int32"])],
        "attrs": [("k", "int"), ("norm_type", "string"), ("renorm", "int"), ("routed_scaling_factor", "float"),
                  ("eps", "float")],
        "doc": "expert_idx = table[token_ids]; scores = softmax|sigmoid|sqrt(softplus)(x); "
               "y = scores[expert_idx] (renormalised if renorm) * routed_scaling_factor",
    },
}


def _msopgen_json(op: str) -> list[dict]:
    d = KERNEL_DESCS[op]
    def io(items):
        return [{"name": it[0], "param_type": it[2] if len(it) > 2 else "required", "format": ["ND"],
                 "type": it[1]} for it in items]
    return [{"op": op, "language": "cpp", "input_desc": io(d["inputs"]), "output_desc": io(d["outputs"]),
             "attr": [{"name": n, "param_type": "required", "type": t} for n, t in d["attrs"]]}]


def _write_kernels(out: Path, ops: set[str]) -> list[str]:
    files = []
    if not ops:
        return files
    kdir = out / "kernels"
    kdir.mkdir(exist_ok=True)
    for op in sorted(ops):
        stem = POLYPORT_KERNELS[op]
        (kdir / f"{stem}.json").write_text(json.dumps(_msopgen_json(op), indent=2) + "\n")
        src = string.Template((KERNEL_TEMPLATES / f"{stem}.cpp.in").read_text()).substitute(
            OP=op, STEM=stem, DOC=KERNEL_DESCS[op]["doc"], NOTE=NOT_RUN)
        (kdir / f"{stem}.cpp").write_text(src)
        files += [f"kernels/{stem}.json", f"kernels/{stem}.cpp"]
    return files


def _atc_script(graph: Graph, model_inputs: list, kernels: set[str]) -> str:
    shapes = []
    for v in model_inputs:
        t = v.type
        shapes.append(f"{v.name}:" + ",".join(str(d) if isinstance(d, int) else "-1" for d in t.shape))
    ranges = []
    for v in model_inputs:
        ranges.append(f"{v.name}:" + ",".join(str(d) if isinstance(d, int) else "1~4096" for d in v.type.shape))
    lines = [
        "#!/bin/sh",
        "# Generated by polyport: the ATC command that turns ascend/model.onnx into an offline model (.om).",
        f"# {NOT_RUN}.",
        "# Requires a CANN toolkit (set_env.sh sourced) and, when kernels/ exists, the polyport Ascend C custom",
        "# operators built and installed first (msopgen gen -i kernels/<op>.json -c ai_core-ascend910b -lan cpp).",
        "set -e",
        'cd "$(dirname "$0")"',
        "atc --framework=5 --model=model.onnx --output=model \\",
        f"    --soc_version={SOC} \\",
        f"    --input_shape=\"{';'.join(shapes)}\" \\",
        f"    --input_shape_range=\"{';'.join(ranges)}\" \\",
        "    --precision_mode=allow_fp32_to_fp16 \\",
        "    --log=error",
        "",
    ]
    return "\n".join(lines)


# ---- the target ----------------------------------------------------------------------------------


@register_target
class AscendTarget(Target):
    name = "ascend"
    devices = {"910b3": ASCEND_910B3}
    default_device = "910b3"

    def lower(self, graph: Graph, out_dir: Path, weights: Mapping[str, Any], options: CompileOptions) -> dict:
        out_dir = Path(out_dir)
        if options.dtype in ("f32", "f16"):
            compute = F16
        else:
            raise L.LimitError(f"ascend: compute dtype {options.dtype} is not supported: CANN's fused LLM "
                               f"operators take float16/bfloat16 and polyport's Ascend lowering emits float16 "
                               f"({L.DOCS})")
        archs = list(options.archs) or [SOC]
        for arch in archs:
            if arch != SOC:
                raise PolyportError(f"ascend: unknown soc_version {arch!r}; known: {SOC}")
        low = _Lowering(graph, compute)
        with warnings.catch_warnings(record=True):      # recorded in low.fallbacks; re-issued once below
            warnings.simplefilter("always", L.AscendFallbackWarning)
            low.run()
        for fb in low.fallbacks:      # re-issued outside the catch so callers see them
            warnings.warn(fb["message"], L.AscendFallbackWarning, stacklevel=2)
        inputs = [helper.make_tensor_value_info(v.name, v.type.dtype.onnx, _dims(v.type.shape)) for v in graph.inputs]
        gp = helper.make_graph(low.nodes, graph.name or "main", inputs, low.outputs, low.inits)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(CANN_DOMAIN, 1)]
        if low.kernels:
            opsets.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
        model = helper.make_model(gp, opset_imports=opsets, producer_name="polyport", ir_version=8)
        model.doc_string = f"polyport ascend lowering for {SOC}; {NOT_RUN}"
        check_model(model)
        onnx.save(model, str(out_dir / "model.onnx"))
        plan = {"soc_version": SOC, "compute_dtype": _tname(compute), "status": NOT_RUN,
                "note": "calls in execution order; shapes use the model's symbolic dims as text",
                "calls": low.plan}
        (out_dir / "op_plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        (out_dir / "atc.sh").write_text(_atc_script(graph, graph.inputs, low.kernels))
        kernel_files = _write_kernels(out_dir, low.kernels)
        cann_calls = sorted({c["op"] for c in low.plan if c["kind"] == "cann_operator"})
        return {
            "architectures": archs,
            "device": ASCEND_910B3.name,
            "status": NOT_RUN,
            "runtime": "emulated on CPU (no Ascend device): runtime/ascend_emulator.py runs model.onnx's op plan "
                       "with NumPy implementations of each CANN operator's documented contract in float16",
            "toolchain": {"cann": None, "atc": "not run (no CANN toolkit here)", "onnx_opset": OPSET},
            "compute_dtype": _tname(compute),
            "files": ["model.onnx", "op_plan.json", "atc.sh"] + kernel_files,
            "cann_operators": cann_calls,
            "custom_kernels": sorted(low.kernels),
            "fallbacks": low.fallbacks,
            "checked": ["onnx.checker.check_model (full_check) at opset 18",
                        "standard ops within CANN_ONNX_OPS (transcribed allow-list)",
                        "every fused node against targets/ascend_limits.py (transcribed, unverified limits)"],
            "not_checked": ["atc compilation", "execution or numerics on an Ascend device",
                            "the Ascend C kernels' compilation (no ccec/bisheng compiler here)"],
        }


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
