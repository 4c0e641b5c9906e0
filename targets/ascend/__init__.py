"""The ascend target: what an Ascend (CANN) deployment consumes, checked against CANN's limits.

The package: emission.py (the walk, names, the op plan, standard ops), one module per fused
op (norm, rotary, attention, compress, mlp, moe; cache: the KV-cache ops of the derived programs),
programs.py (the prefill/decode programs over paged caches), limits.py (CANN's documented
limits), kernels.py (polyport's Ascend C kernels and atc.sh).

No CANN toolkit exists where polyport is built: everything here is GENERATED AND
CHECKED, NEVER RUN ON ASCEND. The artifact's `ascend/` folder holds

    model.onnx      opset 18 (what ATC accepts), fp16 weights (in weights.bin, shared with the
                    programs: weights.py); standard ops only from
                    CANN_ONNX_OPS; each fused op a node (or a chain of nodes) in the custom
                    domain CANN_DOMAIN named after the CANN operator it maps to:
                      Attention -> FusedInferAttentionScore (BNSD, sparse_mode, pre/next_tokens;
                                   sinks via its softmax_lse output: out * sigmoid(lse - sink))
                      MoE       -> MoeGatingTopK -> MoeInitRoutingV2 -> GroupedMatmul (gate|up)
                                   -> SwiGlu -> GroupedMatmul (down) -> MoeFinalizeRoutingV2
                      RMSNorm   -> RmsNorm
                      Rotary    -> RotaryPositionEmbedding (mode half / interleave)
                      GatedMLP  -> MatMul (gate|up concatenated) -> SwiGlu -> MatMul
                      QuantMatMul -> WeightQuantBatchMatmulV2 (antiquant scale / offset; quant.py)
                      QuantGather -> Gather of INT8 codes and of scales, Cast, Mul (quant.py)
                      KVCompress, SparseIndexer -> fp32 chains of standard ops (ascend/compress.py)
                    and the ops CANN lacks in KERNEL_DOMAIN (polyport's Ascend C kernels).
    op_plan.json    every call in order: op, domain, kind, attributes, input/output dtypes and
                    shapes (symbolic dims as text), the IR node it came from
    atc.sh          the atc command lines (generated, not run)
    prefill.onnx, decode.onnx (+ .op_plan.json)   when every attention can be cached: the derived
                    programs, the KV caches paged graph inputs/outputs (programs.py):
                      CacheUpdate     -> ScatterPaKvCache (K and V; MLA latent and rope key) or ScatterND
                      CachedAttention -> FusedInferAttentionScore (blockTable, actualSeqLengthsKv;
                                         queryRope/keyRope for MLA at 512 + 64)
    kernels/        msopgen op descriptions (JSON) and Ascend C sources for polyport's kernels

Rotary maps to aclnnRotaryPositionEmbedding (one tensor, mode 0 half / 1 interleave),
not aclnnApplyRotaryPosEmb: the latter rotates q and k together in place in BSND
layout, while the IR's Rotary is per tensor in BNSD.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping

from onnx import helper

from ...devices import ASCEND_910B3
from ...ir.graph import Graph
from ..base import CompileOptions, Target, register_target
from . import limits as L
from . import attention, cache, compress, mlp, moe, norm, quant, rotary  # noqa: F401 - each registers its fused op's lowering
from .emission import (BF16, CANN_DOMAIN, CANN_ONNX_OPS, CANN_OPS, F16, KERNEL_DOMAIN, NOT_RUN, OPSET, POLYPORT_KERNELS,
                       SOC, Emitter, check_model, dims, tname)
from .kernels import atc_script, write_kernels
from .programs import write_programs
from .weights import save_sharing_weights


# --dtype -> the compute dtype (f32 models run in f16, as Ascend deployments do)
COMPUTE = {"f32": F16, "f16": F16, "bf16": BF16}


@register_target
class AscendTarget(Target):
    name = "ascend"
    devices = {"910b3": ASCEND_910B3}
    default_device = "910b3"
    known_archs = (SOC,)

    def compute_dtype(self, options: CompileOptions) -> None:
        return None              # the Emitter converts the graph to its compute dtype itself

    def lower(self, graph: Graph, out_dir: Path, weights: Mapping[str, Any], options: CompileOptions,
              programs: Any = None) -> dict:
        out_dir = Path(out_dir)
        compute = COMPUTE.get(options.dtype)       # every fused operator takes both (limits.DEVICE_FLOAT_DTYPES)
        if compute is None:
            raise L.LimitError(f"ascend: compute dtype {options.dtype} is not supported: CANN's fused LLM "
                               f"operators take float16/bfloat16 ({L.DOCS})")
        archs = [a for a in options.archs if a in self.known_archs] or [SOC]    # the others are other targets'
        low = Emitter(graph, compute)
        derived = None
        with warnings.catch_warnings(record=True):      # recorded in the fallbacks; re-issued once below
            warnings.simplefilter("always", L.AscendFallbackWarning)
            low.run()
            capped = soft_capped(programs)
            if getattr(programs, "decode", None) is not None and not capped:     # None: some layer cannot be cached
                derived = write_programs(programs, out_dir, compute)
        fallbacks = low.fallbacks + (derived["fallbacks"] if derived else []) + capped
        for fb in fallbacks:          # re-issued outside the catch so callers see them
            warnings.warn(fb["message"], L.AscendFallbackWarning, stacklevel=2)
        inputs = [helper.make_tensor_value_info(v.name, v.type.dtype.onnx, dims(v.type.shape)) for v in graph.inputs]
        gp = helper.make_graph(low.nodes, graph.name or "main", inputs, low.outputs, low.inits)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(CANN_DOMAIN, 1)]
        if low.kernels:
            opsets.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
        model = helper.make_model(gp, opset_imports=opsets, producer_name="polyport", ir_version=8)
        model.doc_string = f"polyport ascend lowering for {SOC}; {NOT_RUN}"
        check_model(model)
        plan = {"soc_version": SOC, "compute_dtype": tname(compute), "status": NOT_RUN,
                "note": "calls in execution order; shapes use the model's symbolic dims as text",
                "calls": low.plan}
        (out_dir / "op_plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        models = [("model", model)] + (derived["models"] if derived else [])
        (out_dir / "atc.sh").write_text(atc_script(models, bf16=compute == BF16))
        model_files = save_sharing_weights(models, out_dir)
        kernel_files = write_kernels(out_dir, low.kernels)
        cann_calls = {c["op"] for c in low.plan if c["kind"] == "cann_operator"} | set(derived["cann"] if derived else ())
        files = model_files + ["op_plan.json", "atc.sh"]
        generation = {}
        if derived:
            files += [f"{name}.op_plan.json" for name, _ in derived["models"]]
            generation = {"programs": [name for name, _ in derived["models"]], "paged_cache": derived["layout"]}
        return {
            "archs": archs,
            "device": ASCEND_910B3.name,
            "status": NOT_RUN,
            "runtime": "emulated on CPU (no Ascend device): runtime/ascend_emulator.py runs model.onnx's op plan "
                       f"with NumPy implementations of each CANN operator's documented contract in {tname(compute)}",
            "toolchain": {"cann": None, "atc": "not run (no CANN toolkit here)", "onnx_opset": OPSET},
            "compute_dtype": tname(compute),
            "files": files + kernel_files,
            "cann_operators": sorted(cann_calls),
            "custom_kernels": sorted(low.kernels),
            "fallbacks": fallbacks,
            "checked": ["onnx.checker.check_model (full_check) at opset 18",
                        "standard ops within CANN_ONNX_OPS (transcribed allow-list)",
                        "every fused node against targets/ascend/limits.py (transcribed, unverified limits)"]
                       + (["the same for prefill.onnx and decode.onnx"] if derived else []),
            "not_checked": ["atc compilation", "execution or numerics on an Ascend device",
                            "the Ascend C kernels' compilation (no ccec/bisheng compiler here)"],
            **generation,
        }


def soft_capped(programs: Any) -> list[dict]:
    """A fallback record where decode attention soft-caps its scores (Gemma 2): FusedInferAttentionScore over
    paged caches has no soft-cap, so no programs are written and generation recomputes the sequence."""
    decode = getattr(programs, "decode", None)
    nodes = [n for n in decode.nodes if n.op_type == "CachedAttention" and n.attrs.get("softcap")] if decode else []
    out = []
    for n in nodes[:1]:
        msg = (f"node {n.name}: CANN FusedInferAttentionScore over paged caches has no logit soft-capping "
               f"(softcap {n.attrs['softcap']:g}); used fallback: no prefill/decode programs, generation "
               "recomputes the whole sequence")
        out.append({"node": n.name, "cann_op": L.FIA, "limit": "softcap in [0.0]", "actual": n.attrs["softcap"],
                    "fallback": "no decode programs (recompute)", "message": msg})
    return out
