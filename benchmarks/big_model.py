#!/usr/bin/env python
"""`deepseek_v3_200m`: a ~200M-parameter DeepSeek-V3-style model (MLA, group-limited top-k MoE),
exported with examples/export_hf.py's machinery (random weights, never downloaded; exported once,
cached in the work dir). Needs torch and transformers.

    python benchmarks/big_model.py --work-dir DIR        # prints the .onnx path
    python benchmarks/compare.py --work-dir DIR --models $(python benchmarks/big_model.py --work-dir DIR)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BIG = "deepseek_v3_200m"

# ~200M parameters: embeddings 2 x 32000 x 1024 (65.5M) + 4 layers of MLA attention (~2.9M each)
# + 1 dense layer (8.7M) + 3 MoE layers of 24 experts x 3 x 1024 x 512 (+ a shared expert, router).
BIG_CONFIG = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
    num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
    q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=24, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
    first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
)


def export_big(work_dir: Path, log) -> Path:
    path = work_dir / f"{BIG}.onnx"
    stamp = work_dir / f"{BIG}.json"
    key = hashlib.sha256(json.dumps(BIG_CONFIG, sort_keys=True).encode()).hexdigest()
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()).get("config_sha256") == key:
        return path
    sys.path.insert(0, str(EXAMPLES))
    try:
        import export_hf
    finally:
        sys.path.remove(str(EXAMPLES))
    spec = export_hf.ModelSpec(
        "deepseek_v3", "200m", "DeepseekV3Config", "DeepseekV3ForCausalLM",
        dict(export_hf.COMMON, **BIG_CONFIG), moe=True,
        description="~200M-parameter DeepSeek-V3-style benchmark model (MLA; 24 experts top-4, "
                    "4 groups / top-2; 1 shared expert; layer 0 dense)", path=path)
    log(f"exporting {BIG} (random weights) to {path}: this takes a few minutes, once")
    model, config, attn = export_hf.build_model(spec, "eager")
    params = sum(p.numel() for p in model.parameters())
    log(f"{BIG}: {params / 1e6:.1f}M parameters")
    wrapper = export_hf.LogitsOnly(model).eval()
    tmp = path.with_name(f".{path.name}.tmp")
    spec.path = tmp
    info = export_hf.export_model(spec, wrapper, tmp, None, False)
    os.replace(tmp, path)
    stamp.write_text(json.dumps({"config_sha256": key, "parameters": params, "config": BIG_CONFIG, **info},
                                indent=2))
    return path



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(export_big(args.work_dir, lambda msg: print(f"big_model: {msg}", file=sys.stderr, flush=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
