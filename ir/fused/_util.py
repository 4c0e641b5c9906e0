"""Helpers shared by the fused ops' definitions: errors, dtypes, activations."""
from __future__ import annotations

import numpy as np

from ... import errors
from ..types import TensorType


def node_error(node, msg: str) -> errors.PolyportError:
    """A shape or attribute error of a fused node, naming the node and its op."""
    return errors.PolyportError(f"node {node.name} ({node.qualified_op}): {msg}")


def f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float32, copy=False)


def like(out: np.ndarray, x: np.ndarray) -> np.ndarray:
    return out.astype(np.asarray(x).dtype, copy=False)


def same_type(node) -> list[TensorType]:
    return [node.inputs[0].type]


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu(x: np.ndarray) -> np.ndarray:
    from math import sqrt
    erf = np.vectorize(__import__("math").erf, otypes=[np.float32])
    return 0.5 * x * (1.0 + erf(x / sqrt(2.0)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


ACTIVATIONS = {"silu": silu, "gelu": gelu, "gelu_tanh": gelu_tanh}


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)
