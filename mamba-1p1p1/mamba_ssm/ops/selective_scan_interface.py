"""Selective scan and the fused Mamba inner paths: upstream's public functions.

Glossary: b batch, d channels (d_inner), l sequence length, n state size (d_state), r dt rank,
g groups of B/C, w conv width.

    dt  = softplus(delta + delta_bias)              (bias and softplus optional)
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t    h_0 = 0, h: (b, d, n)
    y_t = sum_n h_t * C_t + D * u_t ;  y = y * silu(z)  (D and z optional)

B and C are (b, n, l) or (b, g, n, l) (time-varying, as Mamba uses them) or (d, n)
(time-invariant, S4-style). A may be complex (S4D-Lin style): the state h is then complex and
y_t = 2 Re(sum_n h_t * C_t) (each state stands for a conjugate pair); time-varying B/C are then
real tensors with (real, imag) pairs interleaved along the last dim, (b, n, 2l) or (b, g, n, 2l),
and a time-invariant B/C is a real or complex (d, n). These are upstream's conventions.

Every public `*_fn` function dispatches per call (`mamba_ssm.ops.backends.resolve_scan`, with the
thread's `use_backend` choice), as upstream's do, to one of these implementations:
  "torch" -- `selective_scan_fast` (time-major in-place scan) and compositions of fast kernels;
  "numba" -- the same with the compiled numba scan kernel (inference, real A, time-varying B/C);
  "ref"   -- the `*_ref` functions: plain sequential loops, obviously correct;
  "cuda"  -- upstream's compiled `selective_scan_cuda`, for CUDA tensors, when installed.
A model calls the implementations its kernel set names instead (`SCAN_IMPLS`, and
`inner_no_out_proj` with the conv and scan fixed), without deciding again.
Computation is in float32 (float64 stays float64); outputs come back in u's dtype.
"""

import torch
import torch.nn.functional as F

from causal_conv1d import causal_conv1d_fn
from causal_conv1d.arg_checks import check_floating, shape_error
from causal_conv1d.backends import device_type, extension
from causal_conv1d.causal_conv1d_interface import CONV_IMPLS
from mamba_ssm.ops.backends import EXTENSION, resolve_scan
from mamba_ssm.ops.selective_scan_fast import scan_state_nd


def _check_scan_args(u, delta, A, B, C, D, z, delta_bias):
    check_floating(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    for name, t in (("u", u), ("delta", delta), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if t is not None and t.is_complex():
            raise TypeError(f"{name} must be a real floating-point tensor, got {t.dtype}")
    if u.dim() != 3:
        raise shape_error("u", "(batch, dim, seqlen)", u)
    b, d, l = u.shape
    if delta.shape != u.shape:
        raise shape_error("delta", f"(batch, dim, seqlen) = {(b, d, l)} like u", delta)
    if A.dim() != 2 or A.shape[0] != d:
        raise shape_error("A", f"(dim, dstate) = ({d}, dstate)", A)
    n = A.shape[1]
    # complex A: time-varying B/C carry (real, imag) pairs along the last dim
    steps, steps_name = (2 * l, "2 * seqlen") if A.is_complex() else (l, "seqlen")
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 2 and tuple(t.shape) == (d, n):
            if t.is_complex() and not A.is_complex():
                raise TypeError(f"{name} is complex but A is real: a complex (dim, dstate) {name} needs a complex A")
            continue
        if t.dim() in (3, 4) and t.is_complex():
            raise TypeError(f"{name} must be real when it varies in time, got {t.dtype} (with complex A, "
                            f"its (real, imag) pairs are interleaved along the last dim)")
        if t.dim() == 3 and tuple(t.shape) == (b, n, steps):
            continue
        if t.dim() == 4 and tuple(t.shape[:1] + t.shape[2:]) == (b, n, steps) and d % t.shape[1] == 0:
            continue
        raise shape_error(name, f"(batch, dstate, {steps_name}) = ({b}, {n}, {steps}) or (batch, groups, dstate, "
                                 f"{steps_name}) with groups dividing dim={d}, or (dim, dstate) = ({d}, {n}) "
                                 f"when time-invariant", t)
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


def _state_dtype(A, dtype):
    """The scan state's dtype for real compute dtype `dtype`: complex of the same precision for a
    complex A."""
    if not A.is_complex():
        return dtype
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _from_pairs(t, dtype):
    """A time-varying B or C of a complex-A scan, (..., n, 2l) real with (real, imag) pairs along
    the last dim, as a complex (..., n, l) tensor of precision `dtype`."""
    t = t.to(dtype)
    return torch.complex(t[..., 0::2], t[..., 1::2])


def _values(t, A, dtype):
    """B or C as the values the scan uses: time-varying ones as (b, g, n, l) (complex when A is),
    a time-invariant one as (d, n); all in the state's dtype."""
    if t.dim() == 2:
        return t.to(_state_dtype(A, dtype))
    return _groups(_from_pairs(t, dtype) if A.is_complex() else t.to(dtype))


def _skip_and_gate(y, u, D, z):
    """y + D * u, then * silu(z); all (b, d, l)."""
    if D is not None:
        y = torch.addcmul(y, u, D.to(y.dtype)[:, None])
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _per_channel(t, A, d, l, dtype):
    """B or C as values broadcastable to (b, d, n, l): channel c of a (b, g, n, l) one uses group
    c // (d/g); a time-invariant (d, n) one is the same at every step and for every sample."""
    v = _values(t, A, dtype)
    if v.dim() == 2:
        return v[None, :, :, None].expand(1, d, v.shape[1], l)
    return v.repeat_interleave(d // v.shape[1], dim=1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Reference selective scan: one time step per loop iteration.

    u, delta, z: (b, d, l); A: (d, n) real or complex; B, C: (b, n, l) or (b, g, n, l) (with
    complex A: (b, n, 2l) or (b, g, n, 2l), (real, imag) pairs) or time-invariant (d, n);
    D, delta_bias: (d,).
    Returns out (b, d, l) in u's dtype, and last_state (b, d, n) (complex for complex A) when
    return_last_state.
    """
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    b, d, l = u.shape
    uf = u.to(dtype)
    dt = _discretize_dt(delta, delta_bias, delta_softplus, dtype)
    Bd, Cd = _per_channel(B, A, d, l, dtype), _per_channel(C, A, d, l, dtype)  # (b or 1, d, n, l)
    Af = A.to(_state_dtype(A, dtype))
    h = uf.new_zeros(b, d, A.shape[1], dtype=Af.dtype)
    ys = []
    for t in range(l):
        h = torch.exp(dt[:, :, t, None] * Af) * h + (dt[:, :, t] * uf[:, :, t])[:, :, None] * Bd[..., t]
        y_t = (h * Cd[..., t]).sum(-1)
        ys.append(2 * y_t.real if y_t.is_complex() else y_t)  # complex: h and its conjugate
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(b, d, 0)
    out = _skip_and_gate(y, uf, D, z).to(u.dtype)
    return (out, h) if return_last_state else out


def selective_scan_fast(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    """Fast pure-PyTorch selective scan (see `selective_scan_fast.scan_state_nd`).

    Same arguments, shapes and results as `selective_scan_ref`. Time-varying B/C with real A
    (Mamba, Vim) take the layout the kernel is built for. A time-invariant B or C depends on the
    channel, so there the channels become batch dims of the kernel (a (n, 1) state per channel).
    Complex A runs the same kernel in complex arithmetic: correct, but only about as fast as the
    reference (b 1, d 256, n 16, l 512, one thread: 110-160 ms against 100-260 ms; real A with a
    time-invariant B: 5 ms against 50 ms). Autograd works in every case.
    """
    return _selective_scan_time_major("torch", u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      return_last_state)


def numba_scan_state_nd(*args):
    """`selective_scan_numba.scan_state_nd`, importing numba at the first call only."""
    from mamba_ssm.ops import selective_scan_numba  # imports numba (~50 MB): only when used

    return selective_scan_numba.scan_state_nd(*args)


def _selective_scan_numba(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    return _selective_scan_time_major("numba", u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      return_last_state)


_STATE_ND = {"torch": scan_state_nd, "numba": numba_scan_state_nd}  # kernel name -> `scan_state_nd`


def _selective_scan_time_major(kernel, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """The fast scans: time-major views into the `scan_state_nd` kernel named `kernel` ("torch" or
    "numba")."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    scan = _STATE_ND[kernel]
    dtype = _compute_dtype(u)
    b, d, l = u.shape
    Bg, Cg = _values(B, A, dtype), _values(C, A, dtype)  # (b, g, n, l) or time-invariant (d, n)
    g = max([t.shape[1] for t in (Bg, Cg) if t.dim() == 4], default=1)  # 1 group broadcasts against g
    n = A.shape[1]
    uf = u.to(dtype)
    dt = _discretize_dt(delta, delta_bias, delta_softplus, dtype)
    wdtype = _state_dtype(A, dtype)
    if Bg.dim() == 4 and Cg.dim() == 4:
        # time-major views: d is split into (g, d/g) so a group's B/C broadcasts over its channels;
        # the kernel keeps the state as (n, d)
        y, last = scan(
            dt.to(wdtype).view(b, g, d // g, l).permute(3, 0, 1, 2),
            uf.to(wdtype).view(b, g, d // g, l).permute(3, 0, 1, 2),
            A.to(wdtype).view(g, d // g, n).transpose(-1, -2),
            Bg.permute(3, 0, 1, 2),
            Cg.permute(3, 0, 1, 2),
        )  # y (l, b, g, d/g), last (b, g, n, d/g)
        y = y.permute(1, 2, 3, 0).reshape(b, d, l)
        last = last.transpose(-1, -2).reshape(b, d, n)
    else:
        # channels as batch dims (b, g, d/g) with a kernel "channel" axis of size 1: a time-varying
        # B/C is (l, b, g, 1, n), a time-invariant one (l, 1, g, d/g, n) (expanded, not copied)
        def time_major(M):
            if M.dim() == 2:
                return M.reshape(1, 1, g, d // g, n).expand(l, 1, g, d // g, n)
            return M.permute(3, 0, 1, 2).unsqueeze(-2)

        y, last = scan(
            dt.to(wdtype).view(b, g, d // g, l).permute(3, 0, 1, 2).unsqueeze(-1),
            uf.to(wdtype).view(b, g, d // g, l).permute(3, 0, 1, 2).unsqueeze(-1),
            A.to(wdtype).reshape(g, d // g, n, 1),
            time_major(Bg),
            time_major(Cg),
        )  # y (l, b, g, d/g, 1), last (b, g, d/g, n, 1)
        y = y.squeeze(-1).permute(1, 2, 3, 0).reshape(b, d, l)
        last = last.reshape(b, d, n)
    if y.is_complex():
        y = 2 * y.real  # each complex state stands for itself and its conjugate
    out = _skip_and_gate(y, uf, D, z).to(u.dtype)
    return (out, last) if return_last_state else out


class _CudaScan(torch.autograd.Function):
    """Upstream's compiled selective scan (mamba 1.1.1 signatures) with its backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        u, delta, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta, B, C))
        z = z if z is None or z.stride(-1) == 1 else z.contiguous()
        ctx.squeeze_B, ctx.squeeze_C = B.dim() == 3, C.dim() == 3
        B, C = _groups(B), _groups(C)
        out, x, *rest = extension(EXTENSION).fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
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
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = extension(EXTENSION).bwd(
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


# implementation name -> function; all take selective_scan_ref's arguments
SCAN_IMPLS = {"cuda": _selective_scan_cuda, "torch": selective_scan_fast, "numba": _selective_scan_numba,
              "ref": selective_scan_ref}


def numba_unsupported(dtype, channels, *, complex_A=False, time_invariant=False):
    """Why the numba scan kernel cannot take a scan of u's `dtype` with `channels` per group of B/C,
    or None (it runs 32 channels per work item)."""
    if complex_A:
        return "complex A"
    if time_invariant:
        return "time-invariant B or C"
    if dtype not in (torch.float32, torch.float64):
        return f"dtype {dtype} (float32 or float64 only)"
    if channels % 32:
        return f"{channels} channels per group (a multiple of 32 needed)"
    return None


def _call_unsupported(u, A, B, C):
    groups = max(t.shape[1] if t.dim() == 4 else 1 for t in (B, C))
    channels = u.shape[1] // groups if u.dim() == 3 else 32  # a u of another rank: the argument checks say so
    return numba_unsupported(u.dtype, channels, complex_A=A.is_complex(), time_invariant=B.dim() == 2 or C.dim() == 2)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Selective scan (upstream's public entry point); see the module docstring for the math.

    u: (b, d, l); delta: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D: (d,);
    z: (b, d, l); delta_bias: (d,). Returns out (b, d, l) in u's dtype, or (out, last_state
    (b, d, n)) when return_last_state.
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    backend = resolve_scan(device_type(u), needs_grad=needs_grad, numba_unsupported=_call_unsupported(u, A, B, C),
                           numba_kernels="scan")
    return SCAN_IMPLS[backend](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _check_inner_args(xz, conv1d_weight, x_proj_weight, delta_proj_weight, A, checkpoint_lvl, B=None, C=None):
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
    # one block of dstate columns per projected B and C (B and C given: none); two with complex A
    blocks = ((B is None) + (C is None)) * (2 if A.is_complex() else 1)
    rows = r + blocks * n
    names = "dt_rank" + ("" if blocks == 0 else " + dstate" if blocks == 1 else f" + {blocks} * dstate")
    if tuple(x_proj_weight.shape) != (rows, d):
        raise shape_error("x_proj_weight", f"({names}, dim) = ({rows}, {d})", x_proj_weight)
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"checkpoint_lvl must be 0 or 1, got {checkpoint_lvl!r}")


def _check_A_b(A, A_b, B, C):
    if A_b is None:
        raise ValueError("A_b (the backward direction's A, shape (dim, dstate)) is required by the "
                         "bidirectional inner functions; mamba_inner_fn runs one direction")
    if A_b.shape != A.shape:
        raise shape_error("A_b", f"(dim, dstate) = {tuple(A.shape)} like A", A_b)
    # not defined upstream either (its kernel refuses complex A; its reference would flip the
    # state axis of a (dim, dstate) B/C and swap the (real, imag) pairs): refused, not guessed
    if A.is_complex() or A_b.is_complex():
        raise NotImplementedError("complex A or A_b is not supported by the bidirectional inner functions")
    for name, t in (("B", B), ("C", C)):
        if t is not None and t.dim() == 2:
            raise NotImplementedError(f"a time-invariant {name} (dim, dstate) is not supported by the "
                                      f"bidirectional inner functions")


def _out_proj(y, out_proj_weight, out_proj_bias):
    """y (b, d, l) -> (b, l, d_model) through out_proj_weight (d_model, d)."""
    check_floating(out_proj_weight=out_proj_weight, out_proj_bias=out_proj_bias)
    if out_proj_weight.dim() != 2 or out_proj_weight.shape[1] != y.shape[1]:
        raise shape_error("out_proj_weight", f"(d_model, dim) = (d_model, {y.shape[1]})", out_proj_weight)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def _projected(cols, bias, pairs):
    """Projected B or C columns (b, l, m) (+ bias (m,)) as the scan takes them: (b, m, l), or
    with pairs (complex A; m = 2n, (real, imag) per state) (b, n, 2l), pairs interleaved in time."""
    if bias is not None:
        cols = cols + bias
    if not pairs:
        return cols.transpose(1, 2)
    b, l, m = cols.shape
    return cols.view(b, l, m // 2, 2).permute(0, 2, 1, 3).reshape(b, m // 2, 2 * l)


def inner_projections(x, x_proj_weight, delta_proj_weight, B=None, C=None, B_proj_bias=None, C_proj_bias=None,
                      pairs=False):
    """From the conv output x (b, d, l): delta (b, d, l) and B, C (b, n, l) unless given.

    x_proj_weight's rows are [dt_rank; B's block if B is None; C's block if C is None]. With
    pairs (complex A) each block holds 2n columns, (real, imag) per state, and B/C come out as
    (b, n, 2l), the layout the scan takes for complex A.
    """
    r = delta_proj_weight.shape[1]
    blocks = (B is None) + (C is None)
    m = (x_proj_weight.shape[0] - r) // blocks if blocks else 0  # columns per projected B or C
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (b, l, r + blocks * m)
    delta = F.linear(x_dbl[..., :r], delta_proj_weight).transpose(1, 2)  # (b, d, l)
    if B is None:
        B = _projected(x_dbl[..., r:r + m], B_proj_bias, pairs)
    if C is None:
        C = _projected(x_dbl[..., x_dbl.shape[-1] - m:], C_proj_bias, pairs)
    return delta, B, C


# implementation name -> the conv / scan of a composed inner path; "fn": the public function,
# which dispatches per call
_CONVS = {**CONV_IMPLS, "fn": causal_conv1d_fn}
_SCANS = {**SCAN_IMPLS, "fn": selective_scan_fn}


def _inner_no_out_proj(conv, scan, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                       A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus, A_b=None):
    """conv -> projections -> scan for one direction; with A_b, also the flipped direction
    sharing conv and projections (bimamba v1). conv, scan: implementation names (keys of _CONVS,
    _SCANS). Returns (b, d, l)."""
    conv_impl, scan_impl = _CONVS[conv], _SCANS[scan]
    x, z = xz.chunk(2, dim=1)
    x = conv_impl(x, conv1d_weight.squeeze(1), conv1d_bias, activation="silu")
    delta, B, C = inner_projections(x, x_proj_weight, delta_proj_weight, B, C, B_proj_bias, C_proj_bias,
                                    pairs=A.is_complex())
    y = scan_impl(x, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if A_b is not None:
        flip = lambda t: t.flip(-1)
        y = y + flip(scan_impl(flip(x), flip(delta), A_b, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus))
    return y


def inner_no_out_proj(conv, scan, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B=None,
                      C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True,
                      A_b=None):
    """`mamba_inner_fn_no_out_proj` (A_b None) or `bimamba_inner_fn_no_out_proj` on the conv and
    scan implementations named `conv` ("ref", "torch" or "cuda") and `scan` ("ref", "torch",
    "numba" or "cuda"), chosen beforehand (a model's kernel set binds them): no decision per call.
    Same shapes and results as those functions."""
    _check_inner_args(xz, conv1d_weight, x_proj_weight, delta_proj_weight, A, 1, B, C)
    if A_b is not None:
        _check_A_b(A, A_b, B, C)
    return _inner_no_out_proj(conv, scan, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                              A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus, A_b=A_b)


def mamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                               A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                               C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1):
    """One direction of the Mamba inner path, without out_proj.

    xz: (b, 2d, l) = [x; z]; conv1d_weight: (d, 1, w); conv1d_bias: (d,);
    x_proj_weight: (r + 2n, d); delta_proj_weight: (d, r); A: (d, n); D, delta_bias: (d,).
    x = silu(causal_conv1d(x)); [dt_low, B, C] = x^T x_proj^T; delta = delta_proj @ dt_low;
    returns selective_scan(x, delta, A, B, C, D, z, delta_bias, delta_softplus): (b, d, l).
    A B or C given (e.g. time-invariant (d, n)) is not projected: x_proj_weight then has n rows
    fewer for each. Complex A: each projected B/C takes 2n rows ((real, imag) per state).
    checkpoint_lvl is accepted for compatibility (it tunes the CUDA backward's memory use).
    """
    _check_inner_args(xz, conv1d_weight, x_proj_weight, delta_proj_weight, A, checkpoint_lvl, B, C)
    return _inner_no_out_proj("fn", "fn", xz, conv1d_weight, conv1d_bias, x_proj_weight,
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
    _check_inner_args(xz, conv1d_weight, x_proj_weight, delta_proj_weight, A, checkpoint_lvl, B, C)
    _check_A_b(A, A_b, B, C)
    return _inner_no_out_proj("fn", "fn", xz, conv1d_weight, conv1d_bias, x_proj_weight,
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
    _check_inner_args(xz, conv1d_weight, x_proj_weight, delta_proj_weight, A, 1, B, C)
    y = _inner_no_out_proj("ref", "ref", xz, conv1d_weight, conv1d_bias, x_proj_weight,
                           delta_proj_weight, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias,
                           delta_softplus)
    return _out_proj(y, out_proj_weight, out_proj_bias)


def bimamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                      out_proj_weight, out_proj_bias, A, A_b, B=None, C=None, D=None, delta_bias=None,
                      B_proj_bias=None, C_proj_bias=None, delta_softplus=True):
    """`bimamba_inner_fn` computed with `causal_conv1d_ref` and `selective_scan_ref`."""
    _check_inner_args(xz, conv1d_weight, x_proj_weight, delta_proj_weight, A, 1, B, C)
    _check_A_b(A, A_b, B, C)
    y = _inner_no_out_proj("ref", "ref", xz, conv1d_weight, conv1d_bias, x_proj_weight,
                           delta_proj_weight, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias,
                           delta_softplus, A_b=A_b)
    return _out_proj(y, out_proj_weight, out_proj_bias)
