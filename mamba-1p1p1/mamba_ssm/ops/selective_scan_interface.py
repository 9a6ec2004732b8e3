"""Selective scan and the fused Mamba inner paths: upstream's public functions.

Glossary: b batch, d channels (d_inner), l sequence length, n state size (d_state), r dt rank,
g groups of B/C, w conv width.

    dt  = softplus(delta + delta_bias)              (bias and softplus optional)
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t    h_0 = 0, h: (b, d, n)
    y_t = sum_n h_t * C_t + D * u_t ;  y = y * silu(z)  (D and z optional)

Every public function dispatches per call (`causal_conv1d.backends`, family "selective_scan"):
  "torch" -- `selective_scan_fast` (time-major in-place scan) and compositions of fast kernels;
  "numba" -- the same with the compiled numba scan kernel (inference only);
  "ref"   -- the `*_ref` functions: plain sequential loops, obviously correct;
  "cuda"  -- upstream's compiled `selective_scan_cuda`, for CUDA tensors, when installed.
Computation is in float32 (float64 stays float64); outputs come back in u's dtype.
"""

import torch
import torch.nn.functional as F

from causal_conv1d import causal_conv1d_fn, causal_conv1d_ref
from causal_conv1d.arg_checks import check_floating, shape_error
from causal_conv1d import backends
from mamba_ssm.ops.backends import resolve_scan
from mamba_ssm.ops.selective_scan_fast import scan_state_nd


def _check_scan_args(u, delta, A, B, C, D, z, delta_bias):
    check_floating(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    if u.dim() != 3:
        raise shape_error("u", "(batch, dim, seqlen)", u)
    b, d, l = u.shape
    if delta.shape != u.shape:
        raise shape_error("delta", f"(batch, dim, seqlen) = {(b, d, l)} like u", delta)
    if A.is_complex():
        raise NotImplementedError("complex A is not supported (Vim only uses real A)")
    if A.dim() != 2 or A.shape[0] != d:
        raise shape_error("A", f"(dim, dstate) = ({d}, dstate)", A)
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3 and tuple(t.shape) == (b, n, l):
            continue
        if t.dim() == 4 and tuple(t.shape[:1] + t.shape[2:]) == (b, n, l) and d % t.shape[1] == 0:
            continue
        raise shape_error(name, f"(batch, dstate, seqlen) = ({b}, {n}, {l}) or (batch, groups, dstate, "
                                 f"seqlen) with groups dividing dim={d}", t)
    groups = {t.shape[1] for t in (B, C) if t.dim() == 4} - {1}
    if len(groups) > 1:
        raise ValueError(f"B and C must have the same number of groups (or one of them 1), got "
                         f"{B.shape[1]} and {C.shape[1]}")
    if D is not None and tuple(D.shape) != (d,):
        raise shape_error("D", f"(dim,) = ({d},)", D)
    if z is not None and z.shape != u.shape:
        raise shape_error("z", f"(batch, dim, seqlen) = {(b, d, l)} like u", z)
    if delta_bias is not None and tuple(delta_bias.shape) != (d,):
        raise shape_error("delta_bias", f"(dim,) = ({d},)", delta_bias)


def _compute_dtype(u):
    return torch.promote_types(u.dtype, torch.float32)


def _discretize_dt(delta, delta_bias, delta_softplus, dtype):
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    return F.softplus(dt) if delta_softplus else dt


def _groups(t):
    """B or C as (b, g, n, l)."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def _skip_and_gate(y, u, D, z):
    """y + D * u, then * silu(z); all (b, d, l)."""
    if D is not None:
        y = torch.addcmul(y, u, D.to(y.dtype)[:, None])
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Reference selective scan: one time step per loop iteration.

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,).
    Returns out (b, d, l) in u's dtype, and last_state (b, d, n) when return_last_state.
    """
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    b, d, l = u.shape
    uf = u.to(dtype)
    dt = _discretize_dt(delta, delta_bias, delta_softplus, dtype)
    Bg, Cg = _groups(B).to(dtype), _groups(C).to(dtype)
    per_group = d // Bg.shape[1], d // Cg.shape[1]
    Bd = Bg.repeat_interleave(per_group[0], dim=1)  # (b, d, n, l): channel c uses group c // (d/g)
    Cd = Cg.repeat_interleave(per_group[1], dim=1)
    Af = A.to(dtype)
    h = uf.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(l):
        h = torch.exp(dt[:, :, t, None] * Af) * h + (dt[:, :, t] * uf[:, :, t])[:, :, None] * Bd[..., t]
        ys.append((h * Cd[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(b, d, 0)
    out = _skip_and_gate(y, uf, D, z).to(u.dtype)
    return (out, h) if return_last_state else out


def selective_scan_fast(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    """Fast pure-PyTorch selective scan (see `selective_scan_fast.scan_state_nd`).

    Same arguments, shapes and results as `selective_scan_ref`.
    """
    return _selective_scan_time_major(scan_state_nd, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      return_last_state)


def numba_scan_state_nd(*args):
    """`selective_scan_numba.scan_state_nd`, importing numba at the first call only."""
    from mamba_ssm.ops import selective_scan_numba  # imports numba (~50 MB): only when used

    return selective_scan_numba.scan_state_nd(*args)


def _selective_scan_numba(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    return _selective_scan_time_major(numba_scan_state_nd, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      return_last_state)


def _selective_scan_time_major(scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """The fast scans: time-major views into a `scan_state_nd` kernel (torch or numba)."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    b, d, l = u.shape
    Bg, Cg = _groups(B), _groups(C)
    g = max(Bg.shape[1], Cg.shape[1])  # B with 1 group broadcasts against C with g groups
    n = A.shape[1]
    uf = u.to(dtype)
    dt = _discretize_dt(delta, delta_bias, delta_softplus, dtype)
    # time-major views: d is split into (g, d/g) so a group's B/C broadcasts over its channels;
    # the kernel keeps the state as (n, d)
    y, last = scan(
        dt.view(b, g, d // g, l).permute(3, 0, 1, 2),
        uf.view(b, g, d // g, l).permute(3, 0, 1, 2),
        A.to(dtype).view(g, d // g, n).transpose(-1, -2),
        Bg.to(dtype).permute(3, 0, 1, 2),
        Cg.to(dtype).permute(3, 0, 1, 2),
    )  # y (l, b, g, d/g), last (b, g, n, d/g)
    y = y.permute(1, 2, 3, 0).reshape(b, d, l)
    out = _skip_and_gate(y, uf, D, z).to(u.dtype)
    return (out, last.transpose(-1, -2).reshape(b, d, n)) if return_last_state else out


class _CudaScan(torch.autograd.Function):
    """Upstream's compiled selective scan (mamba 1.1.1 signatures) with its backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        u, delta, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta, B, C))
        z = z if z is None or z.stride(-1) == 1 else z.contiguous()
        ctx.squeeze_B, ctx.squeeze_C = B.dim() == 3, C.dim() == 3
        B, C = _groups(B), _groups(C)
        out, x, *rest = backends.extension("selective_scan").fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.delta_softplus = delta_softplus
        ctx.has_z = z is not None
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
        last_state = x[:, :, -1, 1::2]  # (b, d, n): the kernel stores (real, imag) pairs per chunk
        result = rest[0] if ctx.has_z else out
        return (result, last_state) if return_last_state else result

    @staticmethod
    def backward(ctx, dout, *unused):
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = backends.extension("selective_scan").bwd(
            u, delta, A, B, C, D, z, delta_bias, dout, x, out if ctx.has_z else None, None,
            ctx.delta_softplus, False)
        dB = dB.squeeze(1) if ctx.squeeze_B else dB
        dC = dC.squeeze(1) if ctx.squeeze_C else dC
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, rest[0] if ctx.has_z else None,
                ddelta_bias if delta_bias is not None else None, None, None)


def _selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    D = D.contiguous() if D is not None else None
    return _CudaScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


_SCAN_IMPLS = {"cuda": _selective_scan_cuda, "torch": selective_scan_fast, "numba": _selective_scan_numba,
               "ref": selective_scan_ref}


def _numba_unsupported(u, B, C):
    """Why the numba scan kernel cannot take this call, or None (it runs d / groups channels per scan)."""
    g = max(t.shape[1] if t.dim() == 4 else 1 for t in (B, C))
    if u.dtype not in (torch.float32, torch.float64):
        return f"dtype {u.dtype} (float32 or float64 only)"
    if u.dim() == 3 and (u.shape[1] // g) % 32:
        return f"{u.shape[1] // g} channels per group (a multiple of 32 needed)"
    return None


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Selective scan (upstream's public entry point); see the module docstring for the math.

    u: (b, d, l); delta: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D: (d,);
    z: (b, d, l); delta_bias: (d,). Returns out (b, d, l) in u's dtype, or (out, last_state
    (b, d, n)) when return_last_state.
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    backend = resolve_scan(u, needs_grad=needs_grad, numba_unsupported=_numba_unsupported(u, B, C))
    return _SCAN_IMPLS[backend](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _check_inner_args(xz, conv1d_weight, x_proj_weight, delta_proj_weight, A, checkpoint_lvl):
    check_floating(xz=xz, conv1d_weight=conv1d_weight, x_proj_weight=x_proj_weight,
                   delta_proj_weight=delta_proj_weight)
    if xz.dim() != 3 or xz.shape[1] % 2:
        raise shape_error("xz", "(batch, 2 * dim, seqlen)", xz)
    d = xz.shape[1] // 2
    if A.dim() != 2 or A.shape[0] != d:
        raise shape_error("A", f"(dim, dstate) = ({d}, dstate)", A)
    if conv1d_weight.dim() != 3 or tuple(conv1d_weight.shape[:2]) != (d, 1):
        raise shape_error("conv1d_weight", f"(dim, 1, width) = ({d}, 1, width)", conv1d_weight)
    if delta_proj_weight.dim() != 2 or delta_proj_weight.shape[0] != d:
        raise shape_error("delta_proj_weight", f"(dim, dt_rank) = ({d}, dt_rank)", delta_proj_weight)
    r, n = delta_proj_weight.shape[1], A.shape[-1]
    if tuple(x_proj_weight.shape) != (r + 2 * n, d):
        raise shape_error("x_proj_weight", f"(dt_rank + 2 * dstate, dim) = ({r + 2 * n}, {d})", x_proj_weight)
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"checkpoint_lvl must be 0 or 1, got {checkpoint_lvl!r}")


def _check_A_b(A, A_b):
    if A_b is None:
        raise ValueError("A_b (the backward direction's A, shape (dim, dstate)) is required by the "
                         "bidirectional inner functions; mamba_inner_fn runs one direction")
    if A_b.shape != A.shape:
        raise shape_error("A_b", f"(dim, dstate) = {tuple(A.shape)} like A", A_b)


def _out_proj(y, out_proj_weight, out_proj_bias):
    """y (b, d, l) -> (b, l, d_model) through out_proj_weight (d_model, d)."""
    check_floating(out_proj_weight=out_proj_weight, out_proj_bias=out_proj_bias)
    if out_proj_weight.dim() != 2 or out_proj_weight.shape[1] != y.shape[1]:
        raise shape_error("out_proj_weight", f"(d_model, dim) = (d_model, {y.shape[1]})", out_proj_weight)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def inner_projections(x, x_proj_weight, delta_proj_weight, B=None, C=None, B_proj_bias=None, C_proj_bias=None):
    """From the conv output x (b, d, l): delta (b, d, l) and B, C (b, n, l) unless given."""
    r = delta_proj_weight.shape[1]
    n = (x_proj_weight.shape[0] - r) // 2
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (b, l, r + 2n)
    delta = F.linear(x_dbl[..., :r], delta_proj_weight).transpose(1, 2)  # (b, d, l)
    if B is None:
        B = x_dbl[..., r:r + n] if B_proj_bias is None else x_dbl[..., r:r + n] + B_proj_bias
        B = B.transpose(1, 2)
    if C is None:
        C = x_dbl[..., r + n:] if C_proj_bias is None else x_dbl[..., r + n:] + C_proj_bias
        C = C.transpose(1, 2)
    return delta, B, C


def _inner_no_out_proj(conv, scan, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                       A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus, A_b=None):
    """conv -> projections -> scan for one direction; with A_b, also the flipped direction
    sharing conv and projections (bimamba v1). Returns (b, d, l)."""
    x, z = xz.chunk(2, dim=1)
    x = conv(x, conv1d_weight.squeeze(1), conv1d_bias, activation="silu")
    delta, B, C = inner_projections(x, x_proj_weight, delta_proj_weight, B, C, B_proj_bias, C_proj_bias)
    y = scan(x, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if A_b is not None:
        flip = lambda t: t.flip(-1)
        y = y + flip(scan(flip(x), flip(delta), A_b, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus))
    return y


def _ref_primitives():
    return (lambda x, w, b, activation: causal_conv1d_ref(x, w, b, activation=activation)), selective_scan_ref


def _primitives(xz):
    """Conv and scan for a fused path: the references under "ref", else the dispatching ops."""
    if backends.current_backend() == "ref":
        return _ref_primitives()
    return (lambda x, w, b, activation: causal_conv1d_fn(x, w, b, activation=activation)), selective_scan_fn


def mamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                               A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                               C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1):
    """One direction of the Mamba inner path, without out_proj.

    xz: (b, 2d, l) = [x; z]; conv1d_weight: (d, 1, w); conv1d_bias: (d,);
    x_proj_weight: (r + 2n, d); delta_proj_weight: (d, r); A: (d, n); D, delta_bias: (d,).
    x = silu(causal_conv1d(x)); [dt_low, B, C] = x^T x_proj^T; delta = delta_proj @ dt_low;
    returns selective_scan(x, delta, A, B, C, D, z, delta_bias, delta_softplus): (b, d, l).
    checkpoint_lvl is accepted for compatibility (it tunes the CUDA backward's memory use).
    """
    _check_inner_args(xz, conv1d_weight, x_proj_weight, delta_proj_weight, A, checkpoint_lvl)
    return _inner_no_out_proj(*_primitives(xz), xz, conv1d_weight, conv1d_bias, x_proj_weight,
                              delta_proj_weight, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias,
                              delta_softplus)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                   out_proj_weight, out_proj_bias, A, B=None, C=None, D=None, delta_bias=None,
                   B_proj_bias=None, C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1):
    """`mamba_inner_fn_no_out_proj` followed by out_proj: returns (b, l, d_model)."""
    y = mamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A,
                                   B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
                                   checkpoint_lvl)
    return _out_proj(y, out_proj_weight, out_proj_bias)


def bimamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                 A, A_b, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                                 C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1):
    """Bimamba v1 without out_proj: one conv and projection, two scans (A forward, A_b over the
    flipped sequence), y = scan(x) + flip(scan(flip(x))): returns (b, d, l)."""
    _check_inner_args(xz, conv1d_weight, x_proj_weight, delta_proj_weight, A, checkpoint_lvl)
    _check_A_b(A, A_b)
    return _inner_no_out_proj(*_primitives(xz), xz, conv1d_weight, conv1d_bias, x_proj_weight,
                              delta_proj_weight, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias,
                              delta_softplus, A_b=A_b)


def bimamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                     out_proj_weight, out_proj_bias, A, A_b, B=None, C=None, D=None, delta_bias=None,
                     B_proj_bias=None, C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1):
    """`bimamba_inner_fn_no_out_proj` followed by out_proj: returns (b, l, d_model)."""
    y = bimamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A,
                                     A_b, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
                                     checkpoint_lvl)
    return _out_proj(y, out_proj_weight, out_proj_bias)


def mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                    out_proj_weight, out_proj_bias, A, B=None, C=None, D=None, delta_bias=None,
                    B_proj_bias=None, C_proj_bias=None, delta_softplus=True):
    """`mamba_inner_fn` computed with `causal_conv1d_ref` and `selective_scan_ref`."""
    _check_inner_args(xz, conv1d_weight, x_proj_weight, delta_proj_weight, A, 1)
    y = _inner_no_out_proj(*_ref_primitives(), xz, conv1d_weight, conv1d_bias, x_proj_weight,
                           delta_proj_weight, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias,
                           delta_softplus)
    return _out_proj(y, out_proj_weight, out_proj_bias)


def bimamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                      out_proj_weight, out_proj_bias, A, A_b, B=None, C=None, D=None, delta_bias=None,
                      B_proj_bias=None, C_proj_bias=None, delta_softplus=True):
    """`bimamba_inner_fn` computed with `causal_conv1d_ref` and `selective_scan_ref`."""
    _check_inner_args(xz, conv1d_weight, x_proj_weight, delta_proj_weight, A, 1)
    _check_A_b(A, A_b)
    y = _inner_no_out_proj(*_ref_primitives(), xz, conv1d_weight, conv1d_bias, x_proj_weight,
                           delta_proj_weight, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias,
                           delta_softplus, A_b=A_b)
    return _out_proj(y, out_proj_weight, out_proj_bias)
