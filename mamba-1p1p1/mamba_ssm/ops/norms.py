"""RMSNorm / LayerNorm with a fused residual add, in plain PyTorch (upstream uses Triton;
`ops.triton.layer_norm` keeps upstream's import path and holds the `RMSNorm` module).

    s   = x + residual            (or x alone)
    out = s / sqrt(mean(s^2) + eps) * weight (+ bias)          rms_norm_fn
    out = (s - mean(s)) / sqrt(var(s) + eps) * weight (+ bias)  layer_norm_fn
Statistics are computed in float32 (float64 stays float64); `out` has x's dtype. With prenorm
the sum s is returned too (as the next residual): in the incoming residual's dtype, or for
the first block in float32 when residual_in_fp32 (else x's dtype).

Two implementations with rms_norm_fn's arguments: `rms_norm_formula` (the formula above, with
autograd) and `rms_norm_fused` (the fused add + RMSNorm kernel of `bimamba_v2_numba`: inference,
float32, with a weight and no bias). `rms_norm_fn` chooses per call (`ops.backends.resolve_scan`,
with the thread's `use_backend` choice); an `RMSNorm` module calls the one its kernel set names.
"""

import torch
import torch.nn.functional as F

from causal_conv1d.arg_checks import check_floating, shape_error
from causal_conv1d.backends import device_type
from mamba_ssm.ops.backends import resolve_scan


def _check_norm_args(x, weight, bias, residual):
    check_floating(x=x, weight=weight, bias=bias, residual=residual)
    hidden = x.shape[-1:]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != hidden:
            raise shape_error(name, f"(hidden,) = {tuple(hidden)} like x's last dim", t)
    if residual is not None and residual.shape != x.shape:
        raise shape_error("residual", f"{tuple(x.shape)} like x", residual)


def _add_residual(x, residual, residual_in_fp32):
    """s = x + residual in float32 (or float64), and the dtype s is returned in: an incoming
    residual keeps its dtype; the first one is float32 when residual_in_fp32, else x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    if residual is not None:
        return x.to(compute) + residual.to(compute), residual.dtype
    return x.to(compute), compute if residual_in_fp32 else x.dtype


def _finish(out, s, x, prenorm, residual_dtype):
    out = out.to(x.dtype)
    return (out, s.to(residual_dtype)) if prenorm else out


def _numba_unsupported(x, weight, bias, residual):
    """Why the numba add + RMSNorm kernel cannot take this call, or None."""
    if weight is None or bias is not None:
        return "an RMSNorm without a weight or with a bias"
    if any(t.dtype != torch.float32 for t in (x, weight, residual) if t is not None):
        return "dtypes other than float32"
    return None


def rms_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False):
    """x, residual: (..., hidden); weight, bias: (hidden,) or None. See the module docstring.
    Returns out (..., hidden) in x's dtype, and with prenorm also s = x + residual."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual))
    name = resolve_scan(device_type(x), needs_grad=needs_grad,
                        numba_unsupported=_numba_unsupported(x, weight, bias, residual))
    fn = rms_norm_fused if name == "numba" else rms_norm_formula
    return fn(x, weight, bias, residual, eps, prenorm, residual_in_fp32)


def rms_norm_fused(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False):
    """`rms_norm_formula` by the fused numba kernel (inference; float32 x, residual and weight on the
    CPU, no bias: `bimamba_v2_numba.add_rms_norm` raises for other tensors). s comes back in
    float32, which is what residual_in_fp32 asks for."""
    from mamba_ssm.ops import bimamba_v2_numba  # on the numba path only: the torch path never loads it

    _check_norm_args(x, weight, bias, residual)
    out, s = bimamba_v2_numba.add_rms_norm(x, residual, weight, eps)
    return (out, s) if prenorm else out


def rms_norm_formula(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False):
    """The module docstring's formula in PyTorch ops (autograd works); rms_norm_fn's arguments."""
    _check_norm_args(x, weight, bias, residual)
    s, residual_dtype = _add_residual(x, residual, residual_in_fp32)
    out = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(s.dtype)
    if bias is not None:
        out = out + bias.to(s.dtype)
    return _finish(out, s, x, prenorm, residual_dtype)


def layer_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                  is_rms_norm=False):
    """Like `rms_norm_fn`, with LayerNorm statistics unless is_rms_norm."""
    if is_rms_norm:
        return rms_norm_fn(x, weight, bias, residual, eps, prenorm, residual_in_fp32)
    _check_norm_args(x, weight, bias, residual)
    s, residual_dtype = _add_residual(x, residual, residual_in_fp32)
    out = F.layer_norm(s, s.shape[-1:], None if weight is None else weight.to(s.dtype),
                       None if bias is None else bias.to(s.dtype), eps)
    return _finish(out, s, x, prenorm, residual_dtype)
