"""Already-fused ONNX / ONNX Runtime ops -> polyport's fused ops, at import.

A model that arrives with its attention, normalisation, RoPE or MoE already
fused (ONNX opset-23 `Attention` / `RMSNormalization` / `RotaryEmbedding`, or
ONNX Runtime's `com.microsoft` contrib ops) imports as the same polyport op a
fusion pass would produce from the unfused graph, so every target sees one op
per concept. Each (domain, op) has one small converter, registered with
`@converts`; the importer calls `converter_for(domain, op)` and, when there is
one, lets it emit the polyport op plus the standard nodes (Reshape, Transpose,
Concat, Add, ...) that adapt layouts such as BSH <-> BHSD.

A converter gets a `Conversion` (the node's IR inputs, attributes, output
Values and the graph) and returns one Value per ONNX output (None where the
output is absent). The Values it returns for the ONNX outputs are the
pre-made ones in `c.outputs` (emitted with `out=`), so the graph keeps the
file's value names. Anything the polyport op cannot express, and that extra
standard nodes cannot express exactly either, raises
`errors.UnsupportedOpError` naming the node, the op and the attribute, input
or output at fault; an optional output the polyport form cannot produce is an
error only when the model names it.

Semantics follow the ONNX spec (opset 23; Attention also 24/25) and, for
`com.microsoft` ops, ONNX Runtime's contrib-op schema as its CPU kernels
implement it (tests/test_fused_import.py compares against ONNX Runtime). Where
ONNX Runtime departs from a schema's text, the converter's docstring says which
behaviour it follows.

    op                                   imports as                  errors (UnsupportedOpError)
    Attention (ai.onnx 23-25)            Attention (+Concat cache)   qk_matmul_output
    RMSNormalization (ai.onnx 23)        RMSNorm                     stash_type != 1
    RotaryEmbedding (ai.onnx 23)         Rotary
    SimplifiedLayerNormalization         RMSNorm (+inv_std_var)      stash_type != 1
    SkipSimplifiedLayerNormalization     Add, RMSNorm (+sum, inv)    output `mean`
    com.microsoft RotaryEmbedding        Rotary                      is_packed_batching, scale != 1
    com.microsoft MultiHeadAttention     Attention (+Concat cache)   packed QKV/KV, shared buffer,
                                                                     cache_indirection, qk, causal cross
    com.microsoft GroupQueryAttention    [RMSNorm,] [Rotary,] Attn   past_key/past_value, qk_output,
                                                                     quantized cache, sliding_window_cache
    com.microsoft MoE                    MoE                         ungated/relu/gelu experts, sparse mixer,
                                                                     router_probs not input @ W
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .. import errors
from ..ir import dtypes
from ..ir.fold import fold, materialise
from ..ir.graph import Graph, Node, Value
from ..ir.infer import infer_node, merge_types
from ..ir.ops import POLYPORT_DOMAIN, checked_attrs
from ..ir.types import TensorType, Type

MS = "com.microsoft"
DEFAULT_ONNX_OPSET = 18   # for the adapter nodes of a model that imports no ai.onnx opset

Converter = Callable[["Conversion"], Sequence[Optional[Value]]]
_CONVERTERS: dict[tuple[str, str], Converter] = {}


def _key(domain: str, op_type: str) -> tuple[str, str]:
    return ("" if domain == "ai.onnx" else domain, op_type)


def converts(domain: str, *op_types: str):
    """Decorator registering a converter for one or more ops of a domain."""
    def wrap(fn: Converter) -> Converter:
        for op in op_types:
            _CONVERTERS[_key(domain, op)] = fn
        return fn
    return wrap


def converter_for(domain: str, op_type: str) -> Optional[Converter]:
    """The converter importing `domain::op_type` as polyport ops, or None."""
    return _CONVERTERS.get(_key(domain, op_type))


def supported_ops() -> list[tuple[str, str]]:
    return sorted(_CONVERTERS)


class Conversion:
    """One ONNX node being converted: its inputs, attributes and outputs, and helpers to emit nodes."""

    def __init__(self, graph: Graph, name: str, domain: str, op_type: str, inputs: Sequence[Optional[Value]],
                 attrs: dict[str, Any], outputs: Sequence[Value], output_names: Sequence[str], *,
                 source: str = "<model>", opsets: Optional[dict[str, int]] = None,
                 declared: Optional[dict[str, Type]] = None, bindable: frozenset[str] = frozenset(),
                 fold_shapes: bool = False):
        self.graph = graph
        self.name = name
        self.domain = "" if domain == "ai.onnx" else domain
        self.op_type = op_type
        self.inputs = list(inputs)
        self.attrs = dict(attrs)
        self.outputs = list(outputs)
        self.output_names = list(output_names)
        self.source = source
        self.opsets = dict(opsets or {})
        if "" not in self.opsets:          # adapters are standard ops: give them an opset to be read at
            self.opsets[""] = DEFAULT_ONNX_OPSET
            graph.root().opset_imports.setdefault("", DEFAULT_ONNX_OPSET)
        self.declared = declared or {}
        self.bindable = bindable
        self.fold_shapes = fold_shapes
        self._main_named = False

    # ---- the node ------------------------------------------------------------------
    @property
    def qualified_op(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain else self.op_type

    @property
    def where(self) -> str:
        return f"{self.source}: node {self.name} ({self.qualified_op})"

    @property
    def onnx_opset(self) -> int:
        return self.opsets.get("", DEFAULT_ONNX_OPSET)

    def inp(self, i: int) -> Optional[Value]:
        return self.inputs[i] if i < len(self.inputs) else None

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def used(self, i: int) -> bool:
        """Whether the model names ONNX output i (an optional output it asks for)."""
        return i < len(self.output_names) and bool(self.output_names[i])

    def out(self, i: int) -> Optional[Value]:
        return self.outputs[i] if self.used(i) else None

    def unsupported(self, feature: str, why: str = "") -> errors.UnsupportedOpError:
        """The error for a feature polyport cannot import (raise what this returns)."""
        return errors.UnsupportedOpError(f"{self.where}: {feature} is not supported" + (f": {why}" if why else ""))

    # ---- types ---------------------------------------------------------------------
    @staticmethod
    def shape(v: Optional[Value]):
        t = v.type if v is not None else None
        return t.shape if isinstance(t, TensorType) else None

    def rank(self, v: Value, what: str) -> int:
        s = self.shape(v)
        if s is None:
            raise self.unsupported(f"{what} of unknown rank", "the layout (3D or 4D) must be known at import")
        return len(s)

    def static(self, v: Value, axis: int, what: str) -> int:
        s = self.shape(v)
        d = s[axis] if s is not None and -len(s) <= axis < len(s) else None
        if not isinstance(d, (int, np.integer)):
            raise self.unsupported(f"{what} that is not a static dim (shape {list(s) if s else s})",
                                   "polyport needs it as an attribute")
        return int(d)

    @staticmethod
    def same_dim(a, b) -> bool:
        return a is not None and b is not None and a == b

    # ---- emitting ------------------------------------------------------------------
    def const(self, array, tag: str) -> Value:
        return self.graph.add_constant(f"{self.name}/{tag}", np.asarray(array))

    def ints(self, values, tag: str = "shape") -> Value:
        return self.const(np.asarray(values, dtype=np.int64), tag)

    def scalar_like(self, value: float, like: Value, tag: str) -> Value:
        dt = like.dtype.numpy if like.dtype is not None and like.dtype.numpy is not None else np.float32
        return self.const(np.asarray(value, dtype=dt), tag)

    def emit(self, op_type: str, inputs: Sequence[Optional[Value]], attrs: Optional[dict] = None, *,
             domain: str = "", out: Optional[Value] = None, tag: Optional[str] = None, main: bool = False) -> Value:
        """Append one single-output node; `out` is a pre-made Value (an ONNX output) to produce.
        `main` names the node after the ONNX node (the fused op the node becomes)."""
        g = self.graph
        inputs = list(inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        if out is None:
            out = Value(g.unique_name(f"{self.name}/{tag or op_type.lower()}"))
        if main and not self._main_named:
            node_name = g.unique_name(self.name)
            self._main_named = True
        else:
            node_name = g.unique_name(f"{self.name}/{tag or op_type}")
        if domain == POLYPORT_DOMAIN:
            attrs = checked_attrs(op_type, attrs or {}, where=self.source)
        node = Node(op_type, inputs, [out], attrs, domain, node_name)
        try:
            types = infer_node(node, self.opsets)
        except errors.PolyportError as e:
            raise type(e)(f"{self.source}: {e}") from None
        out.type = merge_types(types[0] if types else out.type, self.declared.get(out.name), self.bindable)
        g.append(node)
        if self.fold_shapes:
            folded = fold(node, self.opsets, self.bindable)
            if folded is not None:
                materialise(g, node, folded)
        return out

    def fused(self, op_type: str, inputs: Sequence[Optional[Value]], attrs: dict, out: Optional[Value] = None) -> Value:
        return self.emit(op_type, inputs, attrs, domain=POLYPORT_DOMAIN, out=out, tag=op_type, main=True)

    # ---- standard-op helpers (opset-independent spellings) -------------------------
    def reshape(self, x: Value, shape, tag: str, out: Optional[Value] = None) -> Value:
        s = shape if isinstance(shape, Value) else self.ints(shape, f"{tag}_shape")
        return self.emit("Reshape", [x, s], out=out, tag=tag)

    def transpose(self, x: Value, perm, tag: str, out: Optional[Value] = None) -> Value:
        return self.emit("Transpose", [x], {"perm": list(perm)}, out=out, tag=tag)

    def unsqueeze(self, x: Value, axes: Sequence[int], tag: str) -> Value:
        if self.onnx_opset >= 13:
            return self.emit("Unsqueeze", [x, self.ints(list(axes), f"{tag}_axes")], tag=tag)
        return self.emit("Unsqueeze", [x], {"axes": list(axes)}, tag=tag)

    def slice(self, x: Value, starts, ends, axes, steps=None, tag: str = "slice") -> Value:
        ins = [x, self.ints(starts, f"{tag}_starts"), self.ints(ends, f"{tag}_ends"), self.ints(axes, f"{tag}_axes")]
        if steps is not None:
            ins.append(self.ints(steps, f"{tag}_steps"))
        return self.emit("Slice", ins, tag=tag)

    def reduce_mean(self, x: Value, axes: Sequence[int], tag: str) -> Value:
        if self.onnx_opset >= 18:
            return self.emit("ReduceMean", [x, self.ints(list(axes), f"{tag}_axes")], {"keepdims": 1}, tag=tag)
        return self.emit("ReduceMean", [x], {"axes": list(axes), "keepdims": 1}, tag=tag)

    def dim(self, x: Value, axis: int, tag: str) -> Value:
        """x.shape[axis] as an int64 scalar (folded to a constant or a symbolic ShapeValue)."""
        shape = self.emit("Shape", [x], tag=f"{tag}_shape")
        return self.emit("Gather", [shape, self.const(np.asarray(axis, dtype=np.int64), f"{tag}_axis")],
                         {"axis": 0}, tag=tag)

    def arange(self, n: Value, tag: str) -> Value:
        zero = self.const(np.asarray(0, dtype=np.int64), f"{tag}_start")
        one = self.const(np.asarray(1, dtype=np.int64), f"{tag}_step")
        return self.emit("Range", [zero, n, one], tag=tag)

    def cast(self, x: Value, to: dtypes.DType, tag: str) -> Value:
        if x.dtype == to:
            return x
        return self.emit("Cast", [x], {"to": to.onnx}, tag=tag)


# ====================================================================================
# Shared pieces
# ====================================================================================

def _split_heads(c: Conversion, x: Value, heads: int, tag: str) -> Value:
    """[B, S, heads*D] -> [B, heads, S, D]."""
    r = c.reshape(x, [0, 0, heads, -1], f"{tag}_heads")
    return c.transpose(r, [0, 2, 1, 3], f"{tag}_bhsd")


def _merge_heads(c: Conversion, y: Value, out: Optional[Value], tag: str = "out") -> Value:
    """[B, H, S, D] -> [B, S, H*D]."""
    t = c.transpose(y, [0, 2, 1, 3], f"{tag}_bshd")
    return c.reshape(t, [0, 0, -1], f"{tag}_merge_heads", out=out)


def _append_kv_cache(c, past_k, past_v, k4, v4):
    """(all keys, all values, [present_key, present_value]) with the past cache (outputs 1 and 2) prepended."""
    if past_k is None:
        return k4, v4, [_identity_to(c, k4, 1), _identity_to(c, v4, 2)]
    k_all = c.emit("Concat", [past_k, k4], {"axis": 2}, out=c.out(1), tag="present_key")
    v_all = c.emit("Concat", [past_v, v4], {"axis": 2}, out=c.out(2), tag="present_value")
    return k_all, v_all, [k_all if c.used(1) else None, v_all if c.used(2) else None]


def _identity_to(c: Conversion, x: Value, i: int) -> Optional[Value]:
    """ONNX output i as `x` under the output's own name (None when the model does not ask for it)."""
    if not c.used(i):
        return None
    return c.emit("Identity", [x], out=c.outputs[i], tag=f"output{i}")


def _neg_inf_where(c: Conversion, keep: Value, additive: Value, tag: str) -> Value:
    """An additive mask that is `additive` where `keep` and -inf elsewhere."""
    return c.emit("Where", [keep, additive, c.scalar_like(-np.inf, additive, f"{tag}_neginf")], tag=tag)


def _combine_keep(c: Conversion, keep: Value, mask: Optional[Value], tag: str) -> Value:
    """Intersect a bool keep-mask with an attention mask (bool: And; float: -inf where not kept)."""
    if mask is None:
        return keep
    if mask.dtype == dtypes.BOOL:
        return c.emit("And", [mask, keep], tag=tag)
    return _neg_inf_where(c, keep, mask, tag)


def _expand_freqs(c: Conversion, cos: Value, interleaved: bool, tag: str) -> Value:
    """[..., rd/2] frequencies -> [..., rd] as polyport::Rotary reads them (halves repeated, or pairs)."""
    if not interleaved:
        return c.emit("Concat", [cos, cos], {"axis": -1}, tag=f"{tag}_halves")
    r = c.rank(cos, "cos/sin cache")
    col = c.reshape(cos, [0] * r + [1], f"{tag}_col")
    pairs = c.emit("Concat", [col, col], {"axis": -1}, tag=f"{tag}_pairs")
    return c.reshape(pairs, [0] * (r - 1) + [-1], f"{tag}_interleaved")


def _rotary_freqs(c: Conversion, cache: Value, positions: Optional[Value], interleaved: bool, tag: str) -> Value:
    """cos/sin for BHSD x: gather cache rows by positions [B, S] (or take [B, S, rd/2]), expand, -> [B, 1, S, rd]."""
    f = c.emit("Gather", [cache, positions], {"axis": 0}, tag=f"{tag}_at_positions") if positions is not None else cache
    f = _expand_freqs(c, f, interleaved, tag)
    return c.unsqueeze(f, [1], f"{tag}_bhsd")


def _rotary_attrs(interleaved: bool, rotary_dim: int, head_size: Optional[int]) -> dict:
    attrs = {"interleaved": int(bool(interleaved))}
    if rotary_dim and rotary_dim != head_size:
        attrs["rotary_dim"] = int(rotary_dim)
    return attrs


# ====================================================================================
# ONNX (ai.onnx) opset 23
# ====================================================================================

def _pad_mask(c: Conversion, mask: Value, k_all: Value) -> Value:
    """An attn_mask whose last dim is shorter than the total kv length is padded with False / -inf
    (the ONNX reference implementation, and the opset-24 text)."""
    ms, ks = c.shape(mask), c.shape(k_all)
    m_len, t_len = (ms[-1] if ms else None), (ks[2] if ks else None)
    if c.same_dim(m_len, t_len):
        return mask
    r = c.rank(mask, "input attn_mask")
    fill = (c.const(np.asarray(False), "mask_pad_value") if mask.dtype == dtypes.BOOL
            else c.scalar_like(-np.inf, mask, "mask_pad_value"))
    if isinstance(m_len, int) and isinstance(t_len, int):
        if m_len >= t_len:
            return mask
        pads = c.ints([0] * (2 * r - 1) + [t_len - m_len], "mask_pads")
    else:
        short = c.emit("Sub", [c.dim(k_all, 2, "total_len"), c.dim(mask, -1, "mask_len")], tag="mask_shortfall")
        short = c.emit("Max", [short, c.const(np.asarray(0, dtype=np.int64), "zero")], tag="mask_pad_len")
        pads = c.emit("Concat", [c.ints([0] * (2 * r - 1), "mask_pads_head"), c.reshape(short, [1], "mask_pad_tail")],
                      {"axis": 0}, tag="mask_pads")
    return c.emit("Pad", [mask, pads, fill], {"mode": "constant"}, tag="mask_padded")


def _window_keep(c: Conversion, q4: Value, k_all: Value, offset: Optional[Value], causal: bool, left: int,
                 right: int) -> Optional[Value]:
    """bool keep-mask for a query at p = offset + i: j <= p (causal), p - left <= j <= p + right
    (each bound when >= 0). `offset` is None (0), a scalar or [B, 1, 1, 1]: [S, T] or [B, 1, S, T]."""
    if not causal and left < 0 and right < 0:
        return None
    i = c.reshape(c.arange(c.dim(q4, 2, "q_len"), "qpos"), [-1, 1], "qpos_col")
    p = c.emit("Add", [i, offset], tag="qpos_abs") if offset is not None else i
    j = c.reshape(c.arange(c.dim(k_all, 2, "k_len"), "kpos"), [1, -1], "kpos_row")
    parts = []
    if causal:
        parts.append(c.emit("LessOrEqual", [j, p], tag="causal"))
    if left >= 0:
        lo = c.emit("Sub", [p, c.const(np.asarray(left, dtype=np.int64), "left_window")], tag="window_start")
        parts.append(c.emit("GreaterOrEqual", [j, lo], tag="left_window"))
    if right >= 0:
        hi = c.emit("Add", [p, c.const(np.asarray(right, dtype=np.int64), "right_window")], tag="window_end")
        parts.append(c.emit("LessOrEqual", [j, hi], tag="right_window"))
    keep = parts[0]
    for extra in parts[1:]:
        keep = c.emit("And", [keep, extra], tag="window")
    return keep


@converts("", "Attention")
def onnx_attention(c: Conversion):
    """ONNX Attention (opset 23; also 24's nonpad_kv_seqlen and 25's windows) -> polyport::Attention.

    3D Q/K/V (with q_num_heads / kv_num_heads) are split into heads and the
    output merged back; past_key/past_value are concatenated on the sequence
    axis (present_key/value). A query at p = offset + i (offset: past length,
    nonpad_kv_seqlen[b] - S, or 0) sees keys j <= p under is_causal and
    p - left_window_size <= j <= p + right_window_size; with the new kv length
    equal to S that is polyport's own `causal` / `window`, otherwise an explicit
    keep-mask. nonpad_kv_seqlen masks keys j >= nonpad_kv_seqlen[b]; a mask
    shorter than the keys is padded with False / -inf."""
    q, k, v, mask, past_k, past_v, nonpad = (c.inp(i) for i in range(7))
    softcap = float(c.attr("softcap", 0.0))        # as polyport's: on the scaled scores, before every mask
    if c.used(3):
        raise c.unsupported(f"output qk_matmul_output (qk_matmul_output_mode={c.attr('qk_matmul_output_mode', 0)})",
                            "polyport::Attention does not expose its attention scores")
    if (past_k is None) != (past_v is None):
        raise c.unsupported("past_key without past_value (or the reverse)", "the spec requires both")
    if nonpad is not None and past_k is not None:
        raise c.unsupported("nonpad_kv_seqlen with past_key", "the spec forbids the combination")

    rq = c.rank(q, "input Q")
    if rq == 3:
        heads = c.attr("q_num_heads")
        if not heads:
            raise c.unsupported("3D Q without attribute q_num_heads", "the spec requires it for 3D inputs")
        q4 = _split_heads(c, q, int(heads), "q")
    else:
        heads = c.static(q, 1, "Q's head count (dim 1)")
        q4 = q
    kv_heads = None
    k4 = v4 = None
    for name, x in (("K", k), ("V", v)):
        if c.rank(x, f"input {name}") == 3:
            kvh = c.attr("kv_num_heads")
            if not kvh:
                raise c.unsupported(f"3D {name} without attribute kv_num_heads", "the spec requires it for 3D inputs")
            x4 = _split_heads(c, x, int(kvh), name.lower())
        else:
            kvh = c.static(x, 1, f"{name}'s head count (dim 1)")
            x4 = x
        kv_heads = int(kvh)
        if name == "K":
            k4 = x4
        else:
            v4 = x4
    if heads % kv_heads:
        raise c.unsupported(f"q_num_heads={heads} with kv_num_heads={kv_heads}", "not a multiple")

    scale = c.attr("scale")
    if scale is None:
        d = c.shape(q4)[3] if c.shape(q4) else None
        if not isinstance(d, int):
            d = c.static(q, 2, "Q's hidden size") // int(heads)
        scale = 1.0 / math.sqrt(d)

    q_len = c.shape(q4)[2] if c.shape(q4) else None
    kv_len = c.shape(k4)[2] if c.shape(k4) else None
    k_all, v_all, present = _append_kv_cache(c, past_k, past_v, k4, v4)
    if mask is not None:
        mask = _pad_mask(c, mask, k_all)

    is_causal = bool(c.attr("is_causal", 0))
    left, right = int(c.attr("left_window_size", -1)), int(c.attr("right_window_size", -1))
    causal = window = 0
    if nonpad is None and c.same_dim(q_len, kv_len):
        # offset (past length or 0) == polyport's T - S: its own causal / window attributes
        causal = int(is_causal or (right == 0))
        window = left + 1 if left >= 0 else 0
        if right > 0 and not is_causal:
            offset = c.dim(past_k, 2, "past_len") if past_k is not None else None
            keep = _window_keep(c, q4, k_all, offset, False, -1, right)
            mask = _combine_keep(c, keep, mask, "window_mask")
    else:
        if nonpad is not None:
            offset = c.emit("Sub", [c.cast(nonpad, dtypes.I64, "nonpad_i64"), c.dim(q4, 2, "q_len")],
                            tag="offset")
            offset = c.reshape(offset, [-1, 1, 1, 1], "offset_b111")
        else:
            offset = c.dim(past_k, 2, "past_len") if past_k is not None else None
        keep = _window_keep(c, q4, k_all, offset, is_causal, left, right)
        if keep is not None:
            mask = _combine_keep(c, keep, mask, "position_mask")
    if nonpad is not None:
        j = c.reshape(c.arange(c.dim(k_all, 2, "kv_len"), "key_pos"), [1, -1], "key_pos_row")
        valid = c.reshape(c.cast(nonpad, dtypes.I64, "nonpad_len"), [-1, 1], "nonpad_col")
        keep = c.unsqueeze(c.emit("Less", [j, valid], tag="nonpad_valid"), [1, 2], "nonpad_bhst")
        mask = _combine_keep(c, keep, mask, "nonpad_mask")
    attrs = {"num_heads": int(heads), "kv_heads": kv_heads, "scale": float(scale), "causal": causal}
    if window:
        attrs["window"] = window
    if softcap > 0:
        attrs["softcap"] = softcap
    if rq == 3:
        y4 = c.fused("Attention", [q4, k_all, v_all, mask], attrs)
        y = _merge_heads(c, y4, c.outputs[0])
    else:
        y = c.fused("Attention", [q4, k_all, v_all, mask], attrs, out=c.outputs[0])
    return [y] + present + [None]


def _rms_norm(c: Conversion, x: Value, scale: Value, eps: float, axis: int, out: Optional[Value]) -> Value:
    """RMS normalisation over dims [axis, rank) scaled by `scale` -> polyport::RMSNorm (+ adapters)."""
    shape = c.shape(x)
    if shape is None:
        raise c.unsupported("input of unknown rank", "the normalised axes must be known at import")
    r = len(shape)
    if not -r <= axis < r:
        raise c.unsupported(f"attribute axis={axis} for a rank-{r} input", "out of range")
    axis %= r
    norm_dims = shape[axis:]
    n = 1
    for d in norm_dims:
        if not isinstance(d, int):
            n = None
            break
        n *= d
    # The weight polyport::RMSNorm takes ([n]): the scale itself when it covers exactly the
    # normalised dims (leading 1s aside); else ones, and the scale multiplies afterwards.
    sshape = c.shape(scale)
    k = len(norm_dims)
    covers = (sshape is not None and len(sshape) >= k and all(d == 1 for d in sshape[:len(sshape) - k])
              and tuple(sshape[len(sshape) - k:]) == tuple(norm_dims))
    if covers and len(sshape) == 1:
        weight, after = scale, None
    elif covers and n is not None:
        weight, after = c.reshape(scale, [n], "weight"), None
    else:
        if n is None:
            raise c.unsupported(f"normalised dims {list(norm_dims)} that are not static",
                                "polyport::RMSNorm needs the weight size at import")
        wdt = scale.dtype.numpy if scale.dtype is not None and scale.dtype.numpy is not None else np.float32
        weight, after = c.const(np.ones(n, dtype=wdt), "unit_weight"), scale
    attrs = {"epsilon": float(eps)}
    if axis == r - 1:
        if after is None:
            return c.fused("RMSNorm", [x, weight], attrs, out=out)
        y = c.fused("RMSNorm", [x, weight], attrs)
    else:
        flat = c.reshape(x, [0] * axis + [-1], "flatten")
        y = c.fused("RMSNorm", [flat, weight], attrs)
        y = c.reshape(y, c.emit("Shape", [x], tag="input_shape"), "unflatten",
                      out=out if after is None else None)
        if after is None:
            return y
    if after.dtype is not None and x.dtype is not None and after.dtype != x.dtype:
        after = c.cast(after, x.dtype, "scale_cast")
    return c.emit("Mul", [y, after], out=out, tag="scale")


def _inv_std_dev(c: Conversion, x: Value, eps: float, axis: int, out: Value) -> Value:
    """1 / sqrt(mean(x^2 over [axis, rank)) + eps) in fp32, keepdims (the optional norm output)."""
    r = len(c.shape(x))
    axis %= r
    xf = c.cast(x, dtypes.F32, "stash_cast")
    sq = c.emit("Mul", [xf, xf], tag="square")
    ms = c.reduce_mean(sq, list(range(axis, r)), "mean_square")
    ms = c.emit("Add", [ms, c.const(np.asarray(eps, dtype=np.float32), "epsilon")], tag="mean_square_eps")
    rms = c.emit("Sqrt", [ms], tag="rms")
    return c.emit("Reciprocal", [rms], out=out, tag="inv_std_dev")


def _check_stash(c: Conversion) -> None:
    stash = int(c.attr("stash_type", 1))
    if stash != 1:
        raise c.unsupported(f"attribute stash_type={stash}",
                            "polyport::RMSNorm computes in fp32 (stash_type=1) only")


@converts("", "RMSNormalization")
def onnx_rms_normalization(c: Conversion):
    """ONNX RMSNormalization (opset 23) -> polyport::RMSNorm; axis != -1 flattens the normalised dims."""
    _check_stash(c)
    x, scale = c.inp(0), c.inp(1)
    y = _rms_norm(c, x, scale, float(c.attr("epsilon", 1e-5)), int(c.attr("axis", -1)), c.outputs[0])
    return [y]


@converts("", "RotaryEmbedding")
def onnx_rotary_embedding(c: Conversion):
    """ONNX RotaryEmbedding (opset 23) -> polyport::Rotary on BHSD x.

    X is [B, H, S, D] or [B, S, hidden] (num_heads required); cos/sin caches are
    [max_pos, rd/2] gathered by position_ids [B, S], or [B, S, rd/2] without them."""
    x, cos, sin, pos = (c.inp(i) for i in range(4))
    interleaved = bool(c.attr("interleaved", 0))
    rd = int(c.attr("rotary_embedding_dim", 0))
    rx = c.rank(x, "input X")
    if rx == 3:
        heads = int(c.attr("num_heads", 0))
        if not heads:
            raise c.unsupported("3D X without attribute num_heads", "the spec requires it for 3D inputs")
        x4 = _split_heads(c, x, heads, "x")
    elif rx == 4:
        x4 = x
    else:
        raise c.unsupported(f"rank-{rx} X", "the spec allows 3D or 4D")
    if pos is None and c.shape(cos) is not None and len(c.shape(cos)) != 3:
        raise c.unsupported("2D cos_cache without position_ids", "the spec needs position_ids for a 2D cache")
    cos4 = _rotary_freqs(c, cos, pos, interleaved, "cos")
    sin4 = _rotary_freqs(c, sin, pos, interleaved, "sin")
    d = c.shape(x4)[3] if c.shape(x4) else None
    attrs = _rotary_attrs(interleaved, rd, d if isinstance(d, int) else None)
    if rx == 3:
        y4 = c.fused("Rotary", [x4, cos4, sin4], attrs)
        return [_merge_heads(c, y4, c.outputs[0])]
    return [c.fused("Rotary", [x4, cos4, sin4], attrs, out=c.outputs[0])]


# ====================================================================================
# ONNX Runtime contrib ops
# ====================================================================================

@converts("", "SimplifiedLayerNormalization")
@converts(MS, "SimplifiedLayerNormalization")
def ms_simplified_layer_norm(c: Conversion):
    """ONNX Runtime SimplifiedLayerNormalization (RMS norm; ONNX Runtime registers it in the ai.onnx
    domain, version 1, and this also accepts it under com.microsoft). Output 1 (inv_std_var) is computed
    with standard nodes when asked for."""
    _check_stash(c)
    x, scale = c.inp(0), c.inp(1)
    eps = float(c.attr("epsilon", 1e-5))
    axis = int(c.attr("axis", -1))
    y = _rms_norm(c, x, scale, eps, axis, c.outputs[0])
    inv = _inv_std_dev(c, x, eps, axis, c.outputs[1]) if c.used(1) else None
    return [y, inv]


@converts(MS, "SkipSimplifiedLayerNormalization")
def ms_skip_simplified_layer_norm(c: Conversion):
    """com.microsoft SkipSimplifiedLayerNormalization: s = input + skip (+ bias); y = RMSNorm(s) * gamma.
    Output 3 (input_skip_bias_sum) is `s`; output 2 (inv_std_var) is computed with standard nodes;
    output 1 (mean) has no meaning for an RMS norm (ONNX Runtime writes zeros) and is an error if used."""
    x, skip, gamma, bias = (c.inp(i) for i in range(4))
    if c.used(1):
        raise c.unsupported(f"output 1 (mean, {c.output_names[1]!r})",
                            "an RMS norm computes no mean (ONNX Runtime leaves it zero)")
    eps = float(c.attr("epsilon", 1e-12))
    s = c.emit("Add", [x, skip], out=None if bias is not None else c.out(3), tag="add_skip")
    if bias is not None:
        s = c.emit("Add", [s, bias], out=c.out(3), tag="add_bias")
    y = _rms_norm(c, s, gamma, eps, -1, c.outputs[0])
    inv = _inv_std_dev(c, s, eps, -1, c.outputs[2]) if c.used(2) else None
    return [y, None, inv, s if c.used(3) else None]


@converts(MS, "RotaryEmbedding")
def ms_rotary_embedding(c: Conversion):
    """com.microsoft RotaryEmbedding(input, position_ids, cos_cache, sin_cache) -> polyport::Rotary.

    input is [B, S, hidden] or [B, H, S, D]; position_ids is [B, S] or [1]
    (an offset: positions offset + 0..S-1); caches are [max_pos, rd/2]."""
    x, pos, cos, sin = (c.inp(i) for i in range(4))
    if c.attr("is_packed_batching", 0):
        raise c.unsupported("attribute is_packed_batching=1", "ragged packed batches are not expressible")
    scale = float(c.attr("scale", 1.0))
    if scale != 1.0:
        raise c.unsupported(f"attribute scale={scale:g}",
                            "its meaning is unspecified and ONNX Runtime's kernels ignore it")
    interleaved = bool(c.attr("interleaved", 0))
    rd = int(c.attr("rotary_embedding_dim", 0))
    rx = c.rank(x, "input")
    if rx == 3:
        if rd:
            heads = int(c.attr("num_heads", 0))
            if not heads:
                raise c.unsupported("rotary_embedding_dim without num_heads", "the schema requires both")
            x4 = _split_heads(c, x, heads, "x")
        else:   # head size from the cache: rd/2 = head_size/2
            d = 2 * c.static(cos, 1, "cos_cache dim 1")
            x4 = c.transpose(c.reshape(x, [0, 0, -1, d], "x_heads"), [0, 2, 1, 3], "x_bhsd")
    elif rx == 4:
        x4 = x
    else:
        raise c.unsupported(f"rank-{rx} input", "the schema allows 3D or 4D")
    pr = c.rank(pos, "input position_ids")
    if pr == 1:
        s = c.dim(x4, 2, "seq_len")
        first = c.reshape(pos, [1, 1], "position_offset")
        pos = c.emit("Add", [first, c.reshape(c.arange(s, "positions"), [1, -1], "positions_row")],
                     tag="position_ids")
    elif pr != 2:
        raise c.unsupported(f"rank-{pr} position_ids", "the schema allows [1] or [batch, seq]")
    cos4 = _rotary_freqs(c, cos, pos, interleaved, "cos")
    sin4 = _rotary_freqs(c, sin, pos, interleaved, "sin")
    d = c.shape(x4)[3] if c.shape(x4) else None
    attrs = _rotary_attrs(interleaved, rd, d if isinstance(d, int) else None)
    if rx == 3:
        return [_merge_heads(c, c.fused("Rotary", [x4, cos4, sin4], attrs), c.outputs[0])]
    return [c.fused("Rotary", [x4, cos4, sin4], attrs, out=c.outputs[0])]


def _key_padding_mask(c: Conversion, kpm: Value, q: Value, k4: Value, filler: float) -> Value:
    """MultiHeadAttention's key_padding_mask as an additive mask, broadcastable to [B, N, S, T]:
    (1 - mask) * mask_filter_value for [B, T] / [B, S, T] masks, and the same for key lengths [B]."""
    kr = c.rank(kpm, "input key_padding_mask")
    fill = c.scalar_like(filler, q, "mask_filter_value")
    if kr == 1:
        b_mask, b_q = c.shape(kpm)[0], c.shape(q)[0]
        if not c.same_dim(b_mask, b_q):
            raise c.unsupported(f"1D key_padding_mask of length {b_mask} (batch {b_q})",
                                "only key lengths of shape (batch_size) are supported, not (3*batch_size+2)")
        j = c.reshape(c.arange(c.dim(k4, 2, "total_len"), "key_pos"), [1, -1], "key_pos_row")
        lens = c.reshape(c.cast(kpm, dtypes.I64, "key_len_i64"), [-1, 1], "key_len_col")
        keep = c.emit("Less", [j, lens], tag="key_valid")
        add = c.emit("Where", [keep, c.scalar_like(0.0, q, "zero"), fill], tag="key_padding_bias")
        return c.unsqueeze(add, [1, 2], "key_padding_bhst")
    if kr not in (2, 3):
        raise c.unsupported(f"rank-{kr} key_padding_mask")
    m = c.cast(kpm, q.dtype, "key_padding_float")
    inv = c.emit("Sub", [c.scalar_like(1.0, q, "one"), m], tag="key_padding_inverse")
    add = c.emit("Mul", [inv, fill], tag="key_padding_bias")
    return c.unsqueeze(add, [1, 2] if kr == 2 else [1], "key_padding_bhst")


@converts(MS, "MultiHeadAttention")
def ms_multi_head_attention(c: Conversion):
    """com.microsoft MultiHeadAttention -> polyport::Attention (kv_heads = num_heads).

    query [B, S, hidden]; key/value [B, T, hidden] or already [B, N, T, D];
    bias [3*hidden] split over q/k/v; key_padding_mask (additive
    mask_filter_value) and attention_bias added; past_key/past_value concatenated
    (present_key/value); unidirectional is causal for self attention."""
    (q, k, v, bias, kpm, attn_bias, past_k, past_v, past_len, cache_ind) = (c.inp(i) for i in range(10))
    if past_len is not None:
        raise c.unsupported("input past_sequence_length (shared KV buffer)",
                            "polyport imports only a past that the present extends")
    if cache_ind is not None:
        raise c.unsupported("input cache_indirection (beam search)", "no polyport equivalent")
    if c.used(3):
        raise c.unsupported(f"output qk ({c.output_names[3]!r})", "polyport::Attention does not expose its scores")
    if (past_k is None) != (past_v is None):
        raise c.unsupported("past_key without past_value (or the reverse)")
    heads = int(c.attr("num_heads"))
    rq = c.rank(q, "input query")
    if rq == 5:
        raise c.unsupported("packed QKV query [B, S, N, 3, H]", "ONNX Runtime's CPU kernel lacks it too")
    if rq != 3:
        raise c.unsupported(f"rank-{rq} query")
    if k is None or v is None:
        raise c.unsupported("missing key/value (packed QKV)")
    rk = c.rank(k, "input key")
    if rk == 5:
        raise c.unsupported("packed KV key [B, T, N, 2, H]", "ONNX Runtime's CPU kernel lacks it too")
    if rk != c.rank(v, "input value"):
        raise c.unsupported("key and value of different ranks")
    hidden = c.static(q, 2, "query hidden size")
    if bias is not None:
        if rk != 3:
            raise c.unsupported("input bias with key/value already in [B, N, T, H]")
        kh, vh = c.static(k, 2, "key hidden size"), c.static(v, 2, "value hidden size")
        q = c.emit("Add", [q, c.slice(bias, [0], [hidden], [0], tag="bias_q")], tag="q_bias")
        k = c.emit("Add", [k, c.slice(bias, [hidden], [hidden + kh], [0], tag="bias_k")], tag="k_bias")
        v = c.emit("Add", [v, c.slice(bias, [hidden + kh], [hidden + kh + vh], [0], tag="bias_v")], tag="v_bias")
    q4 = _split_heads(c, q, heads, "q")
    if rk == 3:
        k4, v4 = _split_heads(c, k, heads, "k"), _split_heads(c, v, heads, "v")
    elif rk == 4:
        k4, v4 = k, v
    else:
        raise c.unsupported(f"rank-{rk} key")
    scale = c.attr("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(hidden // heads)
    k_all, v_all, present = _append_kv_cache(c, past_k, past_v, k4, v4)
    causal = 0
    if c.attr("unidirectional", 0):
        q_len, kv_len = c.shape(q4)[2], c.shape(k4)[2] if c.shape(k4) else None
        if not c.same_dim(q_len, kv_len):
            raise c.unsupported("attribute unidirectional=1 with kv_sequence_length != sequence_length",
                                "causal cross attention has no agreed alignment (ONNX Runtime's CPU kernel "
                                "masks it inconsistently)")
        causal = 1
    mask = None
    if kpm is not None:
        mask = _key_padding_mask(c, kpm, q, k_all, float(c.attr("mask_filter_value", -10000.0)))
    if attn_bias is not None:
        mask = attn_bias if mask is None else c.emit("Add", [mask, attn_bias], tag="attention_bias")
    attrs = {"num_heads": heads, "kv_heads": heads, "scale": float(scale), "causal": causal}
    y4 = c.fused("Attention", [q4, k_all, v_all, mask], attrs)
    return [_merge_heads(c, y4, c.outputs[0])] + present + [None]


@converts(MS, "GroupQueryAttention")
def ms_group_query_attention(c: Conversion):
    """com.microsoft GroupQueryAttention (prompt form, no KV cache input) -> polyport::Attention.

    Q/K/V [B, S, N*H] (or packed QKV); seqlens_k masks keys j > seqlens_k[b]
    (right padding); do_rotary emits polyport::Rotary on q and k first (positions
    0..S-1, or position_ids[0, 0] + 0..S-1 as ONNX Runtime reads them for a
    prompt); q_norm_weight/k_norm_weight emit polyport::RMSNorm per head before
    that; local_window_size W is polyport's window W; head_sink (or
    smooth_softmax=1: zero sinks) becomes sinks; present_key/value are the
    (rotated) new keys/values."""
    (q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, pos, attn_bias, head_sink,
     k_scale, v_scale, q_norm, k_norm) = (c.inp(i) for i in range(16))
    if past_k is not None or past_v is not None:
        raise c.unsupported("inputs past_key/past_value (KV cache)",
                            "ONNX Runtime writes each batch entry's new keys at row seqlens_k[b] + 1 - S of "
                            "a dynamic or shared buffer; polyport imports GroupQueryAttention without a past only")
    if k_scale is not None or v_scale is not None or c.attr("kv_cache_bit_width") \
            or c.attr("k_quant_type", "NONE") != "NONE" or c.attr("v_quant_type", "NONE") != "NONE":
        raise c.unsupported("quantized KV cache (k_scale/v_scale, k_quant_type/v_quant_type, kv_cache_bit_width)")
    if c.attr("sliding_window_cache", 0):
        raise c.unsupported("attribute sliding_window_cache=1", "window-sized KV buffers need a past")
    softcap = float(c.attr("softcap", 0.0))        # ONNX Runtime caps the scaled scores before masking too
    if c.attr("qk_output", 0) or c.used(3):
        raise c.unsupported(f"output output_qk (qk_output={c.attr('qk_output', 0)})",
                            "polyport::Attention does not expose its scores")
    if (q_norm is None) != (k_norm is None):
        raise c.unsupported("q_norm_weight without k_norm_weight (or the reverse)", "the schema requires both")
    heads, kv_heads = int(c.attr("num_heads")), int(c.attr("kv_num_heads"))
    if heads % kv_heads:
        raise c.unsupported(f"num_heads={heads} with kv_num_heads={kv_heads}", "not a multiple")
    causal = int(c.attr("causal", 1))
    window = int(c.attr("local_window_size", -1))
    if window > 0 and not causal:
        raise c.unsupported(f"attribute local_window_size={window} with causal=0", "the schema requires -1")
    if c.rank(q, "input query") != 3:
        raise c.unsupported(f"rank-{c.rank(q, 'input query')} query")
    if k is None and v is None:            # packed QKV: [B, S, (N + 2 * N_kv) * H]
        d = c.static(q, 2, "packed QKV hidden size")
        hs = d // (heads + 2 * kv_heads)
        qh, kh = heads * hs, kv_heads * hs
        q, k, v = (c.slice(q, [a], [b], [2], tag=t)
                   for a, b, t in ((0, qh, "q"), (qh, qh + kh, "k"), (qh + kh, d, "v")))
    elif k is None or v is None:
        raise c.unsupported("key without value (or the reverse)")
    else:
        hs = c.static(q, 2, "query hidden size") // heads
    if not c.same_dim(c.shape(q)[1], c.shape(k)[1] if c.shape(k) else None):
        raise c.unsupported("kv_sequence_length != sequence_length without a past",
                            "GroupQueryAttention's prompt is self attention")
    q4, k4, v4 = _split_heads(c, q, heads, "q"), _split_heads(c, k, kv_heads, "k"), _split_heads(c, v, kv_heads, "v")
    if q_norm is not None:
        eps = float(c.attr("qk_norm_epsilon", 1e-6))
        q4 = c.emit("RMSNorm", [q4, q_norm], {"epsilon": eps}, domain=POLYPORT_DOMAIN, tag="q_norm")
        k4 = c.emit("RMSNorm", [k4, k_norm], {"epsilon": eps}, domain=POLYPORT_DOMAIN, tag="k_norm")
    if c.attr("do_rotary", 0):
        if cos is None or sin is None:
            raise c.unsupported("do_rotary=1 without cos_cache/sin_cache")
        interleaved = bool(c.attr("rotary_interleaved", 0))
        rd = 2 * c.static(cos, 1, "cos_cache dim 1")
        positions = c.reshape(c.arange(c.dim(q4, 2, "seq_len"), "positions"), [1, -1], "positions_row")
        if pos is not None:      # ONNX Runtime reads only position_ids[0, 0] for a prompt
            first = c.slice(pos, [0, 0], [1, 1], [0, 1], tag="position_offset")
            positions = c.emit("Add", [first, positions], tag="position_ids")
        cos4 = _rotary_freqs(c, cos, positions, interleaved, "cos")
        sin4 = _rotary_freqs(c, sin, positions, interleaved, "sin")
        attrs = _rotary_attrs(interleaved, rd, hs)
        q4 = c.emit("Rotary", [q4, cos4, sin4], attrs, domain=POLYPORT_DOMAIN, tag="q_rotary")
        k4 = c.emit("Rotary", [k4, cos4, sin4], attrs, domain=POLYPORT_DOMAIN, tag="k_rotary")
    # keys past each batch entry's length (right padding) are masked: j <= seqlens_k[b]
    j = c.reshape(c.arange(c.dim(k4, 2, "kv_len"), "key_pos"), [1, -1], "key_pos_row")
    last = c.reshape(c.cast(seqlens_k, dtypes.I64, "seqlens_i64"), [-1, 1], "seqlens_col")
    keep = c.unsqueeze(c.emit("LessOrEqual", [j, last], tag="key_valid"), [1, 2], "key_valid_bhst")
    mask = keep if attn_bias is None else _neg_inf_where(c, keep, attn_bias, "attention_bias")
    sinks = head_sink
    if sinks is None and int(c.attr("smooth_softmax", -1)) == 1:
        sinks = c.const(np.zeros(heads, dtype=q.dtype.numpy if q.dtype else np.float32), "smooth_softmax_sinks")
    scale = c.attr("scale")
    if not scale:
        scale = 1.0 / math.sqrt(hs)
    attrs = {"num_heads": heads, "kv_heads": kv_heads, "scale": float(scale), "causal": causal,
             "window": window if window > 0 else 0, **({"softcap": softcap} if softcap > 0 else {})}
    y4 = c.fused("Attention", [q4, k4, v4, mask, sinks], attrs)
    present = [_identity_to(c, k4, 1), _identity_to(c, v4, 2)]
    return [_merge_heads(c, y4, c.outputs[0])] + present + [None]


_SHAPE_PRESERVING = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def _row_source(v: Value) -> Value:
    """Look through reshapes: the value whose rows (last axis) `v` holds in the same order."""
    while v.producer is not None and v.producer.domain == "" and v.producer.op_type in _SHAPE_PRESERVING:
        v = v.producer.inputs[0]
    return v


def _router_weight(c: Conversion, logits: Value, x: Value) -> Value:
    """[hidden, num_experts] W with router_probs == x @ W, found upstream of router_probs."""
    src = _row_source(logits)
    p = src.producer
    why = ("polyport::MoE computes its router logits as input @ W; router_probs must be a MatMul "
           "(or bias-free Gemm) of the MoE input by a [hidden, num_experts] matrix")
    if p is None or p.domain != "":
        raise c.unsupported("input router_probs not computed from the input", why)
    w = None
    if p.op_type == "MatMul" and _row_source(p.inputs[0]) is _row_source(x):
        w = p.inputs[1]
    elif (p.op_type == "Gemm" and _row_source(p.inputs[0]) is _row_source(x) and not p.attrs.get("transA", 0)
          and float(p.attrs.get("alpha", 1.0)) == 1.0 and (len(p.inputs) < 3 or p.inputs[2] is None)):
        w = p.inputs[1]
        if p.attrs.get("transB", 0):
            w = c.transpose(w, [1, 0], "router_weight")
    if w is None or c.shape(w) is None or len(c.shape(w)) != 2 \
            or not c.same_dim(c.shape(w)[0], c.shape(x)[-1] if c.shape(x) else None):
        raise c.unsupported(f"input router_probs computed by {p.op_type} node {p.name}", why)
    return w


@converts(MS, "MoE")
def ms_moe(c: Conversion):
    """com.microsoft MoE -> polyport::MoE (softmax routing, top-k, optional renormalisation).

    Experts must be gated SiLU MLPs: activation_type "swiglu" (fc1 holding gate
    and up, interleaved rows for swiglu_fusion=1, halves for 2, or fc1 + fc3 for
    0) with its activation_alpha (polyport's alpha: g * sigmoid(alpha g)),
    activation_beta (polyport's up_offset) and an optional swiglu_limit
    (polyport's clamp), or "silu" with fc3 (gate = fc1, up = fc3); expert biases
    are split like their weights (gpt-oss). Weights are [E, out, in] and are
    transposed to polyport's [E, in, out]. The router weight is found upstream:
    router_probs must be input @ W."""
    x, logits, fc1, fc1_b, fc2, fc2_b, fc3, fc3_b = (c.inp(i) for i in range(8))
    if (fc1_b is None) != (fc3_b is None) and fc3 is not None:
        raise c.unsupported("a bias on one of fc1 / fc3 only", "polyport::MoE biases both gate and up or neither")
    if c.attr("use_sparse_mixer", 0):
        raise c.unsupported("attribute use_sparse_mixer=1", "ONNX Runtime 1.31's result differs from polyport's "
                            "sparsemixer routing (PhiMoE's, as transformers defines it): not mapped")
    act = c.attr("activation_type", "relu")
    clamp = 0.0
    if act == "swiglu":
        alpha, beta = float(c.attr("activation_alpha", 1.0)), float(c.attr("activation_beta", 0.0))
        if "swiglu_limit" in c.attrs:
            clamp = float(c.attr("swiglu_limit"))
            if clamp <= 0:
                raise c.unsupported(f"attribute swiglu_limit={clamp:g}", "polyport's clamp must be positive")
        fusion = int(c.attr("swiglu_fusion", 0))
        if fusion in (1, 2):
            if fc3 is not None:
                raise c.unsupported(f"fc3_experts_weights with swiglu_fusion={fusion}")
            rows = c.static(fc1, 1, "fc1_experts_weights dim 1")
            halves = [([0], [rows], [1], [2]), ([1], [rows], [1], [2])] if fusion == 1 else \
                [([0], [rows // 2], [1]), ([rows // 2], [rows], [1])]
            gate, up = (c.slice(fc1, *h, tag=f"fc1_{t}") for h, t in zip(halves, ("gate", "up")))
            if fc1_b is not None:
                fc1_b, fc3_b = (c.slice(fc1_b, *h, tag=f"fc1_bias_{t}") for h, t in zip(halves, ("gate", "up")))
        elif fusion == 0:
            if fc3 is None:
                raise c.unsupported("activation_type 'swiglu' with swiglu_fusion=0 and no fc3_experts_weights")
            gate, up = fc1, fc3
        else:
            raise c.unsupported(f"attribute swiglu_fusion={fusion}")
    elif act == "silu":
        alpha, beta = 1.0, 0.0
        if fc3 is None:
            raise c.unsupported("activation_type 'silu' without fc3_experts_weights (ungated experts)",
                                "polyport::MoE experts are gated MLPs")
        gate, up = fc1, fc3
    else:
        raise c.unsupported(f"attribute activation_type={act!r}",
                            "polyport::MoE experts are gated SiLU MLPs (swiglu, or silu with fc3)")
    hidden = c.shape(x)[-1] if c.shape(x) else None
    for name, w, axis in (("fc1_experts_weights", fc1, 2), ("fc2_experts_weights", fc2, 1)):
        s = c.shape(w)
        if s is None or len(s) != 3 or not c.same_dim(s[axis], hidden):
            raise c.unsupported(f"{name} of shape {list(s) if s else s} for hidden size {hidden}",
                                "expected fc1 [experts, inter, hidden] and fc2 [experts, hidden, inter]")
    router_w = _router_weight(c, logits, x)
    w_gate = c.transpose(gate, [0, 2, 1], "w_gate")
    w_up = c.transpose(up, [0, 2, 1], "w_up")
    w_down = c.transpose(fc2, [0, 2, 1], "w_down")
    attrs = {"top_k": int(c.attr("k", 1)), "scoring": "softmax",
             "renormalize": int(bool(c.attr("normalize_routing_weights", 0))), "activation": "silu", "clamp": clamp,
             **({"alpha": alpha} if alpha != 1.0 else {}), **({"up_offset": beta} if beta else {}),}
    biases = [None, fc1_b, fc3_b, fc2_b] if fc1_b is not None or fc2_b is not None else []
    if biases and fc1_b is None:         # a down bias alone: gate and up get zeros
        zeros = np.zeros((c.static(fc1, 0, "experts"), c.static(w_gate, 2, "inter")), np.float32)
        biases[1:3] = [c.const(zeros, "b_gate"), c.const(zeros, "b_up")]
    return [c.fused("MoE", [x, router_w, None, w_gate, w_up, w_down, None, None, None, None, None] + biases if biases else
                    [x, router_w, None, w_gate, w_up, w_down], attrs, out=c.outputs[0])]
