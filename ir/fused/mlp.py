"""GatedMLP: y = (act(x @ w_gate) * (x @ w_up)) @ w_down  (dense MLPs and shared experts).

Weights are [in, out] (MatMul layout); quantized (`bits` 4 | 8, `polyport compile --quantize`), each is
codes [in / 2 | in, out] with scales [ceil(in / block_size), out], K first as the MoE's experts
(ir/fused/moe.py). With `clamp` > 0 (DeepSeek-V4 / gpt-oss
style SwiGLU limit) the gate is clamped from above and the up projection to
[-clamp, clamp] before they combine.
"""
import numpy as np

from ..ops import AttrSpec, attrs_of, define, infers, reference
from ..types import TensorType
from ._util import ACTIVATIONS, f32, like

define("GatedMLP", inputs=("x", "w_gate", "w_up", "w_down", "gate_scales?", "up_scales?", "down_scales?"),
       outputs=("y",),
       attrs={"activation": AttrSpec(str, "silu", choices=tuple(ACTIVATIONS)),
              "clamp": AttrSpec(float, 0.0, doc="SwiGLU limit; 0: none"),
              "bits": AttrSpec(int, 0, doc="weights: 0 float, 4 | 8 codes with scales"),
              "block_size": AttrSpec(int, 0, doc="consecutive k sharing one scale (quantized weights)"),
              "format": AttrSpec(str, "int", choices=("int", "fp8e4m3"), doc="how a code decodes")},
       doc="Gated feed-forward block.")


@infers("GatedMLP", domain="polyport")
def _infer(node, ctx):
    x, wd = node.inputs[0].type, node.inputs[3].type
    out = wd.shape[-1] if wd.shape is not None else None
    return [TensorType(x.dtype, None if x.shape is None else x.shape[:-1] + (out,))]


def gated(gate: np.ndarray, up: np.ndarray, activation: str, clamp: float) -> np.ndarray:
    if clamp:
        gate = np.minimum(gate, clamp)
        up = np.clip(up, -clamp, clamp)
    return ACTIVATIONS[activation](gate) * up


@reference("GatedMLP", domain="polyport")
def gated_mlp(node, inputs, ctx):
    x, wg, wu, wd = inputs[:4]
    xf = f32(x)
    a = attrs_of(node)
    if a["bits"]:
        from .moe import expert_weights
        wg, wu, wd = (expert_weights(w[None], s[None], **a)[0] for w, s in zip((wg, wu, wd), inputs[4:7]))
    h = gated(xf @ f32(wg), xf @ f32(wu), a["activation"], a["clamp"])
    return [like(h @ f32(wd), x)]
