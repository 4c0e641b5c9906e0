"""Weights an export dequantizes from low-bit constants with ordinary ops, read back as codes and scales.

DeepSeek-V3's FP8 checkpoints hold each linear and expert weight as float8_e4m3fn [.., N, K] with one f32
inverse scale per 128x128 block. DequantizeLinear cannot block two axes, so an export writes
W = w.float() * scale_inv expanded over the blocks with ordinary ops: a Cast of the codes and a Mul by
scales that Reshape / Expand / Tile / slices spread over the block (transformers' in-place CPU dequantize
even exports as Slice + ScatterND). Rather than match each spelling, `block_codes` takes the constant-only
computation that produces a weight, evaluates it once at compile time and accepts it when
W == decode(codes) * scale, one f32 scale per block of consecutive k, reproduces every element exactly
(the export's single f32 multiply). A 128x128 block is then a block of 128 k per output column, its
scale repeated over the block's 128 rows (4 bytes per 128 weights instead of per 16384: +3% over the
codes' byte each). What is not reproduced exactly stays as exported and is dequantized at run time
(`decode-low-bit`); the importer never folds such a Cast into an f32 copy (ir/fold.py).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import ml_dtypes
import numpy as np
import onnx

from ..ir import dtypes
from ..ir.fold import LOW_BIT_CODES
from ..ir.graph import Graph, Node, Value
from ..ir.onnx_reference import StandardOpRunner
from ..ir.quant_layout import dq_format
from ..ir.types import TensorType
from .manager import PassResult, register_pass
from .pattern import NoMatch

REGION_LIMIT = 64           # ops between a weight's codes and the weight (transformers' form takes ~12)
BLOCKS = (256, 128, 64, 32, 16)
# codes the QuantMatMul / MoE formats decode without a zero point (`int`, `fp8e4m3`): the ones the importer
# never folds into f32
SIGNED_CODES = frozenset(np.dtype(dtypes.from_name(n).numpy) for n in LOW_BIT_CODES)


@dataclasses.dataclass
class BlockCodes:
    """W = decode(codes) * scales, the scales repeated `block_size` times along `k_axis`."""
    codes: np.ndarray           # the low-bit constant, laid out like W
    scales: np.ndarray          # float32, W's shape with KB = ceil(K / block_size) along k_axis
    block_size: int
    k_axis: int
    name: str                   # the codes constant's


def low_bit_codes(v: Optional[Value]) -> bool:
    """A constant of signed low-bit codes (rank >= 2): a quantized weight's, not an index or a shape."""
    return v is not None and v.is_constant and v.const.ndim >= 2 and v.const.dtype in SIGNED_CODES


def block_codes(v: Value, k_axis: int, opsets: dict[str, int]) -> BlockCodes:
    """`v` (computed from constants only) as low-bit codes and per-block scales along `k_axis`; raises NoMatch."""
    nodes, codes = _region(v)
    values = {}
    for node in nodes:
        ins = [None if i is None else values[id(i)] if id(i) in values else i.const for i in node.inputs]
        for o, r in zip(node.outputs, StandardOpRunner(node, opsets)(ins)):
            values[id(o)] = np.asarray(r)
    w = values[id(v)]
    if w.dtype != np.float32:
        raise NoMatch(f"%{v.name} is {w.dtype}, not float32")
    q = codes.const
    k_axis %= w.ndim
    layouts = [q] if q.shape == w.shape else []
    if q.shape[:-2] + q.shape[:-3:-1] == w.shape:
        layouts.append(np.swapaxes(q, -1, -2))          # the export transposed W [N, K] for x @ W
    if not layouts:
        raise NoMatch(f"%{v.name} {list(w.shape)} is not the codes {codes.name} {list(q.shape)} in some layout")
    k = w.shape[k_axis]
    target = np.moveaxis(w, k_axis, -1)
    for c in layouts:
        d = np.moveaxis(c, k_axis, -1).astype(np.float32)
        for block in (k,) + tuple(b for b in BLOCKS if b < k):
            s = _block_scales(d.reshape(-1, k), target.reshape(-1, k), block)
            if s is not None:
                scales = np.moveaxis(s.reshape(d.shape[:-1] + (s.shape[-1],)), -1, k_axis)
                return BlockCodes(np.ascontiguousarray(c), np.ascontiguousarray(scales), block, k_axis, codes.name)
    raise NoMatch(f"%{v.name} is not the codes {codes.name} times one scale per block of k (computed "
                  "some other way: dequantized at run time)")


def _region(v: Value) -> tuple[list[Node], Value]:
    """The nodes computing `v` from constants, in order, and the one low-bit constant among them; raises
    NoMatch."""
    if v.is_constant or v.shape is None or not all(isinstance(d, int) for d in v.shape):
        raise NoMatch(f"%{v.name} is not a computed weight of static shape")
    order, codes, seen, count = [], [], set(), 0
    stack = [(v, False)]
    while stack:
        u, done = stack.pop()
        node = u.producer
        if done:
            order.append(node)
            continue
        if id(u) in seen:
            continue
        seen.add(id(u))
        if u.is_constant:
            if low_bit_codes(u) or (u.const.ndim >= 2 and dq_format(u.const.dtype) is not None):
                codes.append(u)
            continue
        if node is None or node.domain or any(True for _ in node.subgraphs()):
            raise NoMatch(f"%{v.name} depends on %{u.name}, which is not computed from constants by standard ops")
        count += 1
        if count > REGION_LIMIT:
            raise NoMatch(f"%{v.name} takes more than {REGION_LIMIT} ops to compute from constants")
        stack.append((node.outputs[0], True))
        stack.extend((i, False) for i in node.inputs if i is not None)
    order = list({id(n): n for n in order}.values())
    if len(codes) != 1 or not low_bit_codes(codes[0]):
        raise NoMatch(f"%{v.name} is computed from {len(codes)} quantized constants (takes one of signed "
                      "int4, int8 or float8e4m3fn codes)")
    if codes[0].const.size != int(np.prod(v.shape)):
        raise NoMatch(f"%{v.name} {list(v.shape)} does not hold the {codes[0].const.size} codes of {codes[0].name}")
    return order, codes[0]


def _block_scales(d: np.ndarray, w: np.ndarray, block: int) -> Optional[np.ndarray]:
    """Scales [M, KB] with d * scale == w exactly (f32) for every block of `block` k, else None."""
    m, k = d.shape
    kb = -(-k // block)
    dp = np.pad(d, ((0, 0), (0, kb * block - k))).reshape(m, kb, block)
    wp = np.pad(w, ((0, 0), (0, kb * block - k))).reshape(m, kb, block)
    at = np.abs(dp).argmax(-1)[..., None]
    dm, wm = np.take_along_axis(dp, at, -1)[..., 0], np.take_along_axis(wp, at, -1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        s0 = np.where(dm != 0, wm / np.where(dm != 0, dm, 1), 1).astype(np.float32)
    # w / d is the scale to within an ulp (w rounded d * scale once): one of three candidates is it
    scales, found = s0.copy(), np.zeros(s0.shape, bool)
    for s in (s0, np.nextafter(s0, np.float32(np.inf)), np.nextafter(s0, np.float32(-np.inf))):
        ok = (dp * s[..., None] == wp).all(-1) & ~found
        scales[ok], found = s[ok], found | ok
        if found.all():
            return scales
    return None


def computed_from_codes(v: Optional[Value]) -> bool:
    """Is `v` computed by standard ops from constants, one of them low-bit codes (what `block_codes` reads)?"""
    try:
        return v is not None and bool(_region(v))
    except NoMatch:
        return False


E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


@register_pass("decode-low-bit")
def decode_low_bit(graph: Graph) -> PassResult:
    """Casts of weight codes no fusion took (a dequantization `block_codes` did not reproduce) -> ops every
    target runs, decoding at run time: int4 codes widen to int8 (exact), e4m3fn codes index a table of their
    256 values by their bytes."""
    result = PassResult()
    for node in list(graph.nodes):
        if node.qualified_op != "Cast" or node.graph is not graph or not low_bit_codes(node.inputs[0]):
            continue
        q = node.inputs[0]
        if q.const.dtype == np.int8 or node.attrs.get("to") != onnx.TensorProto.FLOAT:
            continue
        out = node.outputs[0]
        if q.const.dtype == np.dtype(ml_dtypes.int4):
            node.set_input(0, graph.add_constant(graph.unique_name(f"{q.name}/int8"), q.const.astype(np.int8)))
            result.count("int4 codes")
            continue
        bytes_ = graph.add_constant(graph.unique_name(f"{q.name}/bytes"), q.const.view(np.uint8))
        idx = graph.make_node("Cast", [bytes_], attrs={"to": onnx.TensorProto.INT32}, before=node,
                              types=[TensorType(dtypes.from_numpy(np.int32), q.const.shape)]).outputs[0]
        table = graph.add_constant(graph.unique_name("e4m3_values"), E4M3_VALUES)
        y = graph.make_node("Gather", [table, idx], attrs={"axis": 0}, before=node, types=[out.type]).outputs[0]
        if out.is_graph_output:
            y.name, out.name = out.name, y.name
        out.replace_all_uses_with(y)
        graph.remove(node)
        result.count("e4m3 codes")
    if result.modified:
        graph.remove_unused()
    return result
