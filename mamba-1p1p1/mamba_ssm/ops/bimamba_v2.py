"""Vim's bidirectional ("v2") inner path, both directions at once, in pure PyTorch.

Upstream computes, with separate parameters per direction (suffix _b for the backward one):
    y_f = inner(xz)              y_b = inner_b(flip(xz))
    y   = (y_f + flip(y_b)) / 2  (the /2 only with if_divide_out), then out_proj
where inner = conv -> silu -> x_proj -> dt_proj -> selective scan with D and the silu(z) gate.

Here the two directions are stacked on a leading axis of size 2, so every op (conv taps,
projections, the scan's per-step update) runs once for both. The gate is applied once after
the sum: flip(y_b * silu(flip(z))) = flip(y_b) * silu(z).

Layout: channel-last (b, l, d) as in_proj produces it; the scan runs time-major (l, 2, b, d, n).
"""

import torch
import torch.nn.functional as F

from causal_conv1d.causal_conv1d_interface import conv_taps
from mamba_ssm.ops.selective_scan_fast import scan_time_major, softplus


def _silu(t):
    return F.silu(t, inplace=not (torch.is_grad_enabled() and t.requires_grad))


def bimamba_v2_fast(xz, conv_weight, conv_bias, x_proj, dt_proj, A, D, dt_rank, if_divide_out):
    """Both directions of a v2 mixer, before out_proj.

    xz: (b, l, 2d) = [x, z] on the last dim
    conv_weight: (2, 1, d, w); conv_bias: (2, 1, d) or None
    x_proj: callable (2, b, l, d) -> (2, b, l, r + 2n)
    dt_proj: callable (2, b, l, r) -> (2, b, l, d), bias included (it is upstream's delta_bias)
    A: (2, 1, d, n) (already -exp(A_log)); D: (2, 1, d)
    Returns y: (b, l, d) in xz's dtype.
    """
    d = xz.shape[-1] // 2
    n = A.shape[-1]
    x, z = xz[..., :d], xz[..., d:]
    xs = torch.stack((x, x.flip(1)))  # (2, b, l, d)
    xc = conv_taps(xs.transpose(-1, -2).to(conv_weight.dtype), conv_weight, conv_bias).transpose(-1, -2)
    xc = _silu(xc)  # (2, b, l, d)
    x_dbl = x_proj(xc)  # (2, b, l, r + 2n)
    dt = softplus(dt_proj(x_dbl[..., :dt_rank]).to(A.dtype))  # (2, b, l, d)

    def time_major(t):
        return t.permute(2, 0, 1, 3)  # (2, b, l, k) -> (l, 2, b, k)

    u = time_major(xc).to(A.dtype)
    y, _ = scan_time_major(time_major(dt), u, A, time_major(x_dbl[..., dt_rank:dt_rank + n]).to(A.dtype),
                           time_major(x_dbl[..., dt_rank + n:]).to(A.dtype))  # (l, 2, b, d)
    y = torch.addcmul(y, u, D) if y.requires_grad else y.addcmul_(u, D)
    both = y[:, 0] + y[:, 1].flip(0)  # (l, b, d)
    gate = F.silu(z.to(A.dtype)).transpose(0, 1)
    if if_divide_out:
        gate = gate * 0.5
    return (both * gate).transpose(0, 1).to(xz.dtype)
