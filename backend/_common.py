"""The ONNX backend API (as `onnxruntime.backend` offers it) over any polyport session factory."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import onnx
from onnx.backend.base import Backend, BackendRep

SessionFactory = Callable[[onnx.ModelProto], Any]  # model -> object with input_names, output_names, run(dict) -> dict


class PolyportRep(BackendRep):
    def __init__(self, session):
        self.session = session

    def run(self, inputs: Any, **kwargs) -> list[Any]:
        names = self.session.input_names
        if isinstance(inputs, dict):
            feeds = dict(inputs)
        else:
            if not isinstance(inputs, (list, tuple)):
                inputs = [inputs]
            feeds = dict(zip(names, inputs))
        out = self.session.run(feeds)
        return [out[n] for n in self.session.output_names]


def make_backend(name: str, factory: SessionFactory, devices: Sequence[str] = ("CPU",)) -> type[Backend]:
    class _Backend(Backend):
        @classmethod
        def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> bool:
            return cls.supports_device(device)

        @classmethod
        def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> PolyportRep:
            return PolyportRep(factory(model))

        @classmethod
        def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs) -> list[Any]:
            return cls.prepare(model, device).run(inputs)

        @classmethod
        def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "CPU", outputs_info=None, **kwargs):
            raise NotImplementedError("polyport runs models, not bare nodes")

        @classmethod
        def supports_device(cls, device: str) -> bool:
            return device.upper().split(":")[0] in devices

    _Backend.__name__ = name
    return _Backend
