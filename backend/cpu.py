"""`polyport.backend.cpu`: the ONNX backend API over import -> default passes -> cpu build -> Relax VM.

Usable as `onnx.backend.test.BackendTest(polyport.backend.cpu, __name__)`. The
build is the cpu target's own (`CpuTarget.build`) and the session its own
(`CpuSession`); only the artifact files are skipped: the executable and the
weights stay in memory. An op the cpu target cannot lower fails with its
`UnsupportedOpError` (node, op, reason); nothing falls back to another executor.

Some operands must be known when the cpu target builds (reduction axes, Tile
repeats, Slice bounds, ...: they decide shapes and loop nests). ONNX lets a model
take them as graph inputs. Such inputs are bound from the feeds: the model is
built on its first run with their values as constants, and once more for each
new value they take (one build per distinct value, cached).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import errors
from ..compiler import signature
from ..frontend.onnx_import import import_onnx
from ..passes.pipelines import run_pipeline
from ..runtime.cpu_session import CpuSession
from ..targets.base import CompileOptions, get_target
from ._common import make_backend

_REDUCTIONS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")
# op -> the input positions the cpu target needs as constants when it builds
BUILD_OPERANDS: dict[str, tuple[int, ...]] = {
    **{op: (1,) for op in _REDUCTIONS},
    "Squeeze": (1,), "Unsqueeze": (1,), "Slice": (1, 2, 3, 4), "Split": (1,), "TopK": (1,), "CumSum": (1,),
    "CumProd": (1,), "Range": (0, 1, 2), "Tile": (1,), "OneHot": (1,), "Trilu": (1,), "Pad": (1, 2, 3),
    "Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Resize": (1, 2, 3),
}


def cpu_session(model: onnx.ModelProto, pipeline: str = "default") -> CpuSession:
    """Import `model`, compile it for the host CPU and open a session over the build."""
    graph = import_onnx(model)
    run_pipeline(graph, pipeline)
    executable, meta, _ = get_target("cpu").build(graph, CompileOptions())
    weights = {v.name: v.const for v in graph.constants.values()}
    return CpuSession.from_executable(executable, meta, weights, signature(graph, graph.name or "model"))


def build_operand_inputs(model: onnx.ModelProto) -> list[str]:
    """The graph inputs that feed an operand in BUILD_OPERANDS directly."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = {i.name for i in g.input if i.name not in inits}
    used = {n.input[p] for n in g.node if n.domain in ("", "ai.onnx")
            for p in BUILD_OPERANDS.get(n.op_type, ()) if p < len(n.input) and n.input[p] in inputs}
    return [i.name for i in g.input if i.name in used]


class CpuModelSession:
    """A model's cpu builds, keyed by the values of its build-operand inputs (one build when it has none)."""

    def __init__(self, model: onnx.ModelProto):
        inits = {t.name for t in model.graph.initializer}
        self.model = model
        self.input_names = [i.name for i in model.graph.input if i.name not in inits]
        self.output_names = [o.name for o in model.graph.output]
        self.bound = build_operand_inputs(model)
        self._types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        self._builds: dict[tuple, CpuSession] = {}
        if not self.bound:           # built now, so an unsupported op fails `prepare`
            self._builds[()] = cpu_session(model)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        values = {n: self._bound_value(n, feeds) for n in self.bound}
        key = tuple((n, v.dtype.str, v.shape, v.tobytes()) for n, v in values.items())
        if key not in self._builds:
            self._builds[key] = cpu_session(self._specialised(values))
        sess = self._builds[key]
        return sess.run({n: feeds[n] for n in sess.input_names if n in feeds})

    def _bound_value(self, name: str, feeds: Mapping[str, Any]) -> np.ndarray:
        if name not in feeds:
            raise errors.InputError(f"missing input {name!r}")
        want = helper.tensor_dtype_to_np_dtype(self._types[name])
        v = np.asarray(feeds[name])
        if v.dtype != want:
            raise errors.InputError(f"input {name!r}: dtype {v.dtype}, the model declares {want}")
        return v

    def _specialised(self, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        """The model with the bound inputs turned into initializers holding `values`."""
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        kept = [i for i in m.graph.input if i.name not in values]
        del m.graph.input[:]
        m.graph.input.extend(kept)
        m.graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in values.items())
        return m


CpuBackend = make_backend("CpuBackend", CpuModelSession)

is_compatible = CpuBackend.is_compatible
prepare = CpuBackend.prepare
run_model = CpuBackend.run_model
run_node = CpuBackend.run_node
supports_device = CpuBackend.supports_device
