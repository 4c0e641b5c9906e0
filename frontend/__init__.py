"""ONNX import (into the IR) and export (back to ONNX)."""
from .onnx_export import export_onnx
from .onnx_import import import_onnx, load_model_proto

__all__ = ["export_onnx", "import_onnx", "load_model_proto"]
