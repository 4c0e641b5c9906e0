"""MoE experts for few tokens (the decode program): per-expert GEMVs over only the chosen experts.

At decode a step has a handful of tokens, so the expert compute is bandwidth bound: each chosen
expert's weights should be streamed once per (token, slot), coalesced. Two GPU kernels:

- `gate_up`: one thread per (token, slot, intermediate channel i); a block's threads take
  consecutive i, so each read of wg[e, h, i0:i0+TX] / wu[...] (the [E, H, I] layout) is one
  contiguous row segment; hid[t, s, i] = act(x wg) * (x wu) * routing weight.
- `down`: one thread per (token, output channel o), summing hid[t, s, i] wd[e, i, o] over the
  slots and i, again reading consecutive o per block.

Experts no token chose are never read. Threads write disjoint outputs, so with the loops serial
(`gpu=False`) the cpu target builds exactly this computation for the numerics check.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..memo import cached_kernel
from ..cpu.mlp import activation, clamp_up
from .cached_attention import loop

TX = 128        # channels per thread block


@cached_kernel
def gate_up_func(*, hidden: int, inter: int, act: str, clamp: float, gpu: bool, x_dtype: str = "float32",
                 w_dtype: str = "float32"):
    """PrimFunc gate_up(x [T, H], idx [T, K] int64, w [T, K] f32, wg [E, H, I], wu [E, H, I], hid [T, K, I] f32)."""
    H, I = hidden, inter
    NIB = (I + TX - 1) // TX
    bind = loop(gpu)
    zero = tirx.const(0.0, "float32")

    @T.prim_func(private=True)
    def moe_gate_up_gemv(x_h: T.handle, i_h: T.handle, w_h: T.handle, g_h: T.handle, u_h: T.handle,
                         o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        NT = T.int64()
        K = T.int64()
        E = T.int64()
        X = T.match_buffer(x_h, (NT, H), x_dtype)
        IDX = T.match_buffer(i_h, (NT, K), "int64")
        W = T.match_buffer(w_h, (NT, K), "float32")
        WG = T.match_buffer(g_h, (E, H, I), w_dtype)
        WU = T.match_buffer(u_h, (E, H, I), w_dtype)
        HID = T.match_buffer(o_h, (NT, K, I), "float32")
        for bx in bind(NT * K * T.int64(NIB), "blockIdx.x"):
            for tx in bind(T.int64(TX), "threadIdx.x"):
                acc = T.alloc_buffer((2,), "float32", scope="local")
                ts = bx // T.int64(NIB)
                i = bx % T.int64(NIB) * T.int64(TX) + tx
                t = ts // K
                s = ts % K
                if i < T.int64(I):
                    e = IDX[t, s]
                    acc[0] = zero
                    acc[1] = zero
                    for h in range(T.int64(H)):
                        acc[0] = acc[0] + T.Cast("float32", X[t, h]) * T.Cast("float32", WG[e, h, i])
                        acc[1] = acc[1] + T.Cast("float32", X[t, h]) * T.Cast("float32", WU[e, h, i])
                    HID[t, s, i] = activation(act, acc[0], clamp) * clamp_up(acc[1], clamp) * W[t, s]

    return moe_gate_up_gemv


@cached_kernel
def down_func(*, inter: int, out: int, gpu: bool, x_dtype: str = "float32", w_dtype: str = "float32"):
    """PrimFunc down(hid [T, K, I] f32, idx [T, K] int64, wd [E, I, Ho], y [T, Ho])."""
    I, HO = inter, out
    NOB = (HO + TX - 1) // TX
    bind = loop(gpu)
    zero = tirx.const(0.0, "float32")

    @T.prim_func(private=True)
    def moe_down_gemv(h_h: T.handle, i_h: T.handle, d_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        NT = T.int64()
        K = T.int64()
        E = T.int64()
        HID = T.match_buffer(h_h, (NT, K, I), "float32")
        IDX = T.match_buffer(i_h, (NT, K), "int64")
        WD = T.match_buffer(d_h, (E, I, HO), w_dtype)
        Y = T.match_buffer(y_h, (NT, HO), x_dtype)
        for bx in bind(NT * T.int64(NOB), "blockIdx.x"):
            for tx in bind(T.int64(TX), "threadIdx.x"):
                acc = T.alloc_buffer((1,), "float32", scope="local")
                t = bx // T.int64(NOB)
                o = bx % T.int64(NOB) * T.int64(TX) + tx
                if o < T.int64(HO):
                    acc[0] = zero
                    for s in range(K):
                        for i in range(T.int64(I)):
                            acc[0] = acc[0] + HID[t, s, i] * T.Cast("float32", WD[IDX[t, s], i, o])
                    Y[t, o] = T.Cast(x_dtype, acc[0])

    return moe_down_gemv
