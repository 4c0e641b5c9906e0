"""DeepSeek-V3-style FP8 checkpoints exported to ONNX, the way a user would write them for torch.onnx.export.

DeepSeek-V3's checkpoint stores every linear and expert weight as float8_e4m3fn [.., N, K] with a float32
`weight_scale_inv` [.., ceil(N / 128), ceil(K / 128)]: W = w * scale_inv over 128x128 blocks.
transformers' FP8 classes (integrations/finegrained_fp8.py) run Triton kernels; on a CPU the weights are
dequantized with that module's `_dequantize_fp8_weight`, which is what these modules call in forward.
The export keeps the codes: the exporter's own constant folding stops at 8192 elements, so each weight
here is larger than that.
"""
from __future__ import annotations

import pathlib

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper

BLOCK = (128, 128)
FP8_MAX = 448.0
CODE_MAX = {"fp8": FP8_MAX, "int8": 127.0, "int4": 7.0}


def block_quantize(w: np.ndarray, fmt: str, block=BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """NumPy: f32 [.., N, K] -> (codes [.., N, K] in `fmt` (fp8 | int8 | int4), scale_inv [.., NB, KB]),
    each (bn x bk) block's max |w| mapped to the codes' largest value."""
    *lead, n, k = w.shape
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = np.zeros((*lead, nb * bn, kb * bk), np.float32)
    padded[..., :n, :k] = w
    blocks = padded.reshape(*lead, nb, bn, kb, bk)
    amax = np.abs(blocks).max(axis=(-3, -1))
    scale = np.where(amax > 0, amax / CODE_MAX[fmt], 1).astype(np.float32)
    x = (blocks / scale[..., :, None, :, None]).reshape(*lead, nb * bn, kb * bk)[..., :n, :k]
    if fmt == "fp8":
        return x.astype(ml_dtypes.float8_e4m3fn), scale
    return np.rint(x).astype(ml_dtypes.int4 if fmt == "int4" else np.int8), scale


def dequantized(b, codes: np.ndarray, scale_inv: np.ndarray, block=BLOCK) -> str:
    """W = Cast(codes) * scale_inv repeated over its blocks, written into builder `b` (`const`, `ints`, `op`)
    as an export writes `w.float() * s.repeat_interleave(bn, -2).repeat_interleave(bk, -1)[.., :N, :K]`."""
    *lead, n, k = codes.shape
    nb, kb = scale_inv.shape[-2:]
    r = len(lead)
    s = b.op("Unsqueeze", b.const(scale_inv), b.ints(r + 1, r + 3))                     # [.., NB, 1, KB, 1]
    s = b.op("Expand", s, b.ints(*lead, nb, block[0], kb, block[1]))
    s = b.op("Reshape", s, b.ints(*lead, nb * block[0], kb * block[1]))
    s = b.op("Slice", s, b.ints(0, 0), b.ints(n, k), b.ints(r, r + 1))
    return b.op("Mul", b.op("Cast", b.const(codes), to=TensorProto.FLOAT), s)


def fp8_blocks(w):
    """torch f32 [.., N, K] -> (float8_e4m3fn codes, float32 scale_inv [.., ceil(N/128), ceil(K/128)]) as torch
    tensors, as DeepSeek quantizes (block_quantize)."""
    import torch
    codes, scale_inv = block_quantize(w.numpy(), "fp8")
    return torch.from_numpy(codes.view(np.uint8)).view(torch.float8_e4m3fn), torch.from_numpy(scale_inv)


def dequantize_linear(b, codes: np.ndarray, scale_inv: np.ndarray, block=BLOCK) -> str:
    """The QDQ form of the same weight: DequantizeLinear blocks one axis only (opset 21), so the block scales
    repeat over each block's rows and block K: scale [.., N, KB], axis -1, block_size bk."""
    rows = np.repeat(scale_inv, block[0], axis=-2)[..., :codes.shape[-2], :]
    return b.op("DequantizeLinear", b.const(codes), b.const(np.ascontiguousarray(rows)), axis=-1,
                block_size=block[1])


def linear_model(forms=("matmul",), fmt="fp8", K=200, N=136, seed=0):
    """x [s, K] through one linear layer per entry of `forms`, each weight [N, K] (then [N, N]) computed from
    `fmt` codes with 128x128 block scales: "matmul" (x @ W^T: a Transpose, then MatMul), "gemm" (Gemm
    transB=1 with a bias), "qdq" (DequantizeLinear blocked along K, then a Transpose and MatMul),
    "unrecognised" (codes times a scale per element: no block structure)."""
    from .passes.test_fuse_moe import _Builder
    rng = np.random.default_rng(seed)
    b = _Builder()
    y, k = "x", K
    for form in forms:
        w = (rng.standard_normal((N, k)) * 0.2).astype(np.float32)
        codes, scale_inv = block_quantize(w, fmt)
        if form == "unrecognised":
            s = rng.uniform(0.5, 1.5, (N, k)).astype(np.float32) * np.repeat(np.repeat(
                scale_inv, 128, 0), 128, 1)[:N, :k]
            wv = b.op("Mul", b.op("Cast", b.const(codes), to=TensorProto.FLOAT), b.const(s))
        elif form == "qdq":
            wv = dequantize_linear(b, codes, scale_inv)
        else:
            wv = dequantized(b, codes, scale_inv)
        if form == "gemm":
            y = b.op("Gemm", y, wv, b.const(rng.standard_normal(N).astype(np.float32)), transB=1)
        else:
            y = b.op("MatMul", y, b.op("Transpose", wv, perm=[1, 0]))
        k = N
    b.nodes[-1].output[0] = "y"
    graph = helper.make_graph(b.nodes, "fp8_linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s", N])], b.inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)])


def _fp8_linear_class():
    import torch
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    class FP8BlockLinear(torch.nn.Module):
        """nn.Linear over an FP8 128x128-block weight, dequantized by transformers' own CPU path."""

        def __init__(self, linear):
            super().__init__()
            q, s = fp8_blocks(linear.weight.detach().float())
            self.register_buffer("weight", q)
            self.register_buffer("weight_scale_inv", s)
            self.bias = linear.bias

        def forward(self, x):
            w = _dequantize_fp8_weight(self.weight, self.weight_scale_inv, list(BLOCK), torch.float32)
            return torch.nn.functional.linear(x, w, self.bias)
    return FP8BlockLinear


def to_fp8(model, keep=("lm_head",)) -> None:
    """Make `model`'s linear layers (all but `keep`) and 3-D expert weights (gate_up_proj, down_proj) FP8 with
    128x128 block scales, in place, as DeepSeek-V3's checkpoint holds them."""
    import torch
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    fp8_linear = _fp8_linear_class()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name not in keep:
                setattr(module, child_name, fp8_linear(child))
        experts = [p for p in ("gate_up_proj", "down_proj")
                   if isinstance(module._parameters.get(p), torch.nn.Parameter) and module._parameters[p].ndim == 3]
        if not experts:
            continue
        props = {}
        for p in experts:
            q, s = fp8_blocks(module._parameters.pop(p).detach().float())
            module.register_buffer(f"{p}_fp8", q)
            module.register_buffer(f"{p}_scale_inv", s)
            props[p] = property(lambda self, p=p: _dequantize_fp8_weight(
                getattr(self, f"{p}_fp8"), getattr(self, f"{p}_scale_inv"), list(BLOCK), torch.float32))
        module.__class__ = type(f"FP8{type(module).__name__}", (type(module),), props)


def _export_hf():
    """examples/export_hf.py (the corpus exporter), imported from its folder."""
    import sys
    examples = str(pathlib.Path(__file__).resolve().parent.parent / "examples")
    sys.path.insert(0, examples)
    try:
        import export_hf
    finally:
        sys.path.remove(examples)
    return export_hf


def deepseek_v3_fp8(out_dir: pathlib.Path) -> pathlib.Path:
    """A tiny random DeepSeek-V3 (MLA; layer 0 dense, layer 1 MoE: 4 experts top-2 + a shared expert) with its
    linear and expert weights in FP8 128x128 blocks, exported as examples/export_hf.py exports the corpus."""
    path = pathlib.Path(out_dir) / "deepseek_v3_fp8.onnx"
    if path.exists():
        return path
    import torch
    import transformers
    torch.manual_seed(0)
    config_kwargs = dict(
        vocab_size=256, hidden_size=256, intermediate_size=384, moe_intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
        n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        initializer_range=0.05, max_position_embeddings=256, use_cache=False, tie_word_embeddings=False)
    config = transformers.DeepseekV3Config(**config_kwargs)
    config._attn_implementation = "eager"
    config._experts_implementation = "batched_mm"
    model = transformers.DeepseekV3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "norm" in name:
                t.add_(torch.randn_like(t) * 0.1)
            elif name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn_like(t) * 0.1)
        for name, t in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn_like(t) * 0.1)
    to_fp8(model)

    export_hf = _export_hf()
    spec = export_hf.ModelSpec("deepseek_v3", "fp8", "DeepseekV3Config", "DeepseekV3ForCausalLM", config_kwargs,
                               moe=True, description="FP8 128x128-block linear and expert weights", path=path)
    export_hf.export_model(spec, export_hf.LogitsOnly(model), path, None, keep_metadata=False)
    return path
