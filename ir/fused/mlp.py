"""GatedMLP: y = (act(x @ w_gate) * (x @ w_up)) @ w_down  (dense MLPs and shared experts).

Weights are [in, out] (MatMul layout). With `clamp` > 0 (DeepSeek-V4 / gpt-oss
style SwiGLU limit) the gate is clamped from above and the up projection to
[-clamp, clamp] before they combine.
"""
import numpy as np

from ..ops import AttrSpec, attrs_of, define, infers, reference
from ..types import TensorType
from ._util import ACTIVATIONS, f32, like

define("GatedMLP", inputs=("x", "w_gate", "w_up", "w_down"), outputs=("y",),
       attrs={"activation": AttrSpec(str, "silu", choices=tuple(ACTIVATIONS)),
              "clamp": AttrSpec(float, 0.0, doc="SwiGLU limit; 0: none")},
       doc="Gated feed-forward block.")


@infers("GatedMLP", domain="polyport")
def _infer(node, ctx):
    x, wd = node.inputs[0].type, node.inputs[3].type
    out = wd.shape[-1] if wd.shape is not None else None
    return [TensorType(x.dtype, None if x.shape is None else x.shape[:-1] + (out,))]


def gated(gate: np.ndarray, up: np.ndarray, activation: str, clamp: float, alpha: float = 1.0,
          up_offset: float = 0.0) -> np.ndarray:
    """act(gate) * (up + up_offset), both halves clamped first when `clamp` > 0; `alpha` is SiLU's
    sigmoid slope, g * sigmoid(alpha * g) (gpt-oss: alpha 1.702, up_offset 1)."""
    if clamp:
        gate = np.minimum(gate, clamp)
        up = np.clip(up, -clamp, clamp)
    act = gate / (1.0 + np.exp(-np.float32(alpha) * gate)) if alpha != 1.0 else ACTIVATIONS[activation](gate)
    return act * (up + np.float32(up_offset)) if up_offset else act * up


@reference("GatedMLP", domain="polyport")
def gated_mlp(node, inputs, ctx):
    x, wg, wu, wd = inputs
    xf = f32(x)
    a = attrs_of(node)
    h = gated(xf @ f32(wg), xf @ f32(wu), a["activation"], a["clamp"])
    return [like(h @ f32(wd), x)]
