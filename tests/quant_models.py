"""Corpus models quantized by ONNX Runtime's own MatMulNBitsQuantizer (a tool polyport did not write)."""
from __future__ import annotations

import logging
import pathlib

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from .real_models import model_path


def matmul_nbits(name: str, block: int, symmetric: bool, out_dir: pathlib.Path, gather: bool = False) -> pathlib.Path:
    """`name` from the corpus with every MatMul over a constant weight made int4 MatMulNBits (block `block`);
    asymmetric blocks carry packed zero points, symmetric ones use the implied zero 8. With `gather` the
    token-embedding Gather becomes GatherBlockQuantized too (blocks along hidden)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    path = pathlib.Path(out_dir) / f"{name}_int4_b{block}_{'sym' if symmetric else 'asym'}{'_gather' if gather else ''}.onnx"
    if not path.exists():
        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        ops = {"op_types_to_quantize": ("MatMul", "Gather"), "quant_axes": (("MatMul", 0), ("Gather", 1))} \
            if gather else {}
        q = MatMulNBitsQuantizer(onnx.load(model_path(name)),
                                 algo_config=DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, **ops))
        q.process()
        onnx.save(q.model.model, path)
    return path


def count_ops(path, op_type: str) -> int:
    return sum(n.op_type == op_type for n in onnx.load(path, load_external_data=False).graph.node)


def qdq(name: str, block: int, symmetric: bool, out_dir: pathlib.Path) -> pathlib.Path:
    """The same quantizer writing `quant_format=QDQ`: DequantizeLinear (uint4/int4, block_size, opset 21) -> MatMul."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    path = pathlib.Path(out_dir) / f"{name}_qdq_b{block}_{'sym' if symmetric else 'asym'}.onnx"
    if not path.exists():
        logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
        cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, quant_format=QuantFormat.QDQ)
        q = MatMulNBitsQuantizer(onnx.load(model_path(name)), algo_config=cfg)
        q.process()
        onnx.save(q.model.model, path)
    return path


def ort_exact(path, feeds):
    """ONNX Runtime with its DequantizeLinear -> MatMulNBits rewrite kept at accuracy level 0: by default
    (level 4) it quantizes the activations to int8 too, which moves logits by ~1%."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def nbits_node_model(bits=4, K=64, N=16, block=32, zero_points=True, bias=True):
    rng = np.random.default_rng(0)
    kb = -(-K // block)
    b = rng.integers(0, 256, size=(N, kb, block * bits // 8), dtype=np.uint8)
    inits = [helper.make_tensor("B", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
             helper.make_tensor("scales", TensorProto.FLOAT, [N * kb], rng.uniform(0.01, 0.1, N * kb))]
    ins = ["x", "B", "scales", "zp" if zero_points else "", "", "bias" if bias else ""]
    if zero_points:
        zp = rng.integers(0, 256, size=(N, -(-kb * bits // 8)), dtype=np.uint8)
        inits.append(helper.make_tensor("zp", TensorProto.UINT8, zp.shape, zp.tobytes(), raw=True))
    if bias:
        inits.append(helper.make_tensor("bias", TensorProto.FLOAT, [N], rng.standard_normal(N)))
    while not ins[-1]:
        ins.pop()
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s", N])], inits)
    return helper.make_model(graph, ir_version=10,
                             opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def dq_node_model(kind: str):
    """x [s, 64] -> MatMul or Gemm over DequantizeLinear(q) in the dtype / blocking of `kind`."""
    rng = np.random.default_rng(3)
    K, N = 64, 24
    codes = {"int4": (ml_dtypes.int4, TensorProto.INT4, -8, 8), "uint4": (ml_dtypes.uint4, TensorProto.UINT4, 0, 16),
             "int8": (np.int8, TensorProto.INT8, -128, 128), "fp8": (ml_dtypes.float8_e4m3fn, TensorProto.FLOAT8E4M3FN, -8, 8)}
    gemm = kind.endswith("_gemm")
    dt, code, lo, hi = codes[kind.split("_")[0]]
    shape = (N, K) if gemm else (K, N)
    q = rng.integers(lo, hi, size=shape).astype(dt)
    per_channel = kind == "int8"
    block = 0 if per_channel else 16
    if per_channel:
        scale = rng.uniform(0.01, 0.1, N).astype(np.float32)
    else:
        scale = rng.uniform(0.01, 0.1, (N, K // block) if gemm else (K // block, N)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(q, "q"), onnx.numpy_helper.from_array(scale, "scale")]
    dq_in = ["q", "scale"]
    if kind.startswith("uint4"):
        inits.append(onnx.numpy_helper.from_array(rng.integers(0, 16, scale.shape).astype(ml_dtypes.uint4), "zero"))
        dq_in.append("zero")
    attrs = {"axis": 1 if (gemm or per_channel) else 0}
    if block:
        attrs["block_size"] = block
    nodes = [helper.make_node("DequantizeLinear", dq_in, ["w"], **attrs)]
    if gemm:
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "c"))
        nodes.append(helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1))
    else:
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s", N])], inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)])
