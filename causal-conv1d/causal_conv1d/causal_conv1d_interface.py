"""Causal depthwise 1-D convolution: upstream's public functions, with backends behind them.

Glossary: b batch, d channels, l sequence length, w kernel width, s conv-state length.

    out[:, c, t] = bias[c] + sum_k weight[c, k] * xpad[:, c, t + k]

where xpad is x left-padded with w-1 zeros (or with `initial_states`), optionally followed by
SiLU. `causal_conv1d_fn` and `causal_conv1d_update` dispatch per call (`causal_conv1d.backends`)
to one of these, and a model holds the pair `conv_kernels` chose for it:
  - "ref": `causal_conv1d_ref`: one depthwise F.conv1d over the padded input (upstream's
    reference); `causal_conv1d_update_ref`: the new inputs fed through the state one at a time;
  - "torch": `causal_conv1d_fast` / `causal_conv1d_update_fast`: w shifted multiply-adds over the whole
    sequence (about 2.5x faster on a CPU than F.conv1d with its transposes);
  - "cuda": upstream's compiled `causal_conv1d_cuda` for CUDA tensors, when installed.
"""

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from causal_conv1d.arg_checks import check_floating, shape_error
from causal_conv1d import backends

_ACTIVATIONS = (None, "silu", "swish")


def which_backend(x):
    """Name of the backend ("ref", "torch" or "cuda") a conv call on tensor `x` would use now."""
    return backends.resolve_conv(backends.device_type(x))


def _check_activation(activation):
    if activation not in _ACTIVATIONS:
        raise NotImplementedError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def _check_fn_args(x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out, activation):
    _check_activation(activation)
    check_floating(x=x, weight=weight, bias=bias, initial_states=initial_states, final_states_out=final_states_out)
    if x.dim() != 3:
        raise shape_error("x", "(batch, dim, seqlen)", x)
    b, d, l = x.shape
    if weight.dim() != 2 or weight.shape[0] != d:
        raise shape_error("weight", f"(dim, width) = ({d}, width)", weight)
    w = weight.shape[1]
    if bias is not None and tuple(bias.shape) != (d,):
        raise shape_error("bias", f"(dim,) = ({d},)", bias)
    if initial_states is not None and tuple(initial_states.shape) != (b, d, w - 1):
        raise shape_error("initial_states", f"(batch, dim, width - 1) = ({b}, {d}, {w - 1})", initial_states)
    if final_states_out is not None and tuple(final_states_out.shape) != (b, d, w - 1):
        raise shape_error("final_states_out", f"(batch, dim, width - 1) = ({b}, {d}, {w - 1})", final_states_out)
    if seq_idx is not None:
        if tuple(seq_idx.shape) != (b, l):
            raise shape_error("seq_idx", f"(batch, seqlen) = ({b}, {l})", seq_idx)
        if initial_states is not None or return_final_states:
            raise ValueError("seq_idx cannot be combined with initial_states or return_final_states")


def _final_states(x, initial_states, width):
    """The last w-1 inputs of [initial_states (or zeros), x]: (b, d, w-1), in x's dtype."""
    b, d, l = x.shape
    if l >= width - 1:
        return x[..., l - (width - 1):].clone()
    head = x.new_zeros(b, d, width - 1) if initial_states is None else initial_states.to(x.dtype)
    return torch.cat([head[..., l:], x], dim=-1)


def _finish(out, x, initial_states, weight, return_final_states, final_states_out):
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    final = _final_states(x, initial_states, weight.shape[1])
    if final_states_out is None:
        return out, final
    final_states_out.copy_(final)
    return out, final_states_out


def causal_conv1d_ref(x, weight, bias=None, initial_states=None, return_final_states=False,
                      final_states_out=None, activation=None, seq_idx=None):
    """Reference: the definition as one depthwise `F.conv1d`, computed in the weight's dtype.

    x (b, d, l), weight (d, w), bias (d,), initial_states (b, d, w-1), seq_idx (b, l).
    Returns out (b, d, l) in x's dtype, and final states (b, d, w-1) when return_final_states.
    With seq_idx, inputs from another sequence index than the output's do not contribute: the
    w-wide windows of xpad are masked and summed against the weight instead.
    Cost and autograd graph grow like b * d * l * w (no loop over positions).
    """
    _check_fn_args(x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out, activation)
    b, d, l = x.shape
    w = weight.shape[1]
    dtype = weight.dtype
    head = x.new_zeros(b, d, w - 1, dtype=dtype) if initial_states is None else initial_states.to(dtype)
    xpad = torch.cat([head, x.to(dtype)], dim=-1)  # (b, d, w-1+l): column t+k feeds output t via weight[:, k]
    bias = None if bias is None else bias.to(dtype)
    if seq_idx is None:
        out = F.conv1d(xpad, weight.unsqueeze(1), bias, groups=d) if l else xpad[..., :0].clone()
    else:
        windows = xpad.unfold(-1, w, 1)  # (b, d, l, w): windows[..., t, k] = xpad[..., t + k] = x[..., t + k - (w-1)]
        src = torch.arange(l, device=x.device)[:, None] + torch.arange(w, device=x.device) - (w - 1)  # (l, w)
        same = (src >= 0) & (seq_idx[:, src.clamp(min=0)] == seq_idx[:, :, None])  # (b, l, w)
        out = (windows * same[:, None].to(dtype) * weight[:, None, :]).sum(-1)
        if bias is not None:
            out = out + bias[:, None]
    if activation is not None:
        out = F.silu(out)
    return _finish(out, x, initial_states, weight, return_final_states, final_states_out)


def conv_taps(x, weight, bias, prefix=0, seq_idx=None):
    """Shifted multiply-add causal conv, broadcasting over leading dims (no activation).

    x (..., d, prefix + l): the last l columns are the sequence, the first `prefix` are history.
    weight (..., d, w), bias (..., d) or None, seq_idx (b, l) or None (only with prefix 0).
    Returns (..., d, l) laid out like x (a channel-last x gives a channel-last output).
    Fastest with a channel-last x and weight stored as (..., w, d): every op then runs along
    contiguous channels.
    """
    w = weight.shape[-1]
    l = x.shape[-1] - prefix
    taps = weight.split(1, dim=-1)  # w x (..., d, 1), the last one multiplies the newest input
    seq = x[..., prefix:] if prefix else x
    out = torch.addcmul(bias.unsqueeze(-1), seq, taps[-1]) if bias is not None else seq * taps[-1]
    for shift in range(1, w):
        start = max(0, shift - prefix)
        if start >= l:
            break
        src = x[..., prefix + start - shift:prefix + l - shift]
        if seq_idx is not None:
            src = src * (seq_idx[:, start:] == seq_idx[:, :l - shift])[:, None, :].to(src.dtype)
        out[..., start:].addcmul_(src, taps[w - 1 - shift])
    return out


def _silu(out):
    # In place when nothing needs the pre-activation for a backward pass.
    return F.silu(out, inplace=not (torch.is_grad_enabled() and out.requires_grad))


def causal_conv1d_fast(x, weight, bias=None, initial_states=None, return_final_states=False,
                       final_states_out=None, activation=None, seq_idx=None):
    """Fast pure-PyTorch kernel: w shifted multiply-adds over the whole sequence.

    Same arguments, shapes and results as `causal_conv1d_ref`.
    """
    _check_fn_args(x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out, activation)
    dtype = weight.dtype
    xs = x.to(dtype)
    prefix = 0
    if initial_states is not None:
        xs = torch.cat([initial_states.to(dtype), xs], dim=-1)
        prefix = weight.shape[1] - 1
    out = conv_taps(xs, weight, None if bias is None else bias.to(dtype), prefix, seq_idx)
    if activation is not None:
        out = _silu(out)
    return _finish(out, x, initial_states, weight, return_final_states, final_states_out)


class _CudaConv(torch.autograd.Function):
    """Upstream's compiled kernels (causal-conv1d 1.4 signatures), with their backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, initial_states, final_states_out, silu):
        ext = backends.extension(backends.EXTENSION)
        if x.stride(2) != 1 and x.stride(1) != 1:
            x = x.contiguous()
        bias = bias.contiguous() if bias is not None else None
        out = ext.causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu)
        ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
        if dout.stride(2) != 1 and dout.stride(1) != 1:
            dout = dout.contiguous()
        dx, dweight, dbias, dinitial = backends.extension(backends.EXTENSION).causal_conv1d_bwd(
            x, weight, bias, dout, seq_idx, initial_states, None, None,
            ctx.needs_input_grad[4], ctx.silu)
        return dx, dweight, dbias if bias is not None else None, None, dinitial, None, None


def _causal_conv1d_cuda(x, weight, bias=None, initial_states=None, return_final_states=False,
                        final_states_out=None, activation=None, seq_idx=None):
    _check_fn_args(x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out, activation)
    if return_final_states and final_states_out is None:
        final_states_out = x.new_empty(x.shape[0], x.shape[1], weight.shape[1] - 1)
    out = _CudaConv.apply(x, weight, bias, seq_idx, initial_states,
                          final_states_out if return_final_states else None, activation is not None)
    return (out, final_states_out) if return_final_states else out


# implementation name -> function; all take causal_conv1d_ref's arguments
CONV_IMPLS = {"cuda": _causal_conv1d_cuda, "torch": causal_conv1d_fast, "ref": causal_conv1d_ref}


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """Causal depthwise conv1d (upstream's public entry point).

    x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,); seq_idx: (batch, seqlen);
    initial_states: (batch, dim, width - 1); activation: None, "silu" or "swish".
    Returns out (batch, dim, seqlen) in x's dtype, or (out, final_states (batch, dim, width - 1))
    when return_final_states (written into final_states_out when given).
    """
    impl = CONV_IMPLS[which_backend(x)]
    return impl(x, weight, bias, initial_states=initial_states, return_final_states=return_final_states,
                final_states_out=final_states_out, activation=activation, seq_idx=seq_idx)


def _check_update_args(x, conv_state, weight, bias, activation, cache_seqlens):
    _check_activation(activation)
    check_floating(x=x, conv_state=conv_state, weight=weight, bias=bias)
    if x.dim() not in (2, 3):
        raise shape_error("x", "(batch, dim) or (batch, dim, seqlen)", x)
    b, d = x.shape[:2]
    if weight.dim() != 2 or weight.shape[0] != d:
        raise shape_error("weight", f"(dim, width) = ({d}, width)", weight)
    w = weight.shape[1]
    if conv_state.dim() != 3 or tuple(conv_state.shape[:2]) != (b, d) or conv_state.shape[2] < w - 1:
        raise shape_error("conv_state", f"(batch, dim, state_len >= width - 1) = ({b}, {d}, >={w - 1})", conv_state)
    if bias is not None and tuple(bias.shape) != (d,):
        raise shape_error("bias", f"(dim,) = ({d},)", bias)
    if cache_seqlens is not None and tuple(cache_seqlens.shape) != (b,):
        raise shape_error("cache_seqlens", f"(batch,) = ({b},)", cache_seqlens)


def _update_output(out, x, activation):
    """(b, d, l) conv sums -> activation, x's dtype, and x's shape ((b, d) for a single step)."""
    if activation is not None:
        out = F.silu(out)
    out = out.to(x.dtype)
    return out.squeeze(-1) if x.dim() == 2 else out


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    """Reference decoding step: feed the new inputs one at a time through the state.

    x (b, d) or (b, d, l); conv_state (b, d, s), s >= w-1, updated in place; weight (d, w).
    Without cache_seqlens the state is a shift register (newest input last). With cache_seqlens
    (b,) it is a circular buffer: input i of row j goes to slot (cache_seqlens[j] + i) % s.
    Returns the outputs for the new positions, shaped like x, in x's dtype.
    """
    _check_update_args(x, conv_state, weight, bias, activation, cache_seqlens)
    xs = x.unsqueeze(-1) if x.dim() == 2 else x  # (b, d, l)
    b, d, l = xs.shape
    w, s = weight.shape[1], conv_state.shape[2]
    dtype = weight.dtype
    outs = []
    for i in range(l):
        xi = xs[..., i:i + 1]  # (b, d, 1)
        if cache_seqlens is None:
            window = torch.cat([conv_state[..., s - (w - 1):].to(dtype), xi.to(dtype)], dim=-1)
            conv_state.copy_(torch.cat([conv_state[..., 1:], xi.to(conv_state.dtype)], dim=-1))
        else:
            rows = []
            for j in range(b):
                pos = int(cache_seqlens[j]) + i
                slots = torch.tensor([(pos - (w - 1) + k) % s for k in range(w - 1)],
                                     dtype=torch.long, device=x.device)
                rows.append(torch.cat([conv_state[j][:, slots].to(dtype), xi[j].to(dtype)], dim=-1))
                conv_state[j, :, pos % s] = xi[j, :, 0].to(conv_state.dtype)
            window = torch.stack(rows)  # (b, d, w)
        y = (window * weight).sum(-1)
        if bias is not None:
            y = y + bias.to(dtype)
        outs.append(y)
    return _update_output(torch.stack(outs, dim=-1), x, activation)


def causal_conv1d_update_fast(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    """Fast decoding step: gather the w-1 previous inputs once, run the shifted multiply-adds on
    [history, x], then write the new inputs into the state. Same contract as the reference."""
    _check_update_args(x, conv_state, weight, bias, activation, cache_seqlens)
    xs = x.unsqueeze(-1) if x.dim() == 2 else x  # (b, d, l)
    b, d, l = xs.shape
    w, s = weight.shape[1], conv_state.shape[2]
    dtype = weight.dtype
    if cache_seqlens is None:
        history = conv_state[..., s - (w - 1):].clone()
        conv_state.copy_(torch.cat([conv_state, xs.to(conv_state.dtype)], dim=-1)[..., -s:])
    else:
        offsets = cache_seqlens.long()[:, None]
        hist_idx = torch.remainder(offsets + torch.arange(-(w - 1), 0, device=x.device), s)
        history = conv_state.gather(2, hist_idx[:, None, :].expand(b, d, w - 1))
        write_idx = torch.remainder(offsets + torch.arange(l, device=x.device), s)
        # with l > s only the last s inputs survive in the buffer, as with sequential writes
        keep = slice(max(0, l - s), l)
        conv_state.scatter_(2, write_idx[:, None, keep].expand(b, d, -1), xs[..., keep].to(conv_state.dtype))
    full = torch.cat([history.to(dtype), xs.to(dtype)], dim=-1)
    return _update_output(conv_taps(full, weight, None if bias is None else bias.to(dtype), prefix=w - 1), x,
                          activation)


def _causal_conv1d_update_cuda(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    _check_update_args(x, conv_state, weight, bias, activation, cache_seqlens)
    return backends.extension(backends.EXTENSION).causal_conv1d_update(x, conv_state, weight, bias,
                                                                        activation is not None, cache_seqlens)


# implementation name -> function; all take causal_conv1d_update's arguments
UPDATE_IMPLS = {"cuda": _causal_conv1d_update_cuda, "torch": causal_conv1d_update_fast,
                "ref": causal_conv1d_update_ref}


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    """One decoding step (upstream's public entry point).

    x: (batch, dim) or (batch, dim, seqlen); conv_state: (batch, dim, state_len), state_len >=
    width - 1, updated in place; weight: (dim, width); bias: (dim,); cache_seqlens: (batch,) int32,
    makes conv_state a circular buffer written from index cache_seqlens % state_len.
    Returns the conv outputs for the new positions, shaped like x.
    """
    return UPDATE_IMPLS[which_backend(x)](x, conv_state, weight, bias, activation, cache_seqlens)


@dataclass(frozen=True)
class ConvKernels:
    """The causal conv a model runs, chosen once by `conv_kernels`: `name` ("ref", "torch" or
    "cuda"), `fn` with causal_conv1d_ref's arguments, `update` with causal_conv1d_update's."""

    name: str
    fn: Callable
    update: Callable


def conv_kernels(backend, device):
    """The conv kernels for a model on `device` (a device type: "cpu", "cuda", "meta"...) under
    `backend` (one of `backends.BACKENDS`), reading CAUSAL_CONV1D_FORCE_FALLBACK now.
    Raises RuntimeError when an explicit backend cannot run there, ValueError for an unknown one."""
    name = backends.resolve_conv(device, backend)
    return ConvKernels(name, CONV_IMPLS[name], UPDATE_IMPLS[name])
