"""The optional numba CPU kernel for the inference scan (needs numba; no C compiler).

numba ships wheels with its own LLVM for x86-64 and aarch64, so a Raspberry Pi gets a compiled
kernel without a compiler. The kernel does the whole selective scan, the D skip included, in one
pass, keeping each work item's state (n x 32 values) in L1:

    for each (batch row k, block of 32 channels), in parallel:
        for t in 0..l-1:  h[n, :] = exp(dt_t * A[n, :]) * h[n, :] + dt_t * x_t * B_t[n]
                          y_t     = sum_n C_t[n] * h[n, :] + D * x_t

so nothing of size l * d * n is ever written to memory (the pure-PyTorch path makes five passes
over such buffers), and a whole scan is one parallel region instead of hundreds of small ops.

exp(dt A) is computed as 2^(dt A log2 e) with `numba_math.exp2`, which LLVM vectorizes (float32;
float64 uses math.exp).

Compiled code is cached on disk (numba's cache=True: in __pycache__ next to this file, or the
user's cache directory when that is not writable), so only the first run on a machine compiles
(a few seconds). Importing numba costs ~50 MB of RSS and the first scan ~50 MB more (LLVM and
the thread pool), which is why it is optional.
"""

import math

import numba
import numpy as np
import torch

from mamba_ssm.ops.numba_math import LOG2E, exp2

BLOCK = 32  # channels per work item: several independent vectors per step keep the FMA units busy


@numba.njit(parallel=True, cache=True, fastmath={"contract"}, error_model="numpy", boundscheck=False)
def _scan(dt, x, At, B, C, D, h0, y, h_last):
    """dt, x, y: (K, l, d);  At, h0, h_last: (K, n, d);  B, C: (K, l, n);  D: (K, d).
    D and h0 may have 0 rows (no skip / zero initial state). d is a multiple of BLOCK."""
    K, l, d = dt.shape
    n = At.shape[1]
    blocks = d // BLOCK
    for item in numba.prange(K * blocks):
        k, j0 = item // blocks, (item % blocks) * BLOCK
        A = np.empty((n, BLOCK), dt.dtype)
        h = np.zeros((n, BLOCK), dt.dtype)
        skip = np.zeros(BLOCK, dt.dtype)
        for i in range(n):
            for j in range(BLOCK):
                A[i, j] = At[k, i, j0 + j] * LOG2E  # exp(dt A) = 2^(dt A log2 e)
        if h0.shape[0] > 0:
            for i in range(n):
                for j in range(BLOCK):
                    h[i, j] = h0[k, i, j0 + j]
        if D.shape[0] > 0:
            for j in range(BLOCK):
                skip[j] = D[k, j0 + j]
        step = np.empty(BLOCK, dt.dtype)
        dtx = np.empty(BLOCK, dt.dtype)
        acc = np.empty(BLOCK, dt.dtype)
        for t in range(l):
            for j in range(BLOCK):
                step[j] = dt[k, t, j0 + j]
                dtx[j] = step[j] * x[k, t, j0 + j]
                acc[j] = skip[j] * x[k, t, j0 + j]
            for i in range(n):
                b, c = B[k, t, i], C[k, t, i]
                for j in range(BLOCK):
                    state = exp2(step[j] * A[i, j]) * h[i, j] + dtx[j] * b
                    h[i, j] = state
                    acc[j] += state * c
            for j in range(BLOCK):
                y[k, t, j0 + j] = acc[j]
        for i in range(n):
            for j in range(BLOCK):
                h_last[k, i, j0 + j] = h[i, j]


def unsupported(dt):
    """Why `scan_state_nd` cannot take a scan with these dt (l, *batch, d), or None when it can:
    CPU, float32 or float64, d a multiple of BLOCK (32)."""
    if dt.device.type != "cpu":
        return f"tensors on {dt.device} (CPU only)"
    if dt.dtype not in (torch.float32, torch.float64):
        return f"dtype {dt.dtype} (float32 or float64 only)"
    if dt.shape[-1] % BLOCK:
        return f"{dt.shape[-1]} channels per scan (a multiple of {BLOCK} needed)"
    return None


def load_error():
    """None when the kernel compiles (or loads from the cache) and runs here, else a one-line reason."""
    try:
        ones = torch.ones(1, 1, BLOCK)
        scan_state_nd(ones, ones, -ones.view(1, 1, BLOCK), ones[..., :1], ones[..., :1])
    except Exception as error:  # numba's typing and lowering errors have no common base class
        return f"the numba kernel failed to compile: {type(error).__name__}: {error}".splitlines()[0]
    return None


def scan_state_nd(dt, x, At, B, C, D=None, h0=None):
    """Inference scan (no autograd), same contract as `selective_scan_fast.scan_state_nd`.

    dt, x: (l, *batch, d), one dtype `unsupported()` accepts;  At: broadcastable to (*batch, n, d)
    B, C: (l, *batch, n);  D: broadcastable to (*batch, d) or None;  h0: (*batch, n, d) or None
    Returns y (l, *batch, d) = sum_n C h + D x, a view of a batch-major tensor, and h_l (*batch, n, d).
    """
    reason = unsupported(dt)
    if reason is not None:
        raise ValueError(f"the numba scan kernel cannot take {reason}")
    l, d, n = dt.shape[0], dt.shape[-1], At.shape[-2]
    batch = dt.shape[1:-1]
    K = math.prod(batch)

    def rows(t, k):  # (l, *batch, k) -> contiguous (K, l, k): no copy when the memory is batch-major
        return t.to(dt.dtype).expand((l,) + batch + (k,)).movedim(0, -2).reshape(K, l, k).contiguous().numpy()

    def per_row(t, shape):  # broadcastable to (*batch, *shape) -> contiguous (K, *shape), or 0 rows
        if t is None:
            return dt.new_empty((0,) + shape).numpy()
        return t.to(dt.dtype).expand(batch + shape).reshape((K,) + shape).contiguous().numpy()

    y = dt.new_empty(batch + (l, d))
    last = dt.new_empty(batch + (n, d))
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != threads:
        # numba's OpenMP layer shares torch's OpenMP runtime and sets its thread count when it
        # starts its pool: give torch back the count the user chose
        torch.set_num_threads(threads)
    _scan(rows(dt, d), rows(x, d), per_row(At, (n, d)), rows(B, n), rows(C, n), per_row(D, (d,)),
          per_row(h0, (n, d)), y.view(K, l, d).numpy(), last.view(K, n, d).numpy())
    return y.movedim(-2, 0), last
