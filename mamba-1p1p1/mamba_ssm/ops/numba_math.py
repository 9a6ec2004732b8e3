"""Elementwise float32 math for the numba CPU kernels, written so that LLVM vectorizes it.

numba has no vector math library on these machines: a `math.exp` or `math.log1p` call keeps a
loop scalar. These functions are plain arithmetic on the float's bits instead, inlined into the
kernels (`selective_scan_numba`, `bimamba_v2_numba`):

    exp2(x)      2^x: 2^k from the exponent bits times a degree-6 polynomial for 2^r, |r| <= 1/2
                 (Cephes' exp2f coefficients, about 1 ulp). Results below 2^-125.5 are 0 instead
                 of a subnormal (an absolute difference below 2.4e-38); overflow gives inf and NaN
                 stays NaN, as with torch.exp. float64 uses math.exp.
    silu(x)      x * sigmoid(x) = x / (1 + 2^(-x log2 e))
    softplus(x)  log(1 + e^x) = max(x, 0) + log1p(e^-|x|), with log1p(e) for e in [0, 1] as
                 2 atanh(s), s = e / (2 + e) <= 1/3: the odd series 2 (s + s^3/3 + ... + s^13/13),
                 whose first dropped term is below 1.1e-8 of the sum (float32 rounds at 6e-8)

Importing this module imports numba.
"""

import math

import numpy as np
from numba.core import types
from numba.extending import intrinsic, overload, register_jitable

LOG2E = 1.4426950408889634


_ROUND = 12582912.0  # 1.5 * 2^23: x + _ROUND rounds x to an integer k, held in the low mantissa bits


@intrinsic
def _pow2_from_rounded(typingctx, rounded):
    """2^(k-1) for rounded = k + _ROUND, k in [-126, 128] (k = -126 gives 0): the float whose
    exponent field is k + 126, made with 32-bit integer ops (so that LLVM keeps 32-bit lanes)."""
    def codegen(context, builder, signature, args):
        i32 = context.get_value_type(types.int32)
        bits = builder.shl(builder.bitcast(args[0], i32), i32(23))  # (k mod 2^9) << 23
        bits = builder.add(bits, i32(126 << 23))
        return builder.bitcast(bits, context.get_value_type(types.float32))

    return types.float32(types.float32), codegen


def exp2(x):
    return 2.0 ** x


@overload(exp2, inline="always")
def _exp2_overload(x):
    if x != types.float32:
        return lambda x: math.exp(x * 0.6931471805599453)

    def exp2f(x):
        # clamp to [-126, 128], NaN kept (each select compiles to one max/min that passes NaN on):
        # below, k <= -126 gives a zero scale; above, p * 2^127 overflows to inf
        x = np.float32(-126.0) if x < np.float32(-126.0) else x
        x = np.float32(128.0) if x > np.float32(128.0) else x
        rounded = x + np.float32(_ROUND)  # 2^x = 2^(k-1) * 2^(r+1), k = round(x), r in [-1/2, 1/2]
        r = x - (rounded - np.float32(_ROUND))
        p = np.float32(3.070672376639000e-4)
        p = p * r + np.float32(2.679774880533148e-3)
        p = p * r + np.float32(1.923687471534928e-2)
        p = p * r + np.float32(1.110066494232562e-1)
        p = p * r + np.float32(4.804529582726024e-1)
        p = p * r + np.float32(1.386294405710084)
        p = p * r + np.float32(2.0)
        # NaN (a diverged A or dt) must show, as in torch.exp: p is NaN then, whatever the scale
        return p * _pow2_from_rounded(rounded)

    return exp2f


@register_jitable
def silu(x):
    """float32 x * sigmoid(x); NaN stays NaN."""
    return x / (np.float32(1.0) + exp2(x * np.float32(-LOG2E)))


@register_jitable
def softplus(x):
    """float32 log(1 + e^x); NaN stays NaN."""
    e = exp2(-abs(x) * np.float32(LOG2E))  # in [0, 1]
    s = e / (np.float32(2.0) + e)
    s2 = s * s
    p = np.float32(1.0 / 13.0)
    p = p * s2 + np.float32(1.0 / 11.0)
    p = p * s2 + np.float32(1.0 / 9.0)
    p = p * s2 + np.float32(1.0 / 7.0)
    p = p * s2 + np.float32(1.0 / 5.0)
    p = p * s2 + np.float32(1.0 / 3.0)
    p = p * s2 + np.float32(1.0)
    return (x if x > np.float32(0.0) else np.float32(0.0)) + np.float32(2.0) * s * p
