"""Weights an export dequantizes from low-bit codes with ordinary ops (DeepSeek's FP8 128x128 blocks): read
back as codes and block scales by quant-matmul (passes/block_dequant.py), never folded into f32, and what is
not reproduced exactly decoded at run time."""
from __future__ import annotations

import numpy as np
import pytest

from polyport.frontend.onnx_import import import_onnx
from polyport.passes.pipelines import run_pipeline
from polyport.runtime.reference import ReferenceSession

from .fp8_models import linear_model
from .real_models import ort_run


def _x(K=200):
    return np.random.default_rng(5).standard_normal((7, K)).astype(np.float32)


@pytest.mark.parametrize("form,fmt", [("matmul", "fp8"), ("gemm", "fp8"), ("matmul", "int8"), ("gemm", "int4"),
                                      ("qdq", "fp8")])
def test_block_scaled_weight_becomes_quant_matmul(form, fmt):
    """W [136, 200] = codes * scale_inv over 128x128 blocks: QuantMatMul over the same codes with K-blocks of
    128 whose scales repeat over each block's 128 output rows; the same numbers as ONNX Runtime."""
    model = linear_model((form,), fmt)
    g = import_onnx(model)
    assert any(n.op_type in ("Cast", "DequantizeLinear") for n in g.nodes)     # the importer kept the codes
    run_pipeline(g)
    (qmm,) = g.nodes
    assert qmm.qualified_op == "polyport::QuantMatMul"
    assert qmm.attrs == {"K": 200, "N": 136, "bits": 4 if fmt == "int4" else 8, "block_size": 128,
                         "format": "fp8e4m3" if fmt == "fp8" else "int"}
    q, scales = qmm.inputs[1].const, qmm.inputs[2].const
    assert q.shape == ((136, 100) if fmt == "int4" else (136, 200)) and q.itemsize == 1
    assert scales.shape == (136, 2) and np.all(scales[:128] == scales[0]) and np.all(scales[128:] == scales[128])
    x = _x()
    np.testing.assert_allclose(ReferenceSession(g).run({"x": x})["y"], ort_run(model, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_small_codes_are_not_folded_into_f32():
    """A 16x24 fp8 weight is under the importer's folding limit; its Cast still stays."""
    model = linear_model(("matmul",), "fp8", K=24, N=16)
    g = import_onnx(model)
    (cast,) = [n for n in g.nodes if n.op_type == "Cast"]
    assert cast.inputs[0].const.dtype.itemsize == 1
    run_pipeline(g)
    assert [n.qualified_op for n in g.nodes] == ["polyport::QuantMatMul"]


def test_unrecognised_dequantization_is_decoded_at_run_time():
    """Codes times a scale per element have no block structure: the layer stays as exported, its e4m3
    codes decoded at run time through a table of their 256 values, still ONNX Runtime's numbers."""
    model = linear_model(("unrecognised", "matmul"))
    g = import_onnx(model)
    pm = run_pipeline(g)
    ops = [n.qualified_op for n in g.nodes]
    assert ops.count("polyport::QuantMatMul") == 1 and "MatMul" in ops and "Gather" in ops
    assert not any(n.op_type == "Cast" and n.inputs[0].dtype.name == "f8e4m3" for n in g.nodes)
    assert any("not the codes" in note and "times one scale per block" in note
               for r in pm.records for note in r.notes), pm.summary(explain=True)
    x = _x()
    np.testing.assert_allclose(ReferenceSession(g).run({"x": x})["y"], ort_run(model, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
