"""The documented limits of the CANN operators the ascend target maps fused ops to.

IMPORTANT: every limit below is TRANSCRIBED from the CANN aclnn operator
documentation (CANN 8.0 / 8.1 "aclnn API" reference pages for Atlas A2
training/inference products, i.e. Ascend 910B) as the authors of polyport know
them. They were NOT verified against a CANN toolkit or an Ascend device: none
exists on the machines polyport is built and tested on. When a toolkit is
available, `atc` itself is the authority; treat a difference as a bug here.

A limit is data: (what, allowed values or bound, source). `check_*` functions
take the facts of one node (head dim, counts, dtype, ...) and either return
(a fallback was used: the caller emits standard ops instead and records the
warning) or raise `LimitError` naming the node, the CANN op and the limit.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

from ...errors import PolyportError

DOCS = "CANN aclnn API reference (Atlas A2), transcribed, not verified against a toolkit"

# The dtypes CANN's fused LLM operators accept for activations on Atlas A2.
DEVICE_FLOAT_DTYPES = ("float16", "bfloat16")


class LimitError(PolyportError):
    """A node breaks a documented limit of the CANN operator it maps to, and no fallback exists."""


class AscendFallbackWarning(UserWarning):
    """A node breaks a documented limit; polyport lowered it to decomposed standard ops instead."""


@dataclasses.dataclass(frozen=True)
class Limit:
    name: str                   # e.g. "head_dim"
    op: str                     # the CANN operator
    check: str                  # "max" | "min" | "in" | "multiple_of"
    value: Any
    source: str                 # the doc page it was transcribed from
    fallback: Optional[str] = None   # what polyport emits when it is broken (None: an error)

    def describe(self) -> str:
        if self.check == "in":
            text = f"one of {list(self.value)}"
        else:
            text = {"max": f"<= {self.value}", "min": f">= {self.value}",
                    "multiple_of": f"a multiple of {self.value}"}[self.check]
        return f"{self.name} {text}"

    def ok(self, actual: Any) -> bool:
        if self.check == "max":
            return actual <= self.value
        if self.check == "min":
            return actual >= self.value
        if self.check == "in":
            return actual in self.value
        if self.check == "multiple_of":
            return actual % self.value == 0
        raise AssertionError(self.check)


FIA = "FusedInferAttentionScore"
FIA_SRC = "aclnnFusedInferAttentionScoreV2 (constraints: query/key/value shapes, numHeads, numKeyValueHeads)"
FIA_PAGED_SRC = "aclnnFusedInferAttentionScoreV2 (blockTable / blockSize; the IncreFlashAttention branch)"
FIA_MLA_SRC = ("aclnnFusedInferAttentionScoreV3 (queryRopeOptional / keyRopeOptional, new in V3 per the CANN 8.2/8.3 "
               "aclnn pages; the 512 + 64 dims transcribed)")
SCATTER_SRC = "aclnnScatterPaKvCache (CANN 8.3; ops-transformer attention/scatter_pa_kv_cache)"
GATING = "MoeGatingTopK"
GATING_SRC = "aclnnMoeGatingTopK (constraints on x [N, E], k, kGroup, groupCount)"

WQBMM_SRC = "aclnnWeightQuantBatchMatmulV2"
DEQUANT = "weight dequantized at compile time into the compute dtype, a plain MatMul"
DEQUANT_EXPERTS = "expert weights dequantized at compile time into the compute dtype, no antiquant"
DEQUANT_TABLE = "embedding table dequantized at compile time into the compute dtype, a plain Gather"

LIMITS: dict[str, list[Limit]] = {
    FIA: [
        Limit("dtype", FIA, "in", DEVICE_FLOAT_DTYPES, FIA_SRC),
        Limit("input_layout", FIA, "in", ("BSH", "BSND", "BNSD", "TND"), FIA_SRC),
        Limit("head_dim", FIA, "max", 512, FIA_SRC),
        Limit("head_dim", FIA, "min", 1, FIA_SRC),
        Limit("num_heads", FIA, "max", 256, FIA_SRC),
        Limit("num_key_value_heads", FIA, "max", 256, FIA_SRC),
        Limit("batch", FIA, "max", 65536, FIA_SRC),
        Limit("sparse_mode", FIA, "in", (0, 1, 2, 3, 4), FIA_SRC),
        # value head dim must equal query/key head dim outside the dedicated MLA (D=512 + rope 64) path;
        # polyport pads v with zeros and slices the output (standard Pad/Slice) when they differ.
        Limit("value_head_dim_equals_qk_head_dim", FIA, "in", (True,), FIA_SRC,
              fallback="v zero-padded to the query/key head dim (Pad), output sliced back (Slice)"),
        # no parameter applies a function to the scores before the mask (Gemma 2's tanh soft-capping)
        Limit("softcap", FIA, "in", (0.0,), FIA_SRC,
              fallback="decomposed attention (MatMul, Tanh, masks, fp32 softmax with sinks, MatMul)"),
        # paged KV (blockTable): blockSize a multiple of 16 (verified: CANN 9.0 ATB PagedAttention constraints,
        # hiascend.com .../API/ascendtb/ascendtb_01_0198.html, "block_size % 16 == 0, recommended 128"); at most
        # 512, and at most 64 query heads per kv head in the incremental branch: transcribed, unverified.
        Limit("block_size", FIA, "multiple_of", 16, "ATB PagedAttention constraints (CANN 9.0): block_size % 16 == 0"),
        Limit("block_size", FIA, "max", 512, FIA_PAGED_SRC),
        Limit("kv_heads_ratio", FIA, "max", 64, FIA_PAGED_SRC),
        # MLA (queryRope / keyRope): (latent dim, rope dim) = (512, 64), DeepSeek's sizes,
        # as vLLM-Ascend's mla_v1 and cann-recipes-infer's DeepSeek-R1 call it. Transcribed, unverified.
        Limit("mla_dims", FIA, "in", ((512, 64),), FIA_MLA_SRC,
              fallback="one [latent ; rope] key per token (Concat of the two caches), FIA without queryRope/keyRope, "
                       "output sliced to the latent"),
    ],
    # Verified against ops-transformer attention/scatter_pa_kv_cache/README.md and the CANN 8.3 aclnn page
    # (hiascend.com .../83RC1/API/aolapi/context/aclnnScatterPaKvCache.md): key/value float16, bfloat16 or int8
    # on Atlas A2; caches 4-D; "Norm" = caches [num_blocks, block_size, num_head, head_size], slotMapping [tokens].
    "ScatterPaKvCache": [
        Limit("dtype", "ScatterPaKvCache", "in", DEVICE_FLOAT_DTYPES + ("int8",), SCATTER_SRC),
        Limit("cache_mode", "ScatterPaKvCache", "in", ("Norm", "PA_NZ"), SCATTER_SRC),
    ],
    GATING: [
        Limit("dtype", GATING, "in", ("float16", "bfloat16", "float32"), GATING_SRC),
        # expert count: the exact documented bound is not recalled with confidence (early 8.0 releases took
        # only E = 256, DeepSeek-V3's); polyport assumes <= 512. Least certain number in this table.
        Limit("expert_count", GATING, "max", 512, GATING_SRC,
              fallback="decomposed gating (Sigmoid/Softmax, Add, TopK, GatherElements, ReduceSum, Div, Mul)"),
        Limit("k", GATING, "max", 32, GATING_SRC,
              fallback="decomposed gating (Sigmoid/Softmax, Add, TopK, GatherElements, ReduceSum, Div, Mul)"),
        Limit("k", GATING, "min", 1, GATING_SRC),
        Limit("group_count", GATING, "max", 256, GATING_SRC),
        Limit("experts_per_group", GATING, "max", 32, GATING_SRC),
        Limit("norm_type", GATING, "in", ("softmax", "sigmoid"), GATING_SRC),
    ],
    "MoeInitRoutingV2": [
        Limit("expert_count", "MoeInitRoutingV2", "max", 10240,
              "aclnnMoeInitRoutingV2 (expertNum)"),
        Limit("dtype", "MoeInitRoutingV2", "in", DEVICE_FLOAT_DTYPES + ("float32",), "aclnnMoeInitRoutingV2"),
    ],
    "GroupedMatmul": [
        Limit("group_count", "GroupedMatmul", "max", 1024, "aclnnGroupedMatmulV4 (groupList length <= 1024)"),
        Limit("dtype", "GroupedMatmul", "in", DEVICE_FLOAT_DTYPES, "aclnnGroupedMatmulV4"),
        Limit("k_dim", "GroupedMatmul", "max", 65535, "aclnnGroupedMatmulV4 (K, N < 65536)"),
        Limit("n_dim", "GroupedMatmul", "max", 65535, "aclnnGroupedMatmulV4 (K, N < 65536)"),
        Limit("antiquant_weight", "GroupedMatmul", "in", ("int4", "int4_per_group", "int8"),
              "aclnnGroupedMatmulV4 (antiquant: INT8 weight per channel only; INT4 per channel or per group)",
              fallback=DEQUANT_EXPERTS),
        Limit("antiquant_group_even", "GroupedMatmul", "in", (True,),
              "aclnnGroupedMatmulV4 (INT4 per group: G divides k, k / G even)", fallback=DEQUANT_EXPERTS),
        Limit("antiquant_n_even", "GroupedMatmul", "in", (True,),
              "aclnnGroupedMatmulV4 (INT4 weight: last dim even)", fallback=DEQUANT_EXPERTS),
    ],
    "WeightQuantBatchMatmulV2": [
        Limit("weight", "WeightQuantBatchMatmulV2", "in", ("int4", "uint4", "int8", "uint8"), WQBMM_SRC + " (A16W4 / A16W8: weight INT4 / INT8; FLOAT8_E4M3FN per channel only, and only on Ascend 950)",
              fallback=DEQUANT),
        Limit("antiquant_group_size", "WeightQuantBatchMatmulV2", "multiple_of", 32,
              WQBMM_SRC + " (per group: antiquantGroupSize in [32, k - 1], a multiple of 32)", fallback=DEQUANT),
        Limit("int4_n_dim", "WeightQuantBatchMatmulV2", "multiple_of", 2, WQBMM_SRC + " (INT4 weight: last dim even)",
              fallback=DEQUANT),
    ],
    "Gather": [
        Limit("table", "Gather", "in", ("int4", "int8"), "ONNX opset 18 (what ATC parses): no FLOAT8 type; "
              "Gather over an INT8 table, Cast, Mul", fallback=DEQUANT_TABLE),
    ],
    "SwiGlu": [
        Limit("dtype", "SwiGlu", "in", DEVICE_FLOAT_DTYPES + ("float32",), "aclnnSwiGlu"),
        Limit("split_dim_even", "SwiGlu", "in", (True,), "aclnnSwiGlu (the split axis has an even length)"),
    ],
    "RmsNorm": [
        Limit("dtype", "RmsNorm", "in", DEVICE_FLOAT_DTYPES + ("float32",), "aclnnRmsNorm"),
    ],
    "RotaryPositionEmbedding": [
        Limit("dtype", "RotaryPositionEmbedding", "in", DEVICE_FLOAT_DTYPES + ("float32",),
              "aclnnRotaryPositionEmbedding"),
        Limit("head_dim", "RotaryPositionEmbedding", "max", 1024, "aclnnRotaryPositionEmbedding (D)"),
        Limit("head_dim", "RotaryPositionEmbedding", "multiple_of", 2, "aclnnRotaryPositionEmbedding (D even)"),
        Limit("mode", "RotaryPositionEmbedding", "in", ("half", "interleave"), "aclnnRotaryPositionEmbedding"),
    ],
}


def check(node: str, op: str, facts: dict[str, Any], record: list) -> list[str]:
    """Check `facts` against the limits of `op`; return the names of broken limits that have a fallback.

    Raises LimitError for the first broken limit without a fallback. For each broken limit with a
    fallback, warns (AscendFallbackWarning) and appends a record {node, op, limit, actual, fallback}."""
    fell_back = []
    for lim in LIMITS.get(op, []):
        if lim.name not in facts:
            continue
        actual = facts[lim.name]
        if lim.ok(actual):
            continue
        if lim.fallback is None:
            raise LimitError(f"node {node}: CANN {op} requires {lim.describe()}, got {actual!r} "
                             f"(limit from {lim.source}; {DOCS}); no fallback exists")
        msg = (f"node {node}: CANN {op} requires {lim.describe()}, got {actual!r} ({lim.source}); "
               f"used fallback: {lim.fallback}")
        warnings.warn(msg, AscendFallbackWarning, stacklevel=3)
        record.append({"node": node, "cann_op": op, "limit": lim.describe(), "actual": actual,
                       "fallback": lim.fallback, "message": msg})
        fell_back.append(lim.name)
    return fell_back


def limits_as_data() -> dict[str, list[dict]]:
    """The table as JSON-able data (written into the manifest entry)."""
    return {op: [{"limit": l.describe(), "source": l.source, "fallback": l.fallback} for l in ls]
            for op, ls in LIMITS.items()}
