#!/usr/bin/env python
"""Export a corpus of tiny, random-weight Hugging Face causal LMs to ONNX.

The corpus is the "real-model" test input of polyport's ONNX importer: the
graphs are produced by the same exporter (``torch.onnx.export(..., dynamo=True)``)
and the same ``transformers`` modelling code that real checkpoints go through,
only with tiny sizes and random weights, so that every file is small enough to
live in the repository.

Every exported model has the same signature::

    input_ids : int64   [1, seq]           (dim_param "seq", batch fixed to 1)
    logits    : float32 [1, seq, vocab]

and works for any ``seq`` from 1 upwards (checked at 1, 7, 33, 300 and 512).

Usage::

    python examples/export_hf.py                       # whole corpus + bundled model
    python examples/export_hf.py --out /tmp/m --only llama_a deepseek_v3
    python examples/export_hf.py --attn sdpa --opset 20 --no-check

``--only`` takes model names (``llama_a``), family names (``llama``) or
``bundled`` (the larger DeepSeek-V3-style default model,
``examples/deepseek_v3_tiny.onnx``).  Output: ``<out>/<family>_<config>.onnx``
plus ``<out>/corpus.json`` describing each model (family, config name, the full
HF config, layer counts, opset, attention implementation, check results).

Notes on the model set-up (why the script does what it does):

* Weights are random (``torch.manual_seed``; one fixed seed per model, derived
  from its name, so that each file is reproducible on its own).  Parameters
  that ``transformers`` initialises to a constant (RMSNorm weights = 1, router
  score-correction biases / attention sinks / position biases = 0, ...) are
  perturbed so that an importer that ignored them would be caught by a logit
  comparison.  DeepSeek-V4's hash-routing table ``tid2eid`` (zeros by default:
  every token would hit expert 0 ``top_k`` times) is filled with random
  distinct experts per token.
* MoE models use ``config._experts_implementation = "batched_mm"``: the default
  ("eager") expert loop iterates over data-dependent expert hits and does not
  export with a dynamic sequence length; ``batched_mm`` gathers the per-token
  expert weights and uses batched matmuls (fully static control flow).
* fp32, ``model.eval()``, ``use_cache=False``; attention is "eager" unless
  ``--attn sdpa`` (families whose ``transformers`` implementation has no SDPA
  path, e.g. DeepSeek-V4, stay eager; corpus.json records what was used).
* The sequence dimension is exported as ``torch.export.Dim("seq", min=1)``;
  the example input used for tracing has 17 tokens so that torch.export does
  not specialise on 0/1.  The ONNX graph input is checked (and if needed
  renamed) to carry ``dim_param: "seq"``.
* DeepSeek-V4's compressed attention (CSA / HCA, config ``deepseek_v4_b``) has
  Python branches on the sequence length that torch.export resolves for the
  traced length (the plain export fails in ONNX Runtime for seq < compress
  rate).  That model is traced with the branch-free, value-identical forwards
  of ``examples/hf_export_patches.py``; the ONNX file is still checked against
  the unpatched ``transformers`` model.  ``deepseek_v4_a`` (sliding-window
  attention only) needs no patch.  DeepSeek-V2 computes RoPE in complex numbers,
  which the exporter cannot lower: it is traced with the same product written on
  real (re, im) pairs.
* The exporter's per-node ``metadata_props`` (stack traces with absolute paths,
  FX dumps) are removed unless ``--keep-metadata``: the files are then
  byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers

EXAMPLES_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = EXAMPLES_DIR / "models"
BUNDLED_PATH = EXAMPLES_DIR / "deepseek_v3_tiny.onnx"

CHECK_SEQ_LENS = (1, 7, 33, 300, 512)
TRACE_SEQ_LEN = 17  # example length used for tracing (must not be 0 or 1)
REL_TOL = 1e-4  # max|ort - torch| / max|torch| accepted by --check
INIT_RANGE = 0.05  # std of the random weights (HF default is 0.02)


# --------------------------------------------------------------------------
# Model specifications
# --------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """One model of the corpus: a family plus one tiny config."""

    family: str  # e.g. "deepseek_v3"
    config_name: str  # e.g. "a"
    config_cls: str  # transformers class names (resolved lazily)
    model_cls: str
    config_kwargs: dict[str, Any]
    moe: bool = False
    supports_sdpa: bool = True
    post_init: Callable[[Any], None] | None = None  # extra weight set-up
    export_patch: str | None = None  # context manager in hf_export_patches used while tracing
    description: str = ""
    path: Path | None = None  # output override (bundled model)

    @property
    def name(self) -> str:
        return f"{self.family}_{self.config_name}"


COMMON = dict(
    initializer_range=INIT_RANGE,
    max_position_embeddings=2048,
    use_cache=False,
    tie_word_embeddings=False,
)


def _deepseek_v4_post_init(model) -> None:
    """Give every hash-routed MoE layer a random token -> experts table.

    ``tid2eid`` is a frozen buffer that real checkpoints ship; HF initialises it
    to zeros (all tokens -> expert 0, ``top_k`` times).  Use ``top_k`` distinct
    random experts per token instead.
    """

    for module in model.modules():
        if type(module).__name__ == "DeepseekV4HashRouter":
            vocab, top_k = module.tid2eid.shape
            table = torch.stack([torch.randperm(module.num_experts)[:top_k] for _ in range(vocab)])
            module.tid2eid.copy_(table)


def _specs() -> list[ModelSpec]:
    specs: list[ModelSpec] = []

    # ---- Llama: plain dense decoder, GQA ----------------------------------
    llama = dict(COMMON, vocab_size=256, hidden_size=64, intermediate_size=128, rms_norm_eps=1e-5)
    specs += [
        ModelSpec(
            "llama", "a", "LlamaConfig", "LlamaForCausalLM",
            dict(llama, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
            description="4 heads / 2 KV heads (GQA 2), head_dim 16",
        ),
        ModelSpec(
            "llama", "b", "LlamaConfig", "LlamaForCausalLM",
            dict(llama, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=1, head_dim=8,
                 vocab_size=320),
            description="8 heads / 1 KV head (MQA), head_dim 8, 3 layers",
        ),
    ]

    # ---- Mixtral: sparse MoE (softmax top-k router), GQA -----------------
    mixtral = dict(COMMON, vocab_size=256, hidden_size=64, intermediate_size=64)
    specs += [
        ModelSpec(
            "mixtral", "a", "MixtralConfig", "MixtralForCausalLM",
            dict(mixtral, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 num_local_experts=4, num_experts_per_tok=2),
            moe=True, description="4 experts top-2, 4 heads / 2 KV heads, full causal attention",
        ),
        ModelSpec(
            "mixtral", "b", "MixtralConfig", "MixtralForCausalLM",
            dict(mixtral, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                 num_local_experts=8, num_experts_per_tok=3, sliding_window=16),
            moe=True, description="8 experts top-3, 8 heads / 2 KV heads (GQA 4), sliding window 16",
        ),
    ]

    # ---- Qwen3-MoE: q/k RMSNorm, MoE router (norm_topk_prob) -------------
    qwen = dict(COMMON, vocab_size=384, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                head_dim=16)
    specs += [
        ModelSpec(
            "qwen3_moe", "a", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
            dict(qwen, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
            moe=True, description="8 experts top-2 (normalised), 4 heads / 2 KV heads, all layers MoE",
        ),
        ModelSpec(
            "qwen3_moe", "b", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
            dict(qwen, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
                 num_experts=16, num_experts_per_tok=4, norm_topk_prob=False, mlp_only_layers=[0]),
            moe=True,
            description="16 experts top-4 (unnormalised), 6 heads / 3 KV heads, layer 0 dense (mlp_only_layers)",
        ),
    ]

    # ---- DeepSeek-V3: MLA + group-limited (n_group/topk_group) MoE -------
    dsv3 = dict(COMMON, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)
    specs += [
        ModelSpec(
            "deepseek_v3", "a", "DeepseekV3Config", "DeepseekV3ForCausalLM",
            dict(dsv3, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                 n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1),
            moe=True,
            description="MLA with q_lora_rank 32, 4 heads; 8 experts top-2, 4 groups / top-2 groups; "
            "layer 0 dense, layers 1-2 MoE",
        ),
        ModelSpec(
            "deepseek_v3", "b", "DeepseekV3Config", "DeepseekV3ForCausalLM",
            dict(dsv3, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
                 n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=3, first_k_dense_replace=2),
            moe=True,
            description="MLA without q_lora_rank (direct q_proj), 2 heads; 16 experts top-4, 4 groups / "
            "top-3 groups; layers 0-1 dense, layer 2 MoE",
        ),
    ]

    # ---- DeepSeek-V4: shared-KV MQA (one K=V head) with attention sinks, sliding window,
    #      partial interleaved RoPE, grouped low-rank output projection, mHC hyper-connections,
    #      hash-routed + sqrt-softplus top-k MoE with clamped SwiGLU, and (config b) compressed
    #      attention: HCA (pooled windows) and CSA (overlapping windows + lightning indexer top-k).
    dsv4 = dict(COMMON, vocab_size=256, hidden_size=64, moe_intermediate_size=24, head_dim=32,
                partial_rotary_factor=0.5, q_lora_rank=32, num_key_value_heads=1, o_groups=2, o_lora_rank=16,
                n_shared_experts=1, hc_mult=2, hc_sinkhorn_iters=4, sliding_window=16, swiglu_limit=10.0,
                scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
                # Lightning indexer: score = sum_h w_h * relu(q_h . k), so a block whose dot products
                # are all <= 0 scores exactly 0, and exact ties at the top-k boundary are resolved
                # differently by torch.topk and ONNX TopK (lowest index first).  With 8 indexer heads
                # that happened at seq 512; 32 heads make all-negative blocks vanishingly rare
                # (no exact-zero score in 30 random inputs of length 300-1024).
                index_n_heads=32, index_head_dim=16, index_topk=4,
                compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8})
    specs += [
        ModelSpec(
            "deepseek_v4", "a", "DeepseekV4Config", "DeepseekV4ForCausalLM",
            dict(dsv4, num_hidden_layers=2, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                 layer_types=["sliding_attention"] * 2, mlp_layer_types=["hash_moe", "moe"]),
            moe=True, supports_sdpa=False, post_init=_deepseek_v4_post_init,
            description="sliding-window (16) attention, 4 heads sharing one K=V head, sinks; "
            "8 experts top-2: layer 0 hash-routed, layer 1 top-k routed",
        ),
        ModelSpec(
            "deepseek_v4", "b", "DeepseekV4Config", "DeepseekV4ForCausalLM",
            dict(dsv4, num_hidden_layers=3, num_attention_heads=8, n_routed_experts=16, num_experts_per_tok=4,
                 moe_intermediate_size=16,
                 layer_types=["heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention"],
                 mlp_layer_types=["hash_moe", "moe", "moe"]),
            moe=True, supports_sdpa=False, post_init=_deepseek_v4_post_init, export_patch="patched_deepseek_v4",
            description="8 heads sharing one K=V head; layer 0 HCA (rate 8), layer 1 CSA (rate 4, indexer "
            "top-4), layer 2 sliding only; 16 experts top-4: layer 0 hash-routed",
        ),
        ModelSpec(
            "deepseek_v4", "c", "DeepseekV4Config", "DeepseekV4ForCausalLM",
            dict(dsv4, num_hidden_layers=3, num_attention_heads=8, n_routed_experts=16, num_experts_per_tok=4,
                 moe_intermediate_size=16, sliding_window=8,
                 layer_types=["sliding_attention"] * 3, mlp_layer_types=["hash_moe", "moe", "moe"]),
            moe=True, supports_sdpa=False, post_init=_deepseek_v4_post_init,
            description="sliding-window (8) attention only, 8 heads sharing one K=V head, sinks; "
            "16 experts top-4: layer 0 hash-routed, layers 1-2 top-k routed",
        ),
        ModelSpec(
            "deepseek_v4", "d", "DeepseekV4Config", "DeepseekV4ForCausalLM",
            # layer_types / mlp_layer_types left to DeepseekV4Config's defaults (the published pattern).
            dict(dsv4, num_hidden_layers=4, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2),
            moe=True, supports_sdpa=False, post_init=_deepseek_v4_post_init, export_patch="patched_deepseek_v4",
            description="DeepseekV4Config's default layer pattern at 4 layers: HCA (rate 8), HCA, HCA, CSA "
            "(rate 4, indexer top-4), sliding window 16 and sinks on every layer; 8 experts top-2: "
            "layers 0-2 hash-routed, layer 3 top-k routed",
        ),
    ]
    specs += _deployed_family_specs()
    return specs


def _deployed_family_specs() -> list[ModelSpec]:
    """One tiny config per further decoder family that people deploy, MoE first.

    Each config picks the family's distinctive features: routers (softmax / sigmoid /
    grouped, shared experts, normalised or not), attention sinks, sliding windows,
    qk-norm, no-RoPE layers, logit softcapping, biases, partial RoPE.
    """
    base = dict(COMMON, vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    moe = dict(base, intermediate_size=64)
    spec = ModelSpec
    return [
        # ---- MoE -----------------------------------------------------------
        spec("qwen2_moe", "a", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
             dict(moe, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8,
                  num_experts_per_tok=2, norm_topk_prob=False, qkv_bias=True),
             moe=True, description="8 experts top-2 (unnormalised) + sigmoid-gated shared expert, q/k/v biases"),
        spec("olmoe", "a", "OlmoeConfig", "OlmoeForCausalLM",
             dict(moe, intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
             moe=True, description="8 experts top-2, q/k RMSNorm over all heads"),
        spec("granitemoe", "a", "GraniteMoeConfig", "GraniteMoeForCausalLM",
             dict(moe, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0,
                  logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.125),
             moe=True, description="4 experts top-2 (softmax over the top-k logits), embedding / residual / "
             "attention / logit multipliers"),
        spec("phimoe", "a", "PhimoeConfig", "PhimoeForCausalLM",
             dict(moe, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                  attention_bias=True, lm_head_bias=True),
             moe=True, description="4 experts top-2 (sparsemixer router), sliding window 8, biases"),
        spec("gpt_oss", "a", "GptOssConfig", "GptOssForCausalLM",
             dict(moe, intermediate_size=32, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                  sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
             moe=True, description="4 experts top-2 (biased router, clamped SwiGLU experts), attention sinks, "
             "sliding window 8 / full, q/k/v/o biases"),
        spec("ernie4_5_moe", "a", "Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
             dict(moe, moe_intermediate_size=32, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
                  moe_layer_start_index=1, moe_layer_interval=1),
             moe=True, description="8 experts top-2 (score-corrected softmax router) + 1 shared expert; layer 0 dense"),
        spec("glm4_moe", "a", "Glm4MoeConfig", "Glm4MoeForCausalLM",
             dict(moe, num_hidden_layers=3, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
                  routed_scaling_factor=1.5, use_qk_norm=True, attention_bias=True, head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
             moe=True, description="8 experts top-2 (sigmoid, 2 groups / top-1 group) + shared expert, qk-norm, "
             "partial RoPE, q/k/v biases; layer 0 dense"),
        spec("hunyuan_v1_moe", "a", "HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM",
             dict(moe, head_dim=16, num_experts=4, moe_topk=2),
             moe=True, description="4 experts top-2 + shared MLP, q/k RMSNorm after RoPE"),
        spec("deepseek_v2", "a", "DeepseekV2Config", "DeepseekV2ForCausalLM",
             dict(moe, num_hidden_layers=2, num_key_value_heads=4, moe_intermediate_size=32, kv_lora_rank=32,
                  q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, topk_method="greedy",
                  n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False),
             moe=True, export_patch="patched_deepseek_v2",
             description="MLA (RoPE on interleaved pairs) 4 heads; 8 experts top-2 (greedy softmax) + shared; "
             "layer 0 dense"),
        # ---- dense ---------------------------------------------------------
        spec("qwen3", "a", "Qwen3Config", "Qwen3ForCausalLM", dict(base, intermediate_size=128, head_dim=16),
             description="q/k RMSNorm per head, GQA 2"),
        spec("qwen2", "a", "Qwen2Config", "Qwen2ForCausalLM", dict(base, intermediate_size=128),
             description="q/k/v biases, GQA 2"),
        spec("mistral", "a", "MistralConfig", "MistralForCausalLM",
             dict(base, intermediate_size=128, sliding_window=8), description="sliding window 8 on every layer"),
        spec("gemma2", "a", "Gemma2Config", "Gemma2ForCausalLM",
             dict(base, intermediate_size=128, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
             description="attention and final logit softcapping, sliding window 8 / full alternating, "
             "GeGLU, sandwich norms"),
        spec("gemma3", "a", "Gemma3TextConfig", "Gemma3ForCausalLM",
             dict(base, intermediate_size=128, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                  layer_types=["sliding_attention", "full_attention"]),
             description="q/k RMSNorm, sliding window 8 / full, separate local RoPE base, GeGLU"),
        spec("phi3", "a", "Phi3Config", "Phi3ForCausalLM", dict(base, intermediate_size=128, pad_token_id=0),
             description="fused qkv and gate_up projections"),
        spec("olmo2", "a", "Olmo2Config", "Olmo2ForCausalLM", dict(base, intermediate_size=128),
             description="q/k RMSNorm over all heads, post-norms"),
        spec("granite", "a", "GraniteConfig", "GraniteForCausalLM",
             dict(base, intermediate_size=128, embedding_multiplier=2.0, logits_scaling=4.0,
                  residual_multiplier=0.5, attention_multiplier=0.125),
             description="embedding / residual / attention / logit multipliers"),
        spec("smollm3", "a", "SmolLM3Config", "SmolLM3ForCausalLM",
             dict(base, num_hidden_layers=4, intermediate_size=128, no_rope_layer_interval=2, pad_token_id=0),
             description="every second layer without RoPE (NoPE)"),
        spec("starcoder2", "a", "Starcoder2Config", "Starcoder2ForCausalLM",
             dict(base, intermediate_size=128, sliding_window=8, use_bias=True),
             description="LayerNorm, GELU MLP, biases everywhere, sliding window 8"),
    ]


def _bundled_spec(path: Path = BUNDLED_PATH) -> ModelSpec:
    """The larger DeepSeek-V3-style default model of polyport (examples/deepseek_v3_tiny.onnx)."""
    return ModelSpec(
        "deepseek_v3", "tiny", "DeepseekV3Config", "DeepseekV3ForCausalLM",
        dict(COMMON, vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=48,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=64,
             kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
             n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
             first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True),
        moe=True,
        description="bundled default model: MLA (q_lora_rank 64, kv_lora_rank 64), 8 heads; 16 experts "
        "top-4, 4 groups / top-2 groups, 1 shared expert; layer 0 dense, layers 1-3 MoE",
        path=path,
    )


# --------------------------------------------------------------------------
# Building, exporting, checking
# --------------------------------------------------------------------------


def _seed_for(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _perturb_constant_tensors(model) -> None:
    """Add noise to every floating parameter/buffer that is a constant tensor.

    HF initialises norm weights to 1 and biases / sinks / score corrections to
    0; random values make the logit comparison sensitive to all of them.
    """

    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            flat = t.reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                base = float(flat[0])
                scale = 0.1 * max(abs(base), 1.0) if base != 0.0 else 0.1
                t.add_(torch.randn_like(t) * scale)


def build_model(spec: ModelSpec, attn: str):
    """Instantiate the (random-weight, fp32, eval) HF model for ``spec``."""

    config_cls = getattr(transformers, spec.config_cls)
    model_cls = getattr(transformers, spec.model_cls)
    attn_used = attn if (attn == "eager" or spec.supports_sdpa) else "eager"
    torch.manual_seed(_seed_for(spec.name))
    config = config_cls(**copy.deepcopy(spec.config_kwargs))
    config._attn_implementation = attn_used
    if spec.moe:
        config._experts_implementation = "batched_mm"
    model = model_cls(config).to(torch.float32).eval()
    _perturb_constant_tensors(model)
    if spec.post_init is not None:
        spec.post_init(model)
    return model, config, attn_used


class LogitsOnly(torch.nn.Module):
    """``input_ids -> logits`` view of a causal LM (no cache, no other outputs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def layer_counts(model) -> dict[str, int]:
    """Decoder layers, and how many of them use an MoE vs a dense MLP block."""
    layers = model.model.layers
    blocks = [getattr(layer, "mlp", None) or layer.block_sparse_moe for layer in layers]  # GraniteMoe's name
    moe = sum(1 for block in blocks if hasattr(block, "experts"))
    hashed = sum(1 for block in blocks if getattr(block, "is_hash", False))
    out = {"num_layers": len(layers), "num_moe_layers": moe, "num_dense_layers": len(layers) - moe}
    if hashed:
        out["num_hash_moe_layers"] = hashed
    return out


def _rename_dim_param(model_proto, old: str, new: str) -> None:
    """Rename a symbolic dim everywhere it appears (inputs, outputs, value_info)."""
    pattern = re.compile(rf"\b{re.escape(old)}\b")
    for vi in list(model_proto.graph.input) + list(model_proto.graph.output) + list(model_proto.graph.value_info):
        if not vi.type.HasField("tensor_type"):
            continue
        for dim in vi.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = pattern.sub(new, dim.dim_param)


def _strip_metadata(model_proto) -> None:
    """Drop the per-node ``metadata_props`` the exporter attaches.

    They hold Python stack traces with absolute paths, FX node dumps, module
    paths, optimizer rule names...: about a third of the file size, and they make
    the file depend on where the script ran.  Kept with ``--keep-metadata``.
    """

    def strip(nodes):
        for node in nodes:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    strip(attr.g.node)
                for g in attr.graphs:
                    strip(g.node)

    strip(model_proto.graph.node)
    for fn in model_proto.functions:
        strip(fn.node)


def export_model(spec: ModelSpec, wrapper, path: Path, opset: int | None, keep_metadata: bool) -> dict[str, Any]:
    """torch.onnx.export (dynamo) with a dynamic ``seq`` dim; single self-contained file."""

    example = torch.randint(0, spec.config_kwargs["vocab_size"], (1, TRACE_SEQ_LEN),
                            generator=torch.Generator().manual_seed(0))
    seq = torch.export.Dim("seq", min=1)
    patch = contextlib.nullcontext()
    if spec.export_patch:
        import hf_export_patches  # examples/hf_export_patches.py (next to this script)

        patch = getattr(hf_export_patches, spec.export_patch)()
    t0 = time.perf_counter()
    with warnings.catch_warnings(), patch:
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {1: seq}},
            opset_version=opset,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    export_s = time.perf_counter() - t0

    proto = program.model_proto
    (inp,) = proto.graph.input
    (out,) = proto.graph.output
    in_dims = inp.type.tensor_type.shape.dim
    seq_name = in_dims[1].dim_param
    if not seq_name:
        raise RuntimeError(f"{spec.name}: the seq dim of input_ids was exported as static ({in_dims[1]})")
    if seq_name != "seq":
        _rename_dim_param(proto, seq_name, "seq")
    assert inp.name == "input_ids" and inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_value or d.dim_param for d in in_dims] == [1, "seq"], in_dims
    out_dims = [d.dim_value or d.dim_param for d in out.type.tensor_type.shape.dim]
    assert out.name == "logits" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out_dims == [1, "seq", spec.config_kwargs["vocab_size"]], out_dims
    proto.doc_string = f"polyport test corpus: {spec.name} ({spec.description}); random weights"
    if not keep_metadata:
        _strip_metadata(proto)

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path))
    opset_used = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"export_seconds": round(export_s, 2), "opset": opset_used, "traced_seq_dim_name": seq_name}


def check_model(spec: ModelSpec, wrapper, path: Path) -> dict[str, Any]:
    """Run the ONNX file in onnxruntime (CPU) and compare with the torch logits."""

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1234)
    vocab = spec.config_kwargs["vocab_size"]
    results = {}
    for n in CHECK_SEQ_LENS:
        ids = torch.randint(0, vocab, (1, n), generator=gen)
        (got,) = sess.run(["logits"], {"input_ids": ids.numpy()})
        with torch.no_grad():
            want = wrapper(ids).numpy()
        if got.shape != (1, n, vocab) or got.dtype != np.float32:
            raise AssertionError(f"{spec.name}: seq {n}: got {got.dtype}{got.shape}, want float32{(1, n, vocab)}")
        if not np.isfinite(got).all():
            raise AssertionError(f"{spec.name}: seq {n}: non-finite logits")
        scale = float(np.abs(want).max())
        diff = float(np.abs(got - want).max())
        results[n] = {"max_abs_diff": diff, "max_abs_logit": scale, "rel": diff / max(scale, 1e-12)}
    worst = max(r["rel"] for r in results.values())
    return {"ok": worst <= REL_TOL, "worst_rel_diff": worst, "per_seq": results}


def graph_stats(path: Path) -> dict[str, Any]:
    proto = onnx.load(str(path))
    ops = collections.Counter(
        (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}") for n in proto.graph.node
    )
    return {
        "file_bytes": path.stat().st_size,
        "num_nodes": len(proto.graph.node),
        "num_initializers": len(proto.graph.initializer),
        "num_functions": len(proto.functions),
        "opset_imports": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "op_histogram": dict(ops.most_common()),
    }


def _jsonable_config(config) -> dict[str, Any]:
    return json.loads(config.to_json_string(use_diff=False))


def run_one(spec: ModelSpec, out_dir: Path, opset: int | None, attn: str, check: bool,
            keep_metadata: bool = False) -> dict[str, Any]:
    path = spec.path or (out_dir / f"{spec.name}.onnx")
    model, config, attn_used = build_model(spec, attn)
    wrapper = LogitsOnly(model).eval()
    info = export_model(spec, wrapper, path, opset, keep_metadata)
    entry: dict[str, Any] = {
        "name": spec.name,
        "file": os.path.relpath(path, out_dir),  # relative to corpus.json
        "family": spec.family,
        "config_name": spec.config_name,
        "description": spec.description,
        "hf_model_class": spec.model_cls,
        "hf_config": _jsonable_config(config),
        **layer_counts(model),
        "vocab_size": spec.config_kwargs["vocab_size"],
        "opset": info["opset"],
        "attn_implementation": attn_used,
        "experts_implementation": "batched_mm" if spec.moe else None,
        "export_patch": spec.export_patch and f"hf_export_patches.{spec.export_patch}",
        "seed": _seed_for(spec.name),
        "export_seconds": info["export_seconds"],
        "graph": graph_stats(path),
    }
    if check:
        entry["check"] = check_model(spec, wrapper, path)
    return entry


def _select(specs: list[ModelSpec], only: list[str] | None) -> list[ModelSpec]:
    if not only:
        return specs
    unknown = set(only) - {s.name for s in specs} - {s.family for s in specs} - {"bundled"}
    if unknown:
        raise SystemExit(f"unknown --only {sorted(unknown)}; choose from {[s.name for s in specs]}, "
                         f"{sorted({s.family for s in specs if s.path is None})} or 'bundled'")
    return [s for s in specs if s.name in only or (s.family in only and s.path is None)
            or (s.path is not None and "bundled" in only)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: examples/models)")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="export only these models / families ('llama_a', 'mixtral', 'bundled', ...)")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's default)")
    ap.add_argument("--attn", choices=("eager", "sdpa"), default="eager", help="attention implementation")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="compare onnxruntime against torch at seq 1/7/33/300/512 (default: on)")
    ap.add_argument("--bundled-out", type=Path, default=BUNDLED_PATH,
                    help="where to write the bundled DeepSeek-V3-style default model "
                    "(default: examples/deepseek_v3_tiny.onnx)")
    ap.add_argument("--no-bundled", action="store_true", help="do not export the bundled model")
    ap.add_argument("--keep-metadata", action="store_true",
                    help="keep the exporter's per-node stack traces / FX dumps (bigger, machine-dependent files)")
    args = ap.parse_args(argv)

    for noisy in ("torch", "torch.onnx", "onnxscript", "onnx_ir", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()

    specs = _specs() + ([] if args.no_bundled else [_bundled_spec(args.bundled_out.resolve())])
    specs = _select(specs, args.only)
    out_dir: Path = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "corpus.json"
    manifest: dict[str, Any] = {"models": {}}
    if manifest_path.exists():  # partial re-exports (--only) update the manifest in place
        manifest = json.loads(manifest_path.read_text())

    manifest["generator"] = {
        "script": "examples/export_hf.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "signature": {"inputs": {"input_ids": ["int64", [1, "seq"]]},
                      "outputs": {"logits": ["float32", [1, "seq", "vocab_size"]]}},
        "check_seq_lens": list(CHECK_SEQ_LENS),
        "check_rel_tol": REL_TOL,
    }

    failures = []
    for spec in specs:
        print(f"== {spec.name}: {spec.description}", flush=True)
        try:
            entry = run_one(spec, out_dir, args.opset, args.attn, args.check, args.keep_metadata)
        except Exception as exc:  # keep going; report at the end
            failures.append(spec.name)
            print(f"   FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        g = entry["graph"]
        print(f"   {entry['file']}: {g['file_bytes'] / 1024:.0f} KiB, opset {entry['opset']}, {g['num_nodes']} nodes, "
              f"layers {entry['num_layers']} ({entry['num_moe_layers']} MoE / {entry['num_dense_layers']} dense), "
              f"attn {entry['attn_implementation']}, export {entry['export_seconds']:.1f}s", flush=True)
        if "check" in entry:
            c = entry["check"]
            per = ", ".join(f"seq {n}: {r['rel']:.1e}" for n, r in c["per_seq"].items())
            print(f"   check {'PASS' if c['ok'] else 'FAIL'} (max|ort-torch|/max|torch|: {per})", flush=True)
            if not c["ok"]:
                failures.append(spec.name)
        if spec.path is None:
            manifest["models"][spec.name] = entry
        else:
            manifest["bundled"] = entry

    manifest["models"] = dict(sorted(manifest["models"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    print(f"wrote {manifest_path}")
    if failures:
        print(f"FAILED: {failures}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
