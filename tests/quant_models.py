"""Corpus models quantized by ONNX Runtime's own MatMulNBitsQuantizer (a tool polyport did not write)."""
from __future__ import annotations

import logging
import pathlib

import onnx

from .real_models import model_path


def matmul_nbits(name: str, block: int, symmetric: bool, out_dir: pathlib.Path) -> pathlib.Path:
    """`name` from the corpus with every MatMul over a constant weight made int4 MatMulNBits (block `block`);
    asymmetric blocks carry packed zero points, symmetric ones use the implied zero 8."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    path = pathlib.Path(out_dir) / f"{name}_int4_b{block}_{'sym' if symmetric else 'asym'}.onnx"
    if not path.exists():
        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        q = MatMulNBitsQuantizer(onnx.load(model_path(name)),
                                 algo_config=DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric))
        q.process()
        onnx.save(q.model.model, path)
    return path


def count_ops(path, op_type: str) -> int:
    return sum(n.op_type == op_type for n in onnx.load(path, load_external_data=False).graph.node)
