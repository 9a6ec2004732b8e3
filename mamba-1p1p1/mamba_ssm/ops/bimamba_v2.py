"""Vim's bidirectional ("v2") inner path, both directions at once, in pure PyTorch.

Upstream computes, with separate parameters per direction (suffix _b for the backward one):
    y_f = inner(xz)              y_b = inner_b(flip(xz))
    y   = (y_f + flip(y_b)) / 2  (the /2 only with if_divide_out), then out_proj
where inner = conv -> silu -> x_proj -> dt_proj -> selective scan with D and the silu(z) gate.

Here the two directions are stacked on a leading axis of size 2, so every op (conv taps,
projections, the scan's per-step update) runs once for both. The gate is applied once after
the sum: flip(y_b * silu(flip(z))) = flip(y_b) * silu(z).

Layout: channel-last (2, b, l, d) up to the projections, as in_proj produces it; the scan
(`selective_scan_fast.scan_state_nd`) takes time-major views (l, 2, b, ...), stores its
state (n, d) and adds the D skip. Every op dispatched costs several microseconds on a Pi, so
the code avoids no-op conversions and extra views.

`bimamba_v2_fn` chooses per call (`causal_conv1d.backends`, family "selective_scan"): the
stacked path on "torch", the fused kernels of `bimamba_v2_numba` on "numba", upstream's
composition of one-direction inner functions on "ref" and "cuda".
"""

import torch
import torch.nn.functional as F

from causal_conv1d.causal_conv1d_interface import conv_taps
from mamba_ssm.ops.backends import resolve_scan
from mamba_ssm.ops.selective_scan_fast import scan_state_nd
from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn_no_out_proj


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def _time_major(t):
    return t.permute(2, 0, 1, 3)  # (2, b, l, k) -> (l, 2, b, k)


def bimamba_v2_fn(xz, stacked, directions, dt_rank, if_divide_out, needs_grad):
    """Both directions of a v2 mixer, before out_proj: xz (b, l, 2d) -> y (b, l, d).

    stacked: callable returning the stacked constants (conv_weight, conv_bias, x_proj, dt_proj,
        A, D as `bimamba_v2_fast` takes them, and `fused`: the layouts `bimamba_v2_numba` takes),
        built only when a stacked path runs;
    directions: callable returning ((args, kwargs) forward, (args, kwargs) backward) for
        `mamba_inner_fn_no_out_proj`, built only when the composition runs;
    needs_grad: autograd must see the computation (the numba kernels cannot run then).
    """
    unsupported = None if needs_grad else _fused_unsupported(xz, stacked)
    backend = resolve_scan(xz, needs_grad=needs_grad, numba_unsupported=unsupported)
    if backend == "numba":
        from mamba_ssm.ops import bimamba_v2_numba  # its kernels were loaded by the backend module

        c = stacked()
        f = c.fused
        return bimamba_v2_numba.bimamba_v2_numba(xz, f.conv_weight, f.conv_bias, c.x_proj, f.dt_weight, f.dt_bias,
                                                 f.A, f.D, if_divide_out)
    if backend == "torch":
        c = stacked()
        return bimamba_v2_fast(xz, c.conv_weight, c.conv_bias, c.x_proj, c.dt_proj, c.A, c.D, dt_rank, if_divide_out)
    (args, kwargs), (args_b, kwargs_b) = directions()
    xz_t = xz.transpose(1, 2)  # (b, 2d, l)
    y = mamba_inner_fn_no_out_proj(xz_t, *args, **kwargs)
    y = y + mamba_inner_fn_no_out_proj(xz_t.flip(-1), *args_b, **kwargs_b).flip(-1)
    return (y / 2 if if_divide_out else y).transpose(1, 2)


def _fused_unsupported(xz, stacked):
    """Why the fused numba kernels cannot take this call, or None (see `bimamba_v2_numba.supports`:
    they read float32 CPU memory, the activations and every constant they are given)."""
    from mamba_ssm.ops import bimamba_v2_numba  # no numba or llvmlite at import

    f = stacked().fused
    if bimamba_v2_numba.supports(xz, f.conv_weight, f.conv_bias, f.dt_weight, f.dt_bias, f.A, f.D):
        return None
    return f"{xz.dtype} activations on {xz.device} or parameters of another dtype (float32 on the CPU only)"


def bimamba_v2_fast(xz, conv_weight, conv_bias, x_proj, dt_proj, A, D, dt_rank, if_divide_out):
    """Both directions of a v2 mixer, before out_proj, stacked.

    xz: (b, l, 2d) = [x, z] on the last dim
    conv_weight: (2, 1, d, w) (fastest stored as (2, 1, w, d), i.e. each tap contiguous in d);
    conv_bias: (2, 1, d) or None
    x_proj: callable (2, b, l, d) -> (2, b, l, r + 2n)
    dt_proj: callable (2, b, l, r) -> (2, b, l, d), bias included (it is upstream's delta_bias)
    A: (2, 1, d, n) (already -exp(A_log); fastest stored as (2, 1, n, d)); D: (2, 1, d)
    Returns y: (b, l, d) in xz's dtype.
    """
    dtype = torch.promote_types(xz.dtype, A.dtype)  # float32 A (as upstream) with float64 xz: float64
    inplace = not torch.is_grad_enabled()  # else autograd may need the overwritten values
    d, n = xz.shape[-1] // 2, A.shape[-1]
    x, z = xz.split(d, dim=-1)
    xs = _as(torch.stack((x, x.flip(1))), conv_weight.dtype)  # (2, b, l, d)
    xc = F.silu(conv_taps(xs.transpose(-1, -2), conv_weight, conv_bias).transpose(-1, -2), inplace=inplace)
    dt_in, B, C = x_proj(xc).split([dt_rank, n, n], dim=-1)  # (2, b, l, r), (2, b, l, n) x 2
    dt = F.softplus(_as(dt_proj(dt_in), dtype))  # (2, b, l, d)
    u = _as(xc, dtype)
    y, _ = scan_state_nd(_time_major(dt), _time_major(u), A.transpose(-1, -2), _as(_time_major(B), dtype),
                         _as(_time_major(C), dtype), D)  # (l, 2, b, d), D skip included
    y_f, y_b = y.unbind(1)  # (l, b, d) each
    gate = F.silu(_as(z, dtype))  # (b, l, d)
    if if_divide_out:
        gate = gate.mul_(0.5) if inplace else gate * 0.5
    both = (y_f + y_b.flip(0)).transpose(0, 1)  # (b, l, d)
    return _as(both.mul_(gate) if inplace else both * gate, xz.dtype)
