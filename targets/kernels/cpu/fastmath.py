"""Vectorisable float32 math for the cpu kernels.

LLVM lowers `tirx.exp` on a vector to one libm call per lane; this exp is
plain arithmetic (Cody-Waite range reduction, a degree-6 polynomial, the
exponent built from bits), so a float32x8 loop stays in AVX2 registers.
Relative error about 2 ulp; exp(x) is exactly 0 below -87.3 (so -inf -> 0). tanh is
built on it (absolute error about 1e-7).
"""
from __future__ import annotations

from tvm import tirx

_COEFFS = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
           5.0000001201e-1)


def _f(v: float):
    return tirx.const(v, "float32")


def exp(x):
    """exp(x) of a float32 PrimExpr."""
    lo, hi = -87.3, 88.3
    xc = tirx.max(tirx.min(x, _f(hi)), _f(lo))
    n = tirx.floor(xc * _f(1.4426950408889634) + _f(0.5))
    r = xc - n * _f(0.693359375) - n * _f(-2.12194440e-4)
    p = _f(_COEFFS[0])
    for c in _COEFFS[1:]:
        p = p * r + _f(c)
    y = p * r * r + r + _f(1.0)
    two_n = tirx.reinterpret("float32", (n.astype("int32") + tirx.const(127, "int32")) << tirx.const(23, "int32"))
    return tirx.Select(x < _f(lo), _f(0.0), y * two_n)


def tanh(x):
    """tanh(x) of a float32 PrimExpr through `exp` (so it vectorises): sign(x) (1 - e) / (1 + e), e = exp(-2|x|)."""
    e = exp(_f(-2.0) * tirx.abs(x))
    t = (_f(1.0) - e) / (_f(1.0) + e)
    return tirx.Select(x < _f(0.0), -t, t)


def soft_cap(s, softcap: float):
    """c * tanh(s / c) (polyport::Attention's `softcap`); s itself for c == 0."""
    return _f(softcap) * tanh(s * _f(1.0 / softcap)) if softcap else s
