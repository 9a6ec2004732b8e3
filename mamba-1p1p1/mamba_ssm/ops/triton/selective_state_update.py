"""One decoding step of the selective scan, in plain PyTorch (upstream uses Triton)."""

import torch
import torch.nn.functional as F

from causal_conv1d.arg_checks import check_floating, shape_error


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Advance the SSM state by one token, in place, and return the output.

    state: (b, d, n), updated in place;  x, dt, z: (b, d);  A: (d, n);  B, C: (b, n);
    D, dt_bias: (d,).
        dt = softplus(dt + dt_bias);  state = exp(dt * A) * state + dt * B * x
        out = sum_n state * C + D * x;  out = out * silu(z)
    Returns out (b, d) in x's dtype; computed in float32 (or float64).
    """
    check_floating(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    if state.dim() != 3:
        raise shape_error("state", "(batch, dim, dstate)", state)
    b, d, n = state.shape
    expected = {"x": (b, d), "dt": (b, d), "A": (d, n), "B": (b, n), "C": (b, n), "z": (b, d), "D": (d,),
                "dt_bias": (d,)}
    given = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "z": z, "D": D, "dt_bias": dt_bias}
    for name, shape in expected.items():
        if given[name] is not None and tuple(given[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for a state of shape {(b, d, n)}, "
                             f"got {tuple(given[name].shape)}")
    dtype = torch.promote_types(state.dtype, torch.float32)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    xf = x.to(dtype)
    new_state = torch.exp(dt[..., None] * A.to(dtype)) * state.to(dtype) \
        + (dt * xf)[..., None] * B.to(dtype)[:, None, :]
    state.copy_(new_state)
    out = (new_state * C.to(dtype)[:, None, :]).sum(-1)
    if D is not None:
        out = out + D.to(dtype) * xf
    if z is not None:
        out = out * F.silu(z.to(dtype))
    return out.to(x.dtype)
