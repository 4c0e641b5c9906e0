"""The corpus by family: what each export fuses and what each target does with it.

Every export in examples/models/corpus.json must pass every check: reference executor vs
ONNX Runtime, one `Attention` per attention layer, one `MoE` per MoE layer, cpu vs
ONNX Runtime at seq 7 and 57, ascend emulated within fp16 tolerance, cuda and rocm built.
GAPS lists the exceptions, each with its reason: a fusion gap states how many layers do fuse
(the fusion tests assert that count), a target gap is a strict xfail of that target's test.
README.md's family table is rendered from this module and corpus.json
(`python -m polyport.tests.families` prints it; tests/test_families.py checks the README
holds exactly that table), so the table says what the tests assert.

The five families of the first corpus run by default; of the families added since, only
DEFAULT_ADDED does: the rest of them are `slow`, and their TVM builds (cpu, cuda, rocm) `corpus`.
"""
from __future__ import annotations

import pytest

from .real_models import corpus

FIRST_FAMILIES = {"llama", "mixtral", "qwen3_moe", "deepseek_v3", "deepseek_v4"}
DEFAULT_ADDED = {"qwen2_moe_a", "gemma3_a"}

# Families whose dense MLP is not gated (fc -> activation -> proj): no GatedMLP.
UNGATED_MLP = {"starcoder2"}

# (export, check) -> reason; fusion checks: (layers that fuse, reason).
GAPS: dict[tuple[str, str], object] = {
    ("phimoe_a", "moe"): (0, "PhiMoE's SparseMixer router picks each expert from its own masked softmax "
                             "(a second softmax with the first choice masked out); polyport::MoE's top-k over one "
                             "score vector cannot express it"),
    ("gpt_oss_a", "moe"): (0, "gpt-oss experts have a router bias, per-expert biases and the clamped "
                              "(up + 1) * gate * sigmoid(1.702 gate) activation: none of them is in polyport::MoE"),
    ("gemma2_a", "attention"): (0, "Gemma 2 soft-caps the attention scores (tanh(s / 50) * 50 before the "
                                   "softmax); polyport::Attention has no softcap"),
}

CHECKS = ("reference", "attention", "moe", "cpu", "ascend", "cuda", "rocm")


def gap(name: str, check: str):
    return GAPS.get((name, check))


def expected(entry: dict) -> dict[str, int]:
    """Fused-op counts of a full fusion, from the export's Hugging Face config and layer counts."""
    cfg = entry["hf_config"]
    layer_types = cfg.get("layer_types") or ["full_attention"] * entry["num_layers"]
    shared = 1 if (cfg.get("n_shared_experts") or cfg.get("shared_expert_intermediate_size")
                   or cfg.get("moe_num_shared_experts") or cfg["model_type"] == "hunyuan_v1_moe") else 0
    dense = 0 if entry["family"] in UNGATED_MLP else entry["num_dense_layers"]
    hca, csa = (layer_types.count(t) for t in ("heavily_compressed_attention", "compressed_sparse_attention"))
    return {
        "polyport::Attention": len(layer_types),   # DeepSeek-V4's compressed layers included
        "polyport::MoE": entry["num_moe_layers"],
        "polyport::GatedMLP": dense + shared * entry["num_moe_layers"],
        "polyport::KVCompress": hca + 2 * csa,     # a CSA layer compresses its keys and its indexer's keys
        "polyport::SparseIndexer": csa,
    }


def fused_counts(name: str, entry: dict) -> dict[str, int]:
    """What the tests assert the default pipeline fuses: `expected`, less the stated gaps."""
    want = expected(entry)
    for check, op in (("attention", "polyport::Attention"), ("moe", "polyport::MoE")):
        g = gap(name, check)
        if g is not None:
            want[op] = g[0]
    return want


def is_default(name: str) -> bool:
    entries = corpus()
    return name not in entries or entries[name]["family"] in FIRST_FAMILIES or name in DEFAULT_ADDED


# Checks that build the export with TVM: minutes per export on 2 cores.
BUILD_CHECKS = {"cpu", "cuda", "rocm"}


def marks(name: str, check: str, *, default=None, raises=None, skip_gap: bool = False) -> list:
    """`slow` unless run by default (`is_default`, or membership of `default` where given), or `corpus`
    for the TVM builds of the families added since the first five (the whole matrix takes hours on
    2 cores: CI runs the first families' builds, `pytest -m corpus` the rest); where GAPS lists
    (name, check), a strict xfail (or a skip, for a fixture several tests share: some may pass)."""
    out = []
    if not is_default(name) if default is None else name not in default:
        entry = corpus().get(name)
        added = entry is not None and entry["family"] not in FIRST_FAMILIES
        out.append(pytest.mark.corpus if check in BUILD_CHECKS and added else pytest.mark.slow)
    reason = gap(name, check)
    if reason is not None:
        reason = reason if isinstance(reason, str) else reason[1]
        out.append(pytest.mark.skip(reason=reason) if skip_gap else
                   pytest.mark.xfail(reason=reason, raises=raises, strict=True))
    return out


def params(names, check: str, **kw) -> list:
    return [pytest.param(name, marks=marks(name, check, **kw), id=name) for name in names]


# ---- the README table --------------------------------------------------------------------------

def table() -> str:
    """README.md's family table (markdown), one row per export, footnotes for the gaps."""
    notes: list[str] = []

    def note(reason: str) -> str:
        if reason not in notes:
            notes.append(reason)
        return f" ({notes.index(reason) + 1})"

    rows = ["| family | export | Attention | MoE | reference vs ORT | cpu vs ORT (seq 7, 57) | ascend (fp16 emulated) "
            "| cuda built | rocm built |",
            "|---|---|---|---|---|---|---|---|---|"]
    entries = corpus()
    for name in sorted(entries, key=lambda n: (entries[n]["family"] not in FIRST_FAMILIES, n)):
        e = entries[name]
        want, got = expected(e), fused_counts(name, e)
        cells = [e["family"], name]
        for check, op in (("attention", "polyport::Attention"), ("moe", "polyport::MoE")):
            g = gap(name, check)
            cells.append("-" if want[op] == 0 else f"{got[op]}/{want[op]}" + (note(g[1]) if g else ""))
        for check in ("reference", "cpu", "ascend", "cuda", "rocm"):
            g = gap(name, check)
            cells.append("no" + note(g) if g else "yes")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows + [""] + [f"({i + 1}) {r}" for i, r in enumerate(notes)]) + "\n"


if __name__ == "__main__":
    print(table(), end="")
