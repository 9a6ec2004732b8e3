"""The fast pure-PyTorch selective scan.

Glossary: l sequence length, d channels, n state size; `*batch` any leading batch dims (batch,
groups, scan directions...).

The recurrence h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t is inherently sequential, so the
speed comes from making each of the l steps one cheap op on contiguous memory:
  - time-major buffers (l, *batch, n, d): step t is one contiguous slab. The state is stored
    transposed, (n, d) rather than (d, n), so the big broadcasting ops run along d (hundreds of
    contiguous elements instead of n = 16) and y_t = C_t h_t is a plain 1 x n by n x d product
    (a batched matmul ~4x faster than the transposed one);
  - exp(dt * A) and dt * B * x are precomputed for a chunk of steps with three big ops, then
    each step is a single in-place `addcmul_` (h_t += dA_t * h_{t-1});
  - chunks of at most CHUNK_BYTES per buffer keep the work in L2 (Pi 4: 1 MB shared) and
    bound memory for long sequences and big batches (a 1 GB Pi runs stride-8 models);
  - the buffers, and the per-step views into them, are kept per thread and reused across calls
    and layers: no per-call page faults, no per-step view ops. Chunks alternate between the two
    halves of the state buffer, so the state carried into a chunk is never overwritten;
Closed forms over chunks (exp(A * (c_t - c_s)) for all pairs) cost l * T * d * n exps and the
cumsum shortcut overflows in float32, so neither is used.

When autograd needs to see the loop (training), the same math runs out of place.

The optional numba kernel (`selective_scan_numba.scan_state_nd`) has the same contract; which
one runs is decided by `causal_conv1d.backends`, not here.
"""

import math
import threading

import torch

CHUNK_BYTES = 512 << 10

_local = threading.local()


def _chunk_len(l, step_elems, itemsize):
    return max(1, min(l, CHUNK_BYTES // max(1, step_elems * itemsize)))


def _broadcast(*shapes):
    """torch.broadcast_shapes without its import of torch.fx and sympy (~12 MB on first use)."""
    out = []
    for dims in zip(*(((1,) * (max(map(len, shapes)) - len(s)) + tuple(s)) for s in shapes)):
        sizes = set(dims) - {1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {', '.join(str(tuple(s)) for s in shapes)} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def scan_state_nd(dt, x, At, B, C, D=None, h0=None):
    """Selective scan with the state stored as (n, d), plus the D skip.

    dt, x: (l, *batch, d)  -- dt already biased and softplus-ed
    At: broadcastable to (*batch, n, d) (A transposed)
    B, C: (l, *batch, n), batch dims may broadcast
    D: broadcastable to (*batch, d) or None
    h0: (*batch, n, d) or None (zeros)
    Returns y (l, *batch, d) = sum_n C_t h_t + D x_t and h_l (*batch, n, d), fresh tensors.
    """
    if _needs_grad(dt, x, At, B, C, D, h0):
        y, last = _scan_autograd(dt, dt * x, At.transpose(-1, -2), B, C,
                                 None if h0 is None else h0.transpose(-1, -2))
        return (y if D is None else torch.addcmul(y, x, D)), last.transpose(-1, -2)
    y, last = _scan_inplace(dt, dt * x, At, B, C, h0)
    return (y if D is None else y.addcmul_(x, D)), last


def _scan_autograd(dt, dtx, A, B, C, h0):
    """Out of place, with the state as (d, n): A (*batch, d, n), h0 (*batch, d, n)."""
    dA = torch.exp(dt.unsqueeze(-1) * A)  # (l, *batch, d, n)
    dBx = dtx.unsqueeze(-1) * B.unsqueeze(-2)  # (l, *batch, d, n)
    h = torch.zeros_like(dBx[0]) if h0 is None else h0
    states = []
    # unbind, not dA[t]: each indexing's backward would write a zero tensor the size of all l
    # steps (O(l^2) memory traffic: 20 s instead of 1 s for a Vim-Tiny backward); unbind's is one stack
    for dBx_t, dA_t in zip(dBx.unbind(0), dA.unbind(0)):
        h = torch.addcmul(dBx_t, dA_t, h)
        states.append(h)
    hs = torch.stack(states)
    y = torch.matmul(C.unsqueeze(-2), hs.transpose(-1, -2)).squeeze(-2)
    return y, h


class _Workspace:
    """Reusable chunk buffers for one state shape: dA (T, *state) and h (2T, *state), with the
    per-step views (`dA_steps`, `h_steps`) and each half of h as matmul rows (`h_rows`)."""

    def __init__(self, key, T, state, dtype, device):
        self.key = key
        with torch.inference_mode(False):  # normal tensors: usable both in and out of inference mode
            self.dA = torch.empty((T,) + state, dtype=dtype, device=device)
            h = torch.empty((2 * T,) + state, dtype=dtype, device=device)
            self.dA_steps = self.dA.unbind(0)
            self.h_steps = h.unbind(0)
            self.h_halves = h.split(T)
            self.h_rows = [half.view(-1, *state[-2:]) for half in self.h_halves]


def _workspace(T, state, dtype, device):
    # one workspace per thread (concurrent calls must not share buffers), for the latest shape
    key = (T, state, dtype, device)
    ws = getattr(_local, "workspace", None)
    if ws is None or ws.key != key:
        _local.workspace = None  # free the old buffers before allocating the new ones
        ws = _local.workspace = _Workspace(key, T, state, dtype, device)
    return ws


def _scan_inplace(dt, dtx, At, B, C, h0):
    """The torch kernel of `scan_state_nd` (no autograd, no D); dtx = dt * x."""
    l, d, n = dt.shape[0], dt.shape[-1], At.shape[-2]
    batch = _broadcast(dt.shape[1:-1], dtx.shape[1:-1], At.shape[:-2], B.shape[1:-1], C.shape[1:-1])
    state = batch + (n, d)
    y = dt.new_empty((l,) + batch + (d,))
    if l == 0:
        return y, dt.new_zeros(state) if h0 is None else h0.expand(state).clone()
    T = _chunk_len(l, math.prod(state), dt.element_size())
    ws = _workspace(T, state, dt.dtype, dt.device)
    k = math.prod(batch)
    # every per-chunk view in one split each: few dispatched ops per chunk
    chunks = zip(dt.unsqueeze(-2).split(T), dtx.unsqueeze(-2).split(T), B.unsqueeze(-1).split(T),
                 C.expand((l,) + batch + (n,)).reshape(l * k, 1, n).split(T * k), y.view(l * k, 1, d).split(T * k))
    prev = h0
    for i, (dt_c, dtx_c, B_c, C_c, y_c) in enumerate(chunks):
        m = dt_c.shape[0]
        dA = ws.dA if m == T else ws.dA[:m]
        half = ws.h_halves[i % 2] if m == T else ws.h_halves[i % 2][:m]
        torch.mul(dt_c, At, out=dA).exp_()
        torch.mul(dtx_c, B_c, out=half)
        hs = ws.h_steps[(i % 2) * T:(i % 2) * T + m]
        if prev is not None:
            hs[0].addcmul_(ws.dA_steps[0], prev)
        for h_t, dA_t, h_prev in zip(hs[1:], ws.dA_steps[1:m], hs):
            h_t.addcmul_(dA_t, h_prev)
        rows = ws.h_rows[i % 2] if m == T else ws.h_rows[i % 2][:m * k]
        torch.bmm(C_c, rows, out=y_c)
        prev = hs[-1]
    return y, prev.clone()
