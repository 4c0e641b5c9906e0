"""`polyport.backend.reference`: the ONNX backend API over import -> reference executor.

Usable as `onnx.backend.test.BackendTest(polyport.backend.reference, __name__)`.
"""
from ..runtime.reference import ReferenceSession
from ._common import make_backend

ReferenceBackend = make_backend("ReferenceBackend", ReferenceSession)

is_compatible = ReferenceBackend.is_compatible
prepare = ReferenceBackend.prepare
run_model = ReferenceBackend.run_model
run_node = ReferenceBackend.run_node
supports_device = ReferenceBackend.supports_device
