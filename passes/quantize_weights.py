"""Weight-only quantization at compile time (`polyport compile --quantize int8|int4|fp8`), and 16-bit
weights (`--dtype bf16|f16`: the same rewrite, the weights rounded to 16-bit floats, no scales).

Every dense linear weight (a MatMul over a constant f32 [K, N] weight) becomes polyport::QuantMatMul over
symmetric per-group codes (ir/quant_layout.py: int8, int4 two per byte, e4m3 with per-block scales;
one scale per `group_size` consecutive k of an output column). The LM head (the MatMul producing a
graph output) only with `lm_head`. The fused GatedMLP's and MoE's weights are quantized the same way
(the MoE's per expert) and stay inside the fused op, K first (ir/fused/mlp.py, moe.py). With bf16 / f16,
a SiLU GatedMLP becomes three QuantMatMuls over 16-bit weights, and the MoE's router and expert weights
are stored in that dtype. The token-embedding table (a Gather over a constant [vocab, hidden] table,
indexed by a graph input) only with `embeddings`: polyport::QuantGather over the same codes, groups
along hidden, one row per token; a quantized LM head tied to it (equal to its transpose) reads the same
codes, stored once. Left in f32, and counted: the MoE router, the embeddings without
`embeddings`, a weight also read by another op, 16-bit GatedMLPs with another activation or a clamp.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import ml_dtypes
import numpy as np

from ..errors import PolyportError
from ..ir import fused
from ..ir.fused.moe import MOE_INPUTS
from ..ir.graph import Graph, Node, Value
from ..ir.ops import attrs_of
from ..ir.quant_layout import FLOAT16, SCHEMES, quantize, quantize_experts, to_float16
from ..ir.types import TensorType
from ..ir.verifier import verify

GROUP_SIZES = (32, 64, 128)
FLOAT16_NUMPY = {"bf16": ml_dtypes.bfloat16, "f16": np.float16}


@dataclasses.dataclass(frozen=True)
class WeightQuantization:
    scheme: str                  # int8 | int4 | fp8 | bf16 | f16
    group_size: int = 32         # (not used by bf16 / f16)
    lm_head: bool = False
    embeddings: bool = False

    def __post_init__(self):
        if self.scheme not in SCHEMES + FLOAT16:
            raise PolyportError(f"--quantize {self.scheme}: unknown scheme; known: {', '.join(SCHEMES)}")
        if self.scheme in SCHEMES and self.group_size not in GROUP_SIZES:
            raise PolyportError(f"--group-size {self.group_size}: takes {', '.join(map(str, GROUP_SIZES))}")


def _weight(v: Optional[Value]) -> bool:
    return v is not None and v.is_constant and v.const.ndim == 2 and v.const.dtype == np.float32


def _only_matmul_weight(v: Value) -> bool:
    return all(n.qualified_op in ("MatMul", "polyport::GatedMLP") and i >= 1 for n, i in v.uses) \
        and not v.is_graph_output


def _is_lm_head(node: Node) -> bool:
    out = node.outputs[0]
    if out.is_graph_output:
        return True
    users = out.users
    return len(users) == 1 and users[0].op_type in ("Reshape", "Identity") and users[0].outputs[0].is_graph_output


def _float_input(x: Value) -> bool:
    return isinstance(x.type, TensorType) and x.dtype is not None and x.dtype.name in ("f32", "f16") \
        and x.type.rank is not None and x.type.rank >= 1


class _Quantizer:
    def __init__(self, graph: Graph, spec: WeightQuantization):
        self.graph, self.spec = graph, spec
        self.codes: dict[int, list[Value]] = {}     # one quantized copy per weight, shared by its users
        self.tables: list[Value] = []                # embedding tables quantized (their codes in `codes`)
        self.counts: collections.Counter = collections.Counter()
        self.expert_weights = 0                      # quantized inside a fused MoE / GatedMLP

    def operands(self, w: Value, rows: bool = False) -> list[Value]:
        """w's codes (and scales) as QuantMatMul's operands; with `rows` w is a table [N, K] read by row."""
        if id(w) not in self.codes:
            scheme = self.spec.scheme
            kn = w.const.T if rows else w.const
            qw = to_float16(kn, scheme) if scheme in FLOAT16 else quantize(kn, scheme, self.spec.group_size)
            g = self.graph
            ops = [g.add_constant(g.unique_name(f"{w.name}/{scheme}"), qw.qweight)]
            if qw.scales is not None:
                ops.append(g.add_constant(g.unique_name(f"{w.name}/scales"), qw.scales))
            self.codes[id(w)] = (ops, qw.attrs)
        return self.codes[id(w)]

    def qmatmul(self, x: Value, w: Value, before: Node, out: Optional[Value] = None) -> Value:
        ops, attrs = self.operands(w)
        t = TensorType(x.dtype, None if x.type.shape is None else x.type.shape[:-1] + (attrs["N"],))
        y = fused.build(self.graph, "QuantMatMul", [x] + ops, attrs, t, before=before, name="QuantMatMul")
        if out is not None:
            if out.is_graph_output:
                y.name, out.name = out.name, y.name
            out.replace_all_uses_with(y)
        return y

    def matmul(self, node: Node) -> None:
        x, w = node.inputs
        if not (_weight(w) and _only_matmul_weight(w) and _float_input(x)):
            if _weight(w):
                self.counts["f32: MatMul weight also read elsewhere"] += 1
            return
        if _is_lm_head(node) and not self.spec.lm_head:
            self.counts["f32: LM head"] += 1
            return
        if _is_lm_head(node):
            self.tie(w)
        self.qmatmul(x, w, node, out=node.outputs[0])
        self.graph.remove(node)
        self.counts["MatMul"] += 1

    def tie(self, w: Value) -> None:
        """An LM head tied to a quantized embedding table (an export folds the shared table's transpose into a
        second constant) reads the table's codes: QuantMatMul's [N, K] layout is the table's [vocab, hidden]."""
        for t in self.tables:
            if t.const.shape == w.const.shape[::-1] and np.array_equal(t.const[:2], w.const[:, :2].T) \
                    and np.array_equal(t.const.T, w.const):
                self.codes[id(w)] = self.codes[id(t)]
                self.counts["LM head: the embedding table's codes"] += 1
                return

    def gather(self, node: Node) -> None:
        """The token embedding: a Gather (axis 0) of a constant [vocab, hidden] f32 table by a graph input."""
        table, ids = node.inputs
        if node.attrs.get("axis", 0) != 0 or not _weight(table) or ids not in self.graph.inputs:
            return
        if not all(n is node for n, _ in table.uses) or table.is_graph_output:
            self.counts["f32: embeddings also read elsewhere"] += 1
            return
        if not self.spec.embeddings:
            self.counts["f32: embeddings"] += 1
            return
        ops, attrs = self.operands(table, rows=True)
        self.tables.append(table)
        out = node.outputs[0]
        y = fused.build(self.graph, "QuantGather", [ids] + ops, attrs, out.type, before=node, name=node.name)
        if out.is_graph_output:
            y.name, out.name = out.name, y.name
        out.replace_all_uses_with(y)
        self.graph.remove(node)
        self.counts["embeddings"] += 1

    def gated_mlp(self, node: Node) -> None:
        x, wg, wu, wd = node.inputs
        a = attrs_of(node)
        if not all(_weight(w) and _only_matmul_weight(w) for w in (wg, wu, wd)) or not _float_input(x) or \
                (self.spec.scheme == "int4" and any(w.const.shape[0] % 2 for w in (wg, wu, wd))):
            self.counts["f32: GatedMLP (shared, non-constant or odd-K int4 weights)"] += 1
            return
        if self.spec.scheme in SCHEMES:      # the fused op keeps them: codes K first (ir/fused/mlp.py)
            g = self.graph
            codes, scales = [], []
            for w in (wg, wu, wd):
                c, sc, qattrs = quantize_experts(w.const[None], self.spec.scheme, self.spec.group_size)
                codes.append(g.add_constant(g.unique_name(f"{w.name}/{self.spec.scheme}"), c[0]))
                scales.append(g.add_constant(g.unique_name(f"{w.name}/scales"), sc[0]))
            y = fused.build(g, "GatedMLP", [x] + codes + scales, {**a, **qattrs}, node.outputs[0].type,
                            before=node, name=node.name)
            out = node.outputs[0]
            if out.is_graph_output:
                y.name, out.name = out.name, y.name
            out.replace_all_uses_with(y)
            g.remove(node)
            self.expert_weights += 3
            self.counts["GatedMLP"] += 1
            return
        if a["activation"] != "silu" or a["clamp"]:
            self.counts["f32: GatedMLP (activation or clamp, 16-bit weights)"] += 1
            return
        g = self.qmatmul(x, wg, node)
        u = self.qmatmul(x, wu, node)
        sig = self.graph.make_node("Sigmoid", [g], types=[g.type], before=node).outputs[0]
        act = self.graph.make_node("Mul", [g, sig], types=[g.type], before=node).outputs[0]
        h = self.graph.make_node("Mul", [act, u], types=[g.type], before=node).outputs[0]
        self.qmatmul(h, wd, node, out=node.outputs[0])
        self.graph.remove(node)
        self.counts["GatedMLP"] += 1


    def moe(self, node: Node) -> None:
        """The router stays f32 (tiny, and it picks the experts). Quantized schemes: each expert weight
        [E, K, N] becomes codes [E, K / 2 | K, N] + scales [E, KB, N] (ir/fused/moe.py), read by the fused
        MoE's kernels as codes. 16-bit schemes: the router and expert weights in that dtype (the kernel
        converts them in registers)."""
        ws = [node.inputs[i] for i in (1, 3, 4, 5)]
        fits = all(w is not None and w.is_constant and w.const.dtype == np.float32 and not w.is_graph_output
                   and all(n is node for n, _ in w.uses) for w in ws)
        scheme = self.spec.scheme
        if fits and scheme in SCHEMES and not (scheme == "int4" and any(w.const.shape[1] % 2 for w in ws[1:])):
            self.quantized_moe(node, ws[1:])
            return
        if not fits or scheme not in FLOAT16:
            self.counts["f32: MoE experts (shared, non-constant or odd-K int4 weights)"] += 1
            return
        dt = FLOAT16_NUMPY[scheme]
        for i, w in zip((1, 3, 4, 5), ws):
            node.set_input(i, self.graph.add_constant(self.graph.unique_name(f"{w.name}/{scheme}"),
                                                      w.const.astype(dt)))
        self.counts["MoE"] += 1

    def quantized_moe(self, node: Node, experts: list[Value]) -> None:
        g, scheme = self.graph, self.spec.scheme
        codes, scales = [], []
        for w in experts:
            c, sc, qattrs = quantize_experts(w.const, scheme, self.spec.group_size)
            codes.append(g.add_constant(g.unique_name(f"{w.name}/{scheme}"), c))
            scales.append(g.add_constant(g.unique_name(f"{w.name}/scales"), sc))
        ins = list(node.inputs) + [None] * (len(MOE_INPUTS) - len(node.inputs))
        ins[3:6], ins[8:11] = codes, scales           # gpt-oss's biases (11-14) stay f32 beside the codes
        while ins[-1] is None:
            ins.pop()
        attrs = {**attrs_of(node), **qattrs}
        y = fused.build(g, "MoE", ins, attrs, node.outputs[0].type, before=node, name=node.name)
        out = node.outputs[0]
        if out.is_graph_output:
            y.name, out.name = out.name, y.name
        out.replace_all_uses_with(y)
        g.remove(node)
        self.expert_weights += len(experts)
        self.counts["MoE"] += 1


def quantize_weights(graph: Graph, spec: WeightQuantization) -> dict:
    """Quantize `graph`'s linear weights in place; returns the manifest's `quantization` entry."""
    qz = _Quantizer(graph, spec)
    for node in list(graph.nodes):
        if node.qualified_op == "MatMul":
            qz.matmul(node)
        elif node.qualified_op == "Gather":
            qz.gather(node)
        elif node.qualified_op == "polyport::GatedMLP":
            qz.gated_mlp(node)
        elif node.qualified_op == "polyport::MoE":
            qz.moe(node)
    graph.remove_unused()
    verify(graph)
    entry = {"scheme": spec.scheme, "lm_head": spec.lm_head, "embeddings": spec.embeddings,
             "weights": len({id(ops[0]) for ops, _ in qz.codes.values()}) + qz.expert_weights,
             "layers": dict(sorted(qz.counts.items()))}
    table = "; the embedding table [vocab, hidden] stored as [N, K]" if qz.counts["embeddings"] else ""
    if spec.scheme in FLOAT16:
        return {**entry, "format": f"{spec.scheme} weights [N, K] (bf16 as uint16 bit patterns), f32 activations "
                                   "and accumulation" + table}
    return {**entry, "group_size": spec.group_size, "symmetric": True,
            "format": {"int8": "int8 codes", "int4": "int4 codes, two per byte (low nibble: even k)",
                       "fp8": "float8 e4m3fn codes"}[spec.scheme] + ", one f32 scale per group of k per column"
                      + table}
