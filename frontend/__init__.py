"""ONNX import (into the IR); export back to ONNX is the IR's own (`ir/onnx_export.py`)."""
from ..ir.onnx_export import export_onnx
from .onnx_import import import_onnx, load_model_proto

__all__ = ["export_onnx", "import_onnx", "load_model_proto"]
