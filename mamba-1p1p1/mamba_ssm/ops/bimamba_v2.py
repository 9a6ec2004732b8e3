"""Vim's bidirectional ("v2") inner path: both directions at once, and the weights it runs on.

Upstream computes, with separate parameters per direction (suffix _b for the backward one):
    y_f = inner(xz)              y_b = inner_b(flip(xz))
    y   = (y_f + flip(y_b)) / 2  (the /2 only with if_divide_out), then out_proj
where inner = conv -> silu -> x_proj -> dt_proj -> selective scan with D and the silu(z) gate.

Three implementations, each taking xz (b, l, 2d), a `V2Weights` and if_divide_out, returning
y (b, l, d) before out_proj; a model's kernel set names the one it runs (`ops.kernel_sets`):
  - `bimamba_v2_fast` ("torch"): the two directions stacked on a leading axis of size 2, so
    every op (conv taps, projections, the scan's per-step update) runs once for both. The gate
    is applied once after the sum: flip(y_b * silu(flip(z))) = flip(y_b) * silu(z). Layout:
    channel-last (2, b, l, d) up to the projections, as in_proj produces it; the scan
    (`selective_scan_fast.scan_state_nd`) takes time-major views (l, 2, b, ...), stores its
    state (n, d) and adds the D skip. Every op dispatched costs several microseconds on a Pi,
    so the code avoids no-op conversions and extra views (the weights hold their views ready);
  - `bimamba_v2_fused` ("numba"): the fused kernels of `bimamba_v2_numba` (inference, float32);
  - `bimamba_v2_composed` ("ref", "cuda"): upstream's composition of two one-direction inner
    paths, on the conv and scan implementations it is given by name.

The weights are frozen tensors built from a mixer's parameters (`DirectionWeights` per
direction, `stack_directions` for the stacked layouts): the ops call nothing back. A dynamically
quantized (int8) x_proj runs as the quantized layer computes it on the stacked paths (its packed
weights, `PackedPair`) and dequantized on the composed one; dt_proj is dense everywhere.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from causal_conv1d.causal_conv1d_interface import conv_taps
from mamba_ssm.ops.selective_scan_fast import scan_state_nd
from mamba_ssm.ops.selective_scan_interface import inner_no_out_proj

Tensor = torch.Tensor


def fp32(t):
    """Upstream computes A, D and delta_bias in float32 (`.float()`); float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass(frozen=True)
class DirectionWeights:
    """One direction's inner-path weights, as `mamba_inner_fn_no_out_proj` takes them.

    conv_weight (d, 1, w); conv_bias (d,) or None; x_proj_weight (r + 2n, d), dequantized for an
    int8 layer, or None when x_proj_packed holds that layer's packed weights; x_proj_packed: those,
    else None; dt_weight (d, r); dt_bias (d,) (upstream's delta_bias, in the layer's dtype);
    A (d, n) = -exp(A_log) and D (d,), both float32 or float64.
    """

    conv_weight: Tensor
    conv_bias: Optional[Tensor]
    x_proj_weight: Optional[Tensor]
    dt_weight: Tensor
    dt_bias: Tensor
    A: Tensor
    D: Tensor
    x_proj_packed: Optional[object] = None


@dataclass(frozen=True)
class PackedPair:
    """x_proj of both directions as dynamically quantized int8 Linear layers: their weights packed
    for `torch.ops.quantized.linear_dynamic` (script objects: data, not callables)."""

    forward: object
    backward: object


@dataclass(frozen=True)
class StackedWeights:
    """Both directions stacked on a leading axis of size 2, in the layouts the stacked kernels read
    (built by `stack_directions`). d channels, w conv width, n states, r dt rank.

    conv_weight (2, w, d) contiguous (each tap runs along channels); conv_taps: the same as
    (2, 1, d, w); conv_bias (2, d) or None, conv_bias_rows (2, 1, d) or None;
    x_proj: (2, d, r + 2n) (the stacked weights transposed) or a `PackedPair` (see `project_x`);
    dt_proj_t (2, r, d) (a transposed view of the stacked dt_proj weights, for a batched matmul),
    dt_weight (2, r, d) contiguous (the fused kernel's layout); dt_bias (2, d), dt_bias_rows (2, 1, d);
    A (2, n, d) contiguous, A_t: the same as (2, 1, d, n); D (2, d), D_rows (2, 1, d).
    """

    conv_weight: Tensor
    conv_taps: Tensor
    conv_bias: Optional[Tensor]
    conv_bias_rows: Optional[Tensor]
    x_proj: object
    dt_proj_t: Tensor
    dt_weight: Tensor
    dt_bias: Tensor
    dt_bias_rows: Tensor
    A: Tensor
    A_t: Tensor
    D: Tensor
    D_rows: Tensor


@dataclass(frozen=True)
class V2Weights:
    """A v2 mixer's weights as its kernel reads them: per direction (`bimamba_v2_composed`), or
    stacked (`bimamba_v2_fast`, `bimamba_v2_fused`); the other fields are None."""

    forward: Optional[DirectionWeights]
    backward: Optional[DirectionWeights]
    stacked: Optional[StackedWeights]


def stack_directions(forward, backward):
    """The `StackedWeights` of two `DirectionWeights`."""
    def stack(name):
        return torch.stack((getattr(forward, name), getattr(backward, name)))

    conv_weight = torch.stack([w.conv_weight.squeeze(1).t() for w in (forward, backward)])  # (2, w, d)
    conv_bias = None if forward.conv_bias is None else stack("conv_bias")  # (2, d)
    if forward.x_proj_packed is not None:  # both packed, or neither
        x_proj = PackedPair(forward.x_proj_packed, backward.x_proj_packed)
    else:
        x_proj = stack("x_proj_weight").transpose(1, 2)  # (2, d, r + 2n), a view of (2, r + 2n, d)
    dt_proj_t = stack("dt_weight").transpose(1, 2)  # (2, r, d), a view of (2, d, r)
    dt_bias = stack("dt_bias")  # (2, d)
    A = stack("A").transpose(1, 2).contiguous()  # (2, n, d)
    D = stack("D")  # (2, d)
    return StackedWeights(
        conv_weight=conv_weight, conv_taps=conv_weight.unsqueeze(1).transpose(-1, -2),
        conv_bias=conv_bias, conv_bias_rows=None if conv_bias is None else conv_bias.unsqueeze(1),
        x_proj=x_proj,
        dt_proj_t=dt_proj_t, dt_weight=dt_proj_t.contiguous(), dt_bias=dt_bias, dt_bias_rows=dt_bias.unsqueeze(1),
        A=A, A_t=A.unsqueeze(1).transpose(-1, -2), D=D, D_rows=D.unsqueeze(1))


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def _time_major(t):
    return t.permute(2, 0, 1, 3)  # (2, b, l, k) -> (l, 2, b, k)


def stacked_linear(x, weight_t, bias_rows=None):
    """Two Linear layers stacked on dim 0 in one batched matmul: x (2, ..., in), weight_t (2, in, out),
    bias_rows (2, 1, out) or None -> (2, ..., out)."""
    flat = x.reshape(2, -1, x.shape[-1])
    y = torch.bmm(flat, weight_t) if bias_rows is None else torch.baddbmm(bias_rows, flat, weight_t)
    return y.view(*x.shape[:-1], weight_t.shape[-1])


def project_x(xc, x_proj):
    """x_proj of both directions: xc (2, ..., d) -> x_dbl (2, ..., r + 2n), contiguous.
    x_proj: the transposed stacked weights (2, d, r + 2n) (one batched matmul), or a `PackedPair`
    (each direction as its int8 layer computes it: `linear_dynamic` with reduce_range, as
    torch.ao's dynamic Linear calls it)."""
    if isinstance(x_proj, PackedPair):
        return torch.stack([torch.ops.quantized.linear_dynamic(x, packed, reduce_range=True).to(x.dtype)
                            for x, packed in ((xc[0], x_proj.forward), (xc[1], x_proj.backward))])
    return stacked_linear(xc, x_proj)


def bimamba_v2_fast(xz, weights, if_divide_out):
    """Both directions of a v2 mixer, before out_proj, stacked (pure PyTorch; autograd works).

    xz: (b, l, 2d) = [x, z] on the last dim; weights: a `V2Weights` with its stacked layouts.
    Returns y: (b, l, d) in xz's dtype.
    """
    w = weights.stacked
    dtype = torch.promote_types(xz.dtype, w.A.dtype)  # float32 A (as upstream) with float64 xz: float64
    inplace = not torch.is_grad_enabled()  # else autograd may need the overwritten values
    d, n = xz.shape[-1] // 2, w.A.shape[1]
    x, z = xz.split(d, dim=-1)
    xs = _as(torch.stack((x, x.flip(1))), w.conv_weight.dtype)  # (2, b, l, d)
    xc = F.silu(conv_taps(xs.transpose(-1, -2), w.conv_taps, w.conv_bias_rows).transpose(-1, -2), inplace=inplace)
    dt_in, B, C = project_x(xc, w.x_proj).split([w.dt_weight.shape[1], n, n], dim=-1)  # (2, b, l, r|n|n)
    dt = F.softplus(_as(stacked_linear(dt_in, w.dt_proj_t, w.dt_bias_rows), dtype))  # (2, b, l, d)
    u = _as(xc, dtype)
    y, _ = scan_state_nd(_time_major(dt), _time_major(u), w.A_t.transpose(-1, -2), _as(_time_major(B), dtype),
                         _as(_time_major(C), dtype), w.D_rows)  # (l, 2, b, d), D skip included
    y_f, y_b = y.unbind(1)  # (l, b, d) each
    gate = F.silu(_as(z, dtype))  # (b, l, d)
    if if_divide_out:
        gate = gate.mul_(0.5) if inplace else gate * 0.5
    both = (y_f + y_b.flip(0)).transpose(0, 1)  # (b, l, d)
    return _as(both.mul_(gate) if inplace else both * gate, xz.dtype)


def bimamba_v2_fused(xz, weights, if_divide_out):
    """`bimamba_v2_fast`'s result from the fused numba kernels (inference, float32 on the CPU: see
    `bimamba_v2_numba.bimamba_v2_numba`, which raises for anything else)."""
    from mamba_ssm.ops import bimamba_v2_numba  # on the numba path only: the torch path never loads it

    w = weights.stacked
    return bimamba_v2_numba.bimamba_v2_numba(xz, w.conv_weight, w.conv_bias, w.x_proj, w.dt_weight, w.dt_bias,
                                             w.A, w.D, if_divide_out)


def bimamba_v2_composed(conv, scan, xz, weights, if_divide_out):
    """`bimamba_v2_fast`'s result as upstream's composition of two one-direction inner paths
    (`inner_no_out_proj`) on the conv and scan implementations named `conv` and `scan`."""
    xz_t = xz.transpose(1, 2)  # (b, 2d, l)
    y = _direction(conv, scan, xz_t, weights.forward)
    y = y + _direction(conv, scan, xz_t.flip(-1), weights.backward).flip(-1)
    return (y / 2 if if_divide_out else y).transpose(1, 2)


def _direction(conv, scan, xz_t, w):
    return inner_no_out_proj(conv, scan, xz_t, w.conv_weight, w.conv_bias, w.x_proj_weight, w.dt_weight, w.A,
                             D=w.D, delta_bias=fp32(w.dt_bias), delta_softplus=True)
