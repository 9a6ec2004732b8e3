"""One decoding step of the selective scan, in plain PyTorch (upstream uses Triton).

Glossary: b batch, d channels, n state size; in the multi-head form (Mamba-2 style, also in
upstream's tests) h heads of p channels each, with B/C shared by g groups of h/g heads.

    dt = softplus(dt + dt_bias)                        (bias and softplus optional)
    state = exp(dt * A) * state + dt * B * x           (state updated in place)
    out = sum_n state * C + D * x;  out = out * silu(z)  (D and z optional)

Two forms, as upstream's `selective_state_update` (mamba 2.x; 1.1.1 had the first only):
  single-head: state (b, d, n); x, dt, z (b, d); A (d, n); B, C (b, n); D, dt_bias (d,)
  multi-head:  state (b, h, p, n); x, dt, z (b, h, p); A (h, p, n); B, C (b, g, n), g dividing h;
               D, dt_bias (h, p)
Any argument may also be given in its single-head form next to a multi-head state when the
missing axis is 1 (one head, or one group for B/C), as upstream allows.
With state_batch_indices (b,) the state holds more rows than the batch: batch row i reads and
writes state row state_batch_indices[i]; a negative index marks a padding row (output 0, no
state touched). Computed in float32 (float64 stays float64); out comes back in x's dtype.

`selective_state_update` does the step with whole-batch ops; `selective_state_update_ref` one
batch row at a time.
"""

import torch
import torch.nn.functional as F

from causal_conv1d.arg_checks import check_floating, shape_error


def _prepare(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices):
    """Check the arguments; return them in the multi-head form, the batch row -> state row
    indices (None for the identity) and whether the caller used the single-head form."""
    check_floating(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    if state.dim() not in (3, 4):
        raise shape_error("state", "(batch, dim, dstate) or (batch, nheads, headdim, dstate)", state)
    single = state.dim() == 3
    state4 = state.unsqueeze(1) if single else state
    rows, h, p, n = state4.shape
    if state_batch_indices is None:
        b = rows
    else:
        if state_batch_indices.dim() != 1 or state_batch_indices.is_floating_point() \
                or state_batch_indices.dtype == torch.bool:
            raise ValueError(f"state_batch_indices must be a 1-D integer tensor (batch,), got "
                             f"{state_batch_indices.dtype} of shape {tuple(state_batch_indices.shape)}")
        b = state_batch_indices.shape[0]
        if b and int(state_batch_indices.max()) >= rows:
            raise ValueError(f"state_batch_indices must be < {rows} (the state's first dim), got "
                             f"{int(state_batch_indices.max())}")
    groups = B.shape[1] if B.dim() == 3 else 1
    if groups < 1 or h % groups:
        raise shape_error("B", f"(batch, ngroups, dstate) with ngroups dividing nheads={h}", B)
    expected = {"x": (b, h, p), "dt": (b, h, p), "A": (h, p, n), "B": (b, groups, n), "C": (b, groups, n),
                "D": (h, p), "z": (b, h, p), "dt_bias": (h, p)}
    given = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias}
    out = {}
    for name, shape in expected.items():
        t = given[name]
        if t is None:
            out[name] = None
            continue
        squeeze_at = 1 if name in ("x", "dt", "z", "B", "C") else 0  # the heads (or groups) axis
        if t.dim() == len(shape) - 1:
            t = t.unsqueeze(squeeze_at)
        if tuple(t.shape) != shape:
            want = shape[:squeeze_at] + shape[squeeze_at + 1:] if single else shape
            raise ValueError(f"{name} must have shape {want} for a state of shape {tuple(state.shape)}"
                             f"{'' if state_batch_indices is None else ' and ' + str(b) + ' batch rows'}, "
                             f"got {tuple(given[name].shape)}")
        out[name] = t
    index = None if state_batch_indices is None else state_batch_indices.to(device=state.device, dtype=torch.long)
    return state4, out, index, single


def _discretize(dt, dt_bias, dt_softplus, dtype):
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    return F.softplus(dt) if dt_softplus else dt


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """Advance the SSM state by one token, in place, and return the output.

    Single-head: state (b, d, n); x, dt, z (b, d); A (d, n); B, C (b, n); D, dt_bias (d,).
    Multi-head: state (b, h, p, n); x, dt, z (b, h, p); A (h, p, n); B, C (b, g, n); D, dt_bias (h, p).
    state_batch_indices (b,): the state row of each batch row (negative: padding row).
    Returns out (b, d) or (b, h, p) in x's dtype; the state is written in place.
    """
    state4, a, index, single = _prepare(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    dtype = torch.promote_types(state.dtype, torch.float32)
    h, groups = state4.shape[1], a["B"].shape[1]
    if index is None:
        prev, keep = state4, None
    else:
        keep = index >= 0  # (b,): padding rows neither read nor write the state
        prev = state4[index.clamp(min=0)]
    dt = _discretize(a["dt"], a["dt_bias"], dt_softplus, dtype)  # (b, h, p)
    xf = a["x"].to(dtype)
    Bh, Ch = (t.to(dtype).repeat_interleave(h // groups, dim=1) if groups > 1 else t.to(dtype)
              for t in (a["B"], a["C"]))  # (b, h or 1, n): head k uses group k // (h / g)
    new_state = torch.exp(dt[..., None] * a["A"].to(dtype)) * prev.to(dtype) \
        + (dt * xf)[..., None] * Bh[:, :, None, :]  # (b, h, p, n)
    out = (new_state * Ch[:, :, None, :]).sum(-1)  # (b, h, p)
    if a["D"] is not None:
        out = out + a["D"].to(dtype) * xf
    if a["z"] is not None:
        out = out * F.silu(a["z"].to(dtype))
    if keep is None:
        state4.copy_(new_state)
    else:
        state4.index_copy_(0, index[keep], new_state[keep].to(state.dtype))
        out = out * keep[:, None, None].to(dtype)
    out = out.to(x.dtype)
    return out.squeeze(1) if single else out


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               state_batch_indices=None):
    """Reference step: the formula applied to one batch row at a time (heads broadcast, each
    head given its group's B and C). Same arguments, shapes and results as
    `selective_state_update` (upstream's reference has no state_batch_indices; it is accepted
    here so both can be compared on every input)."""
    state4, a, index, single = _prepare(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    dtype = torch.promote_types(state.dtype, torch.float32)
    h, groups = state4.shape[1], a["B"].shape[1]
    head_group = torch.arange(h, device=state.device) // (h // groups)  # group of each head
    Af = a["A"].to(dtype)
    dts = _discretize(a["dt"], a["dt_bias"], dt_softplus, dtype)
    outs = []
    for i in range(dts.shape[0]):
        row = i if index is None else int(index[i])
        if row < 0:  # padding
            outs.append(dts.new_zeros(dts.shape[1:]))
            continue
        dt_i, x_i = dts[i], a["x"][i].to(dtype)  # (h, p)
        B_i, C_i = a["B"][i].to(dtype)[head_group], a["C"][i].to(dtype)[head_group]  # (h, n)
        s = torch.exp(dt_i[..., None] * Af) * state4[row].to(dtype) + (dt_i * x_i)[..., None] * B_i[:, None, :]
        state4[row] = s
        y = (s * C_i[:, None, :]).sum(-1)  # (h, p)
        if a["D"] is not None:
            y = y + a["D"].to(dtype) * x_i
        if a["z"] is not None:
            y = y * F.silu(a["z"][i].to(dtype))
        outs.append(y)
    out = torch.stack(outs) if outs else dts.new_zeros(dts.shape)
    out = out.to(x.dtype)
    return out.squeeze(1) if single else out
