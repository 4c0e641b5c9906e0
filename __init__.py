"""polyport: one model graph in, deployable artifacts for CUDA, ROCm, Ascend and CPU out."""
__version__ = "0.1.0"

from .errors import PolyportError  # noqa: E402


def import_onnx(path, **kwargs):
    """Import an ONNX model into a polyport `Graph` (see `polyport.frontend`)."""
    from .frontend.onnx_import import import_onnx as _import
    return _import(path, **kwargs)


def load(path, target="cpu", **options):
    """Open a compiled artifact for one target: a session with `run(dict) -> dict` (see `polyport.runtime.session`)."""
    from .runtime.session import load as _load
    return _load(path, target, **options)


__all__ = ["__version__", "PolyportError", "import_onnx", "load"]
