"""ONNX backend API modules (`onnx.backend.test.BackendTest` compatible)."""
