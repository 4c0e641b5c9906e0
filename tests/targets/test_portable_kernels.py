"""The portable kernel set: the unscheduled TE computes the GPU targets schedule with dlight.

No GPU is needed to check what they compute: the same lowering (`kernels="portable"`: TE
Attention, Relax routing + TE MoE experts, weights as stored) is built for LLVM by the cpu
target and compared with ONNX Runtime on the original export. Schedules only reorder and
bind loops, so a cuda/rocm build computes what passes here (GPU numerics themselves are
checked by benchmarks/gpu_check.py on a GPU).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import polyport.runtime.session as session
from polyport import errors
from polyport.compiler import compile_model
from polyport.targets.base import CompileOptions
from polyport.targets.tvm_lower import lower_to_relax

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "examples" / "models"
CORPUS = json.loads((MODELS / "corpus.json").read_text())["models"]

# softmax / sigmoid + group-limited / sqrtsoftplus + hash routing; causal, windowed, sinks
CASES = ["mixtral_a", "deepseek_v3_b", "deepseek_v4_a"]


@pytest.mark.parametrize("name", CASES)
def test_portable_kernels_match_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = MODELS / CORPUS[name]["file"]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    art = compile_model(path, ["cpu"], tmp_path / "art",      # main only: prefill/decode are checked elsewhere
                        options=CompileOptions(extra={"kernels": "portable", "generation": False}))
    meta = json.loads((art / "cpu" / "model.json").read_text())
    assert meta["packed"] == {}, "portable kernels bind every weight as stored"
    sess = session.load(art, "cpu")
    vocab = CORPUS[name]["vocab_size"]
    for seq in (1, 33):
        ids = np.random.default_rng(seq).integers(0, vocab, size=(1, seq), dtype=np.int64)
        feeds = {i.name: ids for i in ref.get_inputs()}
        want = ref.run(None, feeds)[0]
        got = sess.run(feeds)[sess.output_names[0]]
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-4, f"{name} seq {seq}: relative error {err:.2e}"


def test_unknown_kernel_set_is_refused():
    from polyport.ir.graph import Graph
    with pytest.raises(errors.PolyportError, match="unknown kernel set 'fast'"):
        lower_to_relax(Graph("g"), "cpu", kernels="fast")


@pytest.mark.parametrize("act,clamp,w_dtype", [("silu", 0.0, "float32"), ("gelu", 1.0, "float16")])
def test_few_token_moe_gemv_matches_the_reference(act, clamp, w_dtype):
    """The decode program's MoE experts (kernels/portable/moe_gemv.py, loops serial here): for each token
    and chosen expert, gated(x wg[e], x wu[e]) * weight, then wd[e], summed over the slots (ir/fused/mlp.py's
    `gated`). I and Ho are not multiples of the block's TX channels, and one expert is never chosen."""
    import tvm
    from polyport.ir.fused.mlp import gated
    from polyport.targets.kernels.portable import moe_gemv
    T, K, E, H, I, HO = 3, 2, 5, 16, moe_gemv.TX + 9, 24
    rng = np.random.default_rng(7)
    x = rng.standard_normal((T, H)).astype(np.float32)
    idx = np.array([[0, 3], [3, 1], [4, 0]], np.int64)                 # expert 2 unused
    w = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
    wg, wu = (rng.standard_normal((E, H, I)).astype(w_dtype) * 0.3 for _ in range(2))
    wd = (rng.standard_normal((E, I, HO)) * 0.3).astype(w_dtype)
    wg[2] = wu[2] = np.nan                                              # read it and the result is NaN
    funcs = {"gate_up": moe_gemv.gate_up_func(hidden=H, inter=I, act=act, clamp=clamp, gpu=False, w_dtype=w_dtype),
             "down": moe_gemv.down_func(inter=I, out=HO, gpu=False, w_dtype=w_dtype)}
    ex = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}),
                     target=tvm.target.Target({"kind": "llvm"}))
    t = tvm.runtime.tensor
    hid, y = t(np.zeros((T, K, I), np.float32)), t(np.zeros((T, HO), np.float32))
    ex["gate_up"](t(x), t(idx), t(w), t(wg), t(wu), hid)
    ex["down"](hid, t(idx), t(wd), y)
    f = lambda a: a.astype(np.float32)  # noqa: E731
    want = sum(w[:, s, None] * (gated(x[:, None] @ f(wg[idx[:, s]]), x[:, None] @ f(wu[idx[:, s]]), act, clamp)
                                @ f(wd[idx[:, s]]))[:, 0] for s in range(K))
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
