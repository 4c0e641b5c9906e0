"""Quantized weights on Ascend: CANN's weight-only ("antiquant") matmuls, ANTIQUANT(w) = (w + offset) * scale.

  QuantMatMul, and each weight of a quantized GatedMLP (mlp.py)
                    -> WeightQuantBatchMatmulV2 (aclnnWeightQuantBatchMatmulV2): weight int8 / int4 [K, N],
                       antiquantScale [ceil(K / group), N] (per channel: [1, N]), optional antiquantOffset,
                       antiquantGroupSize (0: per channel; else a multiple of 32 below K)
  quantized MoE     -> GroupedMatmul's antiquantScaleOptional / antiquantOffsetOptional (moe.py): int4 per
                       group [E, G, N] or per channel; int8 per channel only (aclnnGroupedMatmulV4)
  QuantGather       -> Gather of the table's INT8 codes (int4 widened to one code per byte: opset 18's Gather
                       takes no INT4) and of its scales, Cast, Mul: only the gathered rows are dequantized

The codes stay codes in model.onnx (INT8, or ONNX INT4, two per byte), the scales in the compute dtype.
Unsigned codes (MatMulNBits' uint) become signed ones with the offset holding the difference:
(c - z) s = ((c - 2^(b-1)) + (2^(b-1) - z)) s. What CANN's antiquant does not take (fp8 per block on
Atlas A2, int8 per group in a GroupedMatmul, 16-bit weights, an fp8 or 16-bit table) falls back, recorded,
to the weight dequantized at compile time into the compute dtype: exact, but a 16-bit weight on the device.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper

from ...ir.fused.quant import dequantize
from ...ir.graph import Node
from ...ir.ops import attrs_of
from ...ir.quant_layout import unpack_nibbles
from .emission import CANN_DOMAIN, lowers

WQBMM = "WeightQuantBatchMatmulV2"


def signed_codes(q: np.ndarray, bits: int, fmt: str, k: int) -> np.ndarray:
    """[N, K] two's-complement codes (int8 values; int4 range for bits 4) of QuantMatMul-layout codes, and
    the shift (2^(bits-1) for uint, else 0) that was taken off them."""
    if bits == 4:
        c = unpack_nibbles(q, k).astype(np.int16)
        c = np.where(c >= 8, c - 16, c) if fmt == "int" else c - 8
    else:
        c = np.asarray(q).astype(np.int16) - (128 if fmt == "uint" else 0)
    return c.astype(np.int8)


def device_codes(c: np.ndarray, bits: int) -> np.ndarray:
    """int8 codes as the ONNX initializer CANN reads: INT8, or INT4 (ml_dtypes.int4, packed by ONNX)."""
    return c.astype(ml_dtypes.int4) if bits == 4 else c


def weight_kind(a: dict) -> str:
    """How CANN names the stored weight: int4 / uint4 / int8 / uint8, fp8e4m3, bf16, f16."""
    return f"{a['format']}{a['bits']}" if a["format"] in ("int", "uint") else a["format"]


@lowers("QuantMatMul")
def quant_matmul(em, node: Node) -> None:
    x, q = node.inputs[:2]             # q: [N, K / 2 | K] codes, s: [N, KB] (ir/fused/quant.py), none for 16 bits
    s = node.inputs[2] if len(node.inputs) > 2 else None
    z = node.inputs[3] if len(node.inputs) > 3 else None
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    antiquant_matmul(em, node, em.get(x, em.compute), q.const, None if s is None else s.const,
                     None if z is None else z.const, None if bias is None else em.get(bias, em.compute),
                     attrs_of(node), em.out(node.outputs[0], em.compute), node.name)


def antiquant_matmul(em, node: Node, x: str, q, s, z, bias, a: dict, out, base: str) -> str:
    """y = x @ dequantize(q, s, z) (+ bias) for QuantMatMul-layout operands (q [N, K / 2 | K], s / z [N, KB]):
    WeightQuantBatchMatmulV2 over the codes, or (a limit broken) a MatMul over the weight dequantized now."""
    k, n, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
    cd = em.compute
    npd = helper.tensor_dtype_to_np_dtype(cd)
    group = 0 if block >= k else block
    facts = {"weight": weight_kind(a), "antiquant_group_size": group}
    if bits == 4:
        facts["int4_n_dim"] = n
    if em.check(node, WQBMM, facts):      # a fallback: the weight dequantized now, a plain MatMul on device
        w = dequantize(q, s, z, **a)
        y = em.emit("MatMul", [x, em.const(w.T.astype(npd), f"{base}_w")],
                    [out if bias is None else (em.fresh(f"{base}_mm"), cd, out[2])],
                    note="antiquant fallback: weight dequantized at compile time")[0]
        return y if bias is None else em.emit("Add", [y, bias], [out])[0]
    c = signed_codes(q, bits, a["format"], k)
    offset = None
    if z is not None:             # (c - z) s = (signed c + shift - z) s
        shift = float(2 ** (bits - 1)) if a["format"] == "uint" else 0.0
        offset = shift - np.asarray(z, np.float32).T
    ins = [x, em.const(device_codes(np.ascontiguousarray(c.T), bits), f"{base}_weight"),
           em.const(np.asarray(s, np.float32).T.astype(npd), f"{base}_antiquant_scale"),
           "" if offset is None else em.const(np.ascontiguousarray(offset).astype(npd), f"{base}_antiquant_offset")]
    if bias is not None:
        ins.append(bias)
    return em.emit(WQBMM, ins, [out], {"antiquant_group_size": group}, CANN_DOMAIN,
                   note=f"{weight_kind(a)} codes, antiquant scale per "
                        f"{'group of ' + str(group) if group else 'channel'}")[0]


def moe_weights(em, node: Node, which: tuple[int, int], axis_concat: bool):
    """The GroupedMatmul weight (and antiquant scale) for quantized experts: codes [E, K, N] int8 / int4
    with scales [E, G, N] (int4 per group) or [E, N] (per channel); None when CANN's GroupedMatmul
    antiquant does not take them (the caller dequantizes)."""
    from ...ir.fused.moe import SCALES, expert_weights
    a = attrs_of(node)
    ws = [node.inputs[i] for i in which]
    ss = [node.inputs[SCALES[i - 3]] for i in which]
    k = ws[0].const.shape[1] * (2 if a["bits"] == 4 else 1)
    n = sum(w.const.shape[2] for w in ws)
    per_channel = a["block_size"] >= k
    facts = {"antiquant_weight": weight_kind(a) + ("" if per_channel else "_per_group"),
             "antiquant_group_even": per_channel or (a["block_size"] % 2 == 0 and k % a["block_size"] == 0),
             "antiquant_n_even": n % 2 == 0 or a["bits"] != 4}
    npd = helper.tensor_dtype_to_np_dtype(em.compute)
    if em.check(node, "GroupedMatmul", facts):
        full = [expert_weights(w.const, sc.const, **a) for w, sc in zip(ws, ss)]
        return em.const(np.concatenate(full, axis=-1).astype(npd), f"{node.name}_w_{'gate_up' if axis_concat else 'down'}"), None
    codes = []
    for w in ws:
        e = w.const.shape[0]
        per = [signed_codes(np.ascontiguousarray(w.const[i].T), a["bits"], a["format"], k).T for i in range(e)]
        codes.append(np.stack(per))
    scales = np.concatenate([np.asarray(sc.const, np.float32) for sc in ss], axis=-1)       # [E, G, N]
    if per_channel:
        scales = scales[:, 0, :]
    name = "gate_up" if axis_concat else "down"
    return (em.const(device_codes(np.concatenate(codes, axis=-1), a["bits"]), f"{node.name}_w_{name}"),
            em.const(scales.astype(npd), f"{node.name}_antiquant_scale_{name}"))


@lowers("QuantGather")
def quant_gather(em, node: Node) -> None:
    """y = dequantize(q, s)[ids] for a QuantGather's table (q [N, K / 2 | K], s [N, KB]): the codes' rows and
    the scales' rows gathered, each code times its group's scale; or (fp8, 16-bit) a Gather of the table
    dequantized now."""
    a = attrs_of(node)
    ids, q = node.inputs[:2]
    s = node.inputs[2] if len(node.inputs) > 2 else None
    k, bits, block = a["K"], a["bits"], a["block_size"]
    cd = em.compute
    npd = helper.tensor_dtype_to_np_dtype(cd)
    out = em.out(node.outputs[0], cd)
    rows = (lambda last: None) if out[2] is None else (lambda last: out[2][:-1] + [last])    # ids' dims + [last]
    idx = em.get(ids)
    if em.check(node, "Gather", {"table": weight_kind(a)}):
        table = dequantize(q.const, None if s is None else s.const, None, **a)
        em.emit("Gather", [em.const(table.astype(npd), f"{node.name}_table"), idx], [out], {"axis": 0},
                note="embedding table dequantized at compile time")
        return
    codes = em.const(signed_codes(q.const, bits, a["format"], k), f"{node.name}_codes")
    c = em.emit("Gather", [codes, idx], [(em.fresh(f"{node.name}_code_rows"), TensorProto.INT8, rows(k))],
                {"axis": 0}, note=f"{weight_kind(a)} codes of the gathered rows (INT8, one per byte)")[0]
    c = em.emit("Cast", [c], [(em.fresh(f"{node.name}_codes_f"), cd, rows(k))], {"to": cd})[0]
    kb = s.const.shape[1]
    sc = em.emit("Gather", [em.const(np.asarray(s.const, np.float32).astype(npd), f"{node.name}_scales"), idx],
                 [(em.fresh(f"{node.name}_scale_rows"), cd, rows(kb))], {"axis": 0})[0]
    if kb > 1:                    # each k's group scale: [.., KB] -> [.., K]
        sc = em.emit("Gather", [sc, em.ints(np.arange(k) // block, f"{node.name}_group_of_k")],
                     [(em.fresh(f"{node.name}_scale_k"), cd, rows(k))], {"axis": -1})[0]
    em.emit("Mul", [c, sc], [out], note="codes times their group's scale")
