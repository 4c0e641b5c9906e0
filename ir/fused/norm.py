"""RMSNorm: y = x * rsqrt(mean(x^2, last axis) + epsilon) * weight, computed in fp32."""
import numpy as np

from ..ops import AttrSpec, define, infers, reference
from ._util import f32, like, same_type

define("RMSNorm", inputs=("x", "weight"), outputs=("y",),
       attrs={"epsilon": AttrSpec(float, doc="added to the mean square")},
       doc="Root-mean-square normalisation over the last axis, scaled by `weight` (shape [hidden]).")


@infers("RMSNorm", domain="polyport")
def _infer(node, ctx):
    return same_type(node)


@reference("RMSNorm", domain="polyport")
def rms_norm(node, inputs, ctx):
    x, w = inputs
    xf = f32(x)
    y = xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + node.attrs["epsilon"]) * f32(w)
    return [like(y, x)]
