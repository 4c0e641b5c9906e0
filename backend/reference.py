"""`polyport.backend.reference`: the ONNX backend API over import -> reference executor.

Usable as `onnx.backend.test.BackendTest(polyport.backend.reference, __name__)`.
"""
from ..frontend.onnx_import import import_onnx
from ..runtime.reference import ReferenceSession
from ._common import make_backend


def reference_session(model) -> ReferenceSession:
    return ReferenceSession(import_onnx(model))


ReferenceBackend = make_backend("ReferenceBackend", reference_session)

is_compatible = ReferenceBackend.is_compatible
prepare = ReferenceBackend.prepare
run_model = ReferenceBackend.run_model
run_node = ReferenceBackend.run_node
supports_device = ReferenceBackend.supports_device
