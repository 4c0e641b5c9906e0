#!/usr/bin/env python
"""Benchmark-sized random-weight models (never downloaded; built, exported once, cached in the work dir).

    python benchmarks/big_model.py --work-dir DIR [--model NAME]      # prints the .onnx path
    python benchmarks/compare.py --work-dir DIR --models $(python benchmarks/big_model.py --work-dir DIR)

Each model is written twice under DIR: `NAME.onnx` (+ `NAME.onnx.data`, external weights: these
exceed protobuf's 2 GB) exported with examples/export_hf.py's machinery, and `NAME.hf/`, the same
weights as a Hugging Face checkpoint with a byte-level BPE tokenizer (GPT-2's regex), which
benchmarks/llama_cpp.py converts for llama.cpp. Needs torch and transformers (and tokenizers).

- `deepseek_v3_200m`: a ~200M DeepSeek-V3-style model (MLA, group-limited top-k MoE);
- issue 14's decode models: `llama_500m` (hidden 1536, 16 layers, intermediate 4096, 12 heads,
  4 kv heads), `qwen3_moe_700m` (hidden 1024, 12 layers, 32 experts top-4, moe_intermediate 512)
  and `deepseek_v3_600m` (MLA q_lora 384, kv_lora 256, rope 32; 32 experts top-4 + 1 shared).
  All have vocab 32000 and untied embeddings.
- `llama_tiny` (hidden 128, 2 layers, vocab 1024): built in seconds, for smoke runs of the scripts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BIG = "deepseek_v3_200m"

_DSV3 = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
             num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256,
             qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_shared_experts=1,
             first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True)

# name: (config class, model class, config, moe, description)
MODELS = {
    # ~200M: embeddings 2 x 32000 x 1024 (65.5M) + 4 layers of MLA attention (~2.9M each)
    # + 1 dense layer (8.7M) + 3 MoE layers of 24 experts x 3 x 1024 x 512 (+ a shared expert, router).
    BIG: ("DeepseekV3Config", "DeepseekV3ForCausalLM",
          dict(_DSV3, num_hidden_layers=4, n_routed_experts=24, num_experts_per_tok=4, n_group=4, topk_group=2),
          True, "~200M-parameter DeepSeek-V3-style benchmark model (MLA; 24 experts top-4, 4 groups / top-2; "
                "1 shared expert; layer 0 dense)"),
    # ~0.6M, built in seconds: a smoke run of the benchmark scripts' every path, never a measurement.
    "llama_tiny": ("LlamaConfig", "LlamaForCausalLM",
                   dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5),
                   False, "~0.6M Llama (hidden 128, 2 layers) for smoke runs"),
    # 98M embeddings + 16 x 25.2M.
    "llama_500m": ("LlamaConfig", "LlamaForCausalLM",
                   dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                        num_attention_heads=12, num_key_value_heads=4, rms_norm_eps=1e-5),
                   False, "~500M dense Llama (12 heads / 4 kv heads, head_dim 128)"),
    # 65.5M embeddings + 12 x (32 experts x 1.57M + attention 6.3M); active per token: 4 experts.
    "qwen3_moe_700m": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                       dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                            num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                            num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, rms_norm_eps=1e-6),
                       True, "~700M Qwen3-MoE (32 experts top-4, all layers MoE; 16 heads / 4 kv heads)"),
    # 65.5M embeddings + dense layer 0 + 10 MoE layers of (32 + 1 shared) experts x 1.57M + MLA.
    # One expert group: group-limited routing is not what this model measures.
    "deepseek_v3_600m": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                         dict(_DSV3, num_hidden_layers=11, n_routed_experts=32, num_experts_per_tok=4, n_group=1,
                              topk_group=1),
                         True, "~600M DeepSeek-V3 (MLA q_lora 384, kv_lora 256, rope 32; 32 experts top-4 + 1 "
                               "shared; layer 0 dense)"),
}
DECODE_MODELS = ("llama_500m", "qwen3_moe_700m", "deepseek_v3_600m")


def _export_hf():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import export_hf
    finally:
        sys.path.remove(str(EXAMPLES))
    return export_hf


def spec_for(name: str, path: Path):
    export_hf = _export_hf()
    config_cls, model_cls, config, moe, description = MODELS[name]
    family, size = name.rsplit("_", 1)
    return export_hf.ModelSpec(family, size, config_cls, model_cls, dict(export_hf.COMMON, **config), moe=moe,
                               description=description, path=path)


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE (GPT-2's pre-tokenizer regex, 256 byte tokens + merges learned from a fixed
    text) as tokenizer.json; the model's other ids are unused (llama.cpp's converter pads them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    text = [" ".join(f"polyport decodes token {i} of {i * 7 % 97} the quick brown fox" for i in range(400))]
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 600), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(text, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "model_max_length": 4096}, indent=2))


def export_big(work_dir: Path, log, name: str = BIG) -> Path:
    """NAME.onnx (external data) and NAME.hf/ in work_dir, built once per config."""
    import torch
    path = work_dir / f"{name}.onnx"
    hf_dir = work_dir / f"{name}.hf"
    stamp = work_dir / f"{name}.json"
    config = MODELS[name][2]
    key = hashlib.sha256(json.dumps([name, config, 2], sort_keys=True).encode()).hexdigest()
    if path.exists() and hf_dir.is_dir() and stamp.exists() \
            and json.loads(stamp.read_text()).get("config_sha256") == key:
        return path
    export_hf = _export_hf()
    spec = spec_for(name, path)
    log(f"building {name} (random weights) in {work_dir}: this takes a few minutes, once")
    model, _, _ = export_hf.build_model(spec, "eager")
    params = sum(p.numel() for p in model.parameters())
    log(f"{name}: {params / 1e6:.1f}M parameters; writing {hf_dir.name}")
    tmp_hf = hf_dir.with_name(f".{hf_dir.name}.tmp")
    shutil.rmtree(tmp_hf, ignore_errors=True)
    model.save_pretrained(tmp_hf, safe_serialization=True)
    cfg_path = tmp_hf / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if MODELS[name][0] == "DeepseekV3Config":
        cfg["scoring_func"] = "sigmoid"     # transformers leaves it out; llama.cpp's converter reads it
    cfg.pop("_experts_implementation", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    write_tokenizer(tmp_hf, config["vocab_size"])
    shutil.rmtree(hf_dir, ignore_errors=True)
    os.replace(tmp_hf, hf_dir)

    log(f"exporting {path.name} (torch.onnx dynamo, external data)")
    wrapper = export_hf.LogitsOnly(model).eval()
    example = torch.randint(0, config["vocab_size"], (1, export_hf.TRACE_SEQ_LEN),
                            generator=torch.Generator().manual_seed(0))
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad():
        torch.onnx.export(wrapper, (example,), str(tmp), dynamo=True, input_names=["input_ids"],
                          output_names=["logits"], dynamic_shapes={"input_ids": {1: torch.export.Dim("seq", min=1)}},
                          external_data=True, optimize=True, verbose=False)
    data = Path(str(tmp) + ".data")
    import onnx
    proto = onnx.load(str(tmp), load_external_data=False)
    dim = proto.graph.input[0].type.tensor_type.shape.dim[1]
    if dim.dim_param != "seq":
        export_hf._rename_dim_param(proto, dim.dim_param, "seq")
    for t in proto.graph.initializer:                    # point the weights at the final data file's name
        for e in t.external_data:
            if e.key == "location":
                e.value = f"{path.name}.data"
    onnx.save_model(proto, str(tmp), save_as_external_data=False)
    os.replace(data, Path(str(path) + ".data"))
    os.replace(tmp, path)
    stamp.write_text(json.dumps({"config_sha256": key, "parameters": params, "config": config}, indent=2))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--model", nargs="+", choices=sorted(MODELS), default=[BIG])
    args = ap.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for name in args.model:
        print(export_big(args.work_dir, lambda msg: print(f"big_model: {msg}", file=sys.stderr, flush=True), name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
