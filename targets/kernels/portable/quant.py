"""QuantMatMul as a TE compute over the stored layout (qweight [N, ceil(K/2) | K], scales/zeros [N, KB]):
each weight is decoded where the reduction reads it. The GPU targets schedule it with dlight; the cpu
target uses it only where its packed kernel (kernels/cpu/quant_gemm.py) does not apply."""
from __future__ import annotations

from tvm import te, tirx

from ..quant_codes import value


def quant_matmul(x: te.Tensor, q: te.Tensor, s: te.Tensor, z, bias, *, K: int, N: int, bits: int,
                 block_size: int, format: str, k_major: bool = False):
    """x [M, K] -> y [M, N] = x @ dequantize(q, s, z)^T (+ bias); s is None for 16-bit weights. With
    `k_major` the operands are stored K first (q [K / 2 | K, N], s [KB, N]: a quantized GatedMLP's)."""
    m = x.shape[0]
    centred = z is None
    at = (lambda t, n, k: t[k, n]) if k_major else (lambda t, n, k: t[n, k])

    def weight(n, k):
        if bits == 4:
            b = at(q, n, tirx.floordiv(k, 2))
            code = tirx.Select(tirx.floormod(k, 2) == 0, value(b, bits, format, centred=centred),
                               value(b, bits, format, high=True, centred=centred))
        else:
            code = value(at(q, n, k), bits, format, centred=centred)
        if bits == 16:
            return code
        kb = tirx.floordiv(k, block_size)
        return (code - at(z, n, kb) if z is not None else code) * at(s, n, kb)

    r = te.reduce_axis((0, K), name="k")
    acc = te.compute((m, N), lambda i, n: te.sum(x[i, r].astype("float32") * weight(n, r), axis=r), name="qmatmul")
    if bias is None:
        return te.compute((m, N), lambda i, n: acc[i, n].astype(x.dtype), name="qmatmul_out")
    return te.compute((m, N), lambda i, n: (acc[i, n] + bias[n].astype("float32")).astype(x.dtype), name="qmatmul_out")


def quant_gather(ids: te.Tensor, q: te.Tensor, s, *, K: int, N: int, bits: int, block_size: int, format: str,
                 row_block: int = 0):
    """ids [...] -> y [..., K] float32, the rows of the table dequantize(q, s) [N, K] (QuantGather; q
    [N, K / 2 | K], s [N, KB] or None for 16-bit tables): only the gathered rows are decoded. With `row_block`
    NB the operands are bound column-blocked ([N / NB, X, NB]), as a tied LM head's QuantMatMul reads them."""
    at = (lambda t, r, k: t[tirx.floordiv(r, row_block), k, tirx.floormod(r, row_block)]) if row_block else \
        (lambda t, r, k: t[r, k])

    def element(*idx):
        r, k = ids[idx[:-1]].astype("int64"), idx[-1]
        r = tirx.Select(r < 0, r + tirx.const(N, "int64"), r)
        if bits == 4:
            b = at(q, r, tirx.floordiv(k, 2))
            code = tirx.Select(tirx.floormod(k, 2) == 0, value(b, bits, format), value(b, bits, format, high=True))
        else:
            code = value(at(q, r, k), bits, format)
        return code if bits == 16 else code * at(s, r, tirx.floordiv(k, block_size))

    return te.compute(list(ids.shape) + [K], element, name="quant_gather")
