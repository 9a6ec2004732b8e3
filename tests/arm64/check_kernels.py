"""Emulated Raspberry Pi checks: our kernels on aarch64 against float64 sequential references.

A small, fast subset of the kernel tests (emulation is a few hundred times slower than a CPU);
run by scripts/ci_arm64.sh, never by the x86 pytest run.
"""
import pytest
import torch

import causal_conv1d
import mamba_ssm
from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from mamba_ssm import Mamba
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn


def scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective-scan recurrence, one step at a time in float64.

    u, delta, z (b, d, l); A (d, n); B, C (b, n, l) or (b, g, n, l); D, delta_bias (d,).
    Returns y (b, d, l) and the last state (b, d, n).
    """
    u, delta, A = u.double(), delta.double(), A.double()
    b, d, l = u.shape
    B = (B[:, None] if B.dim() == 3 else B).double()
    C = (C[:, None] if C.dim() == 3 else C).double()
    B = B.repeat_interleave(d // B.shape[1], dim=1)  # (b, d, n, l)
    C = C.repeat_interleave(d // C.shape[1], dim=1)
    dt = delta if delta_bias is None else delta + delta_bias.double()[:, None]
    if delta_softplus:
        dt = torch.where(dt > 20, dt, torch.log1p(torch.exp(dt)))
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(l):
        step = dt[:, :, t, None]  # (b, d, 1)
        h = torch.exp(step * A) * h + step * B[..., t] * u[:, :, t, None]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * z.double() * torch.sigmoid(z.double())
    return y, h


def conv_reference(x, weight, bias=None, initial_states=None, activation=None):
    """Causal depthwise conv in float64: x (b, d, l), weight (d, w) -> (b, d, l), final (b, d, w-1)."""
    b, d, l = x.shape
    w = weight.shape[1]
    head = x.new_zeros(b, d, w - 1) if initial_states is None else initial_states
    xpad = torch.cat([head, x], dim=-1).double()
    out = torch.zeros(b, d, l, dtype=torch.float64)
    for t in range(l):
        out[:, :, t] = (xpad[:, :, t:t + w] * weight.double()).sum(-1)
    if bias is not None:
        out = out + bias.double()[:, None]
    if activation is not None:
        out = out * torch.sigmoid(out)
    return out, xpad[:, :, xpad.shape[-1] - (w - 1):]


SCAN_CASES = [
    # b, d, n, l, groups (None: B/C are (b, n, l)), D, z, delta_bias, softplus
    (2, 8, 4, 37, None, True, True, True, True),
    (1, 6, 3, 64, 2, False, False, False, False),
    (3, 4, 16, 9, 4, True, False, True, True),
]


@pytest.mark.parametrize("b, d, n, l, groups, use_d, use_z, use_bias, softplus", SCAN_CASES)
def test_selective_scan_matches_sequential_float64(b, d, n, l, groups, use_d, use_z, use_bias, softplus):
    gen = torch.Generator().manual_seed(b * 1000 + l)
    bc_shape = (b, n, l) if groups is None else (b, groups, n, l)
    u = torch.randn(b, d, l, generator=gen)
    delta = 0.5 * torch.rand(b, d, l, generator=gen)
    A = -torch.exp(torch.randn(d, n, generator=gen))
    B = torch.randn(bc_shape, generator=gen)
    C = torch.randn(bc_shape, generator=gen)
    D = torch.randn(d, generator=gen) if use_d else None
    z = torch.randn(b, d, l, generator=gen) if use_z else None
    delta_bias = torch.randn(d, generator=gen) if use_bias else None
    assert mamba_ssm.which_backend(u) in ("torch", "numba")
    y, last = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, softplus, return_last_state=True)
    y_ref, last_ref = scan_reference(u, delta, A, B, C, D, z, delta_bias, softplus)
    assert y.dtype == torch.float32 and y.shape == (b, d, l)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last.double(), last_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width, with_bias, with_initial, activation", [
    (4, True, False, "silu"),
    (2, False, True, None),
    (3, True, True, "swish"),
])
def test_causal_conv1d_matches_sequential_float64(width, with_bias, with_initial, activation):
    gen = torch.Generator().manual_seed(width)
    b, d, l = 2, 5, 23
    x = torch.randn(b, d, l, generator=gen)
    weight = torch.randn(d, width, generator=gen)
    bias = torch.randn(d, generator=gen) if with_bias else None
    initial = torch.randn(b, d, width - 1, generator=gen) if with_initial else None
    assert causal_conv1d.which_backend(x) == "torch"
    out, final = causal_conv1d_fn(x, weight, bias, initial_states=initial, return_final_states=True,
                                  activation=activation)
    out_ref, final_ref = conv_reference(x, weight, bias, initial, activation)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), final_ref)


def test_causal_conv1d_update_continues_the_sequence():
    gen = torch.Generator().manual_seed(7)
    b, d, w, l = 2, 4, 4, 10
    x = torch.randn(b, d, l, generator=gen)
    weight = torch.randn(d, w, generator=gen)
    bias = torch.randn(d, generator=gen)
    state = torch.zeros(b, d, w - 1)
    steps = [causal_conv1d_update(x[:, :, t], state, weight, bias, activation="silu") for t in range(l)]
    out_ref, final_ref = conv_reference(x, weight, bias, activation="silu")
    torch.testing.assert_close(torch.stack(steps, dim=-1).double(), out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.double(), final_ref)


def test_bidirectional_mamba_fast_path_matches_ref_path():
    torch.manual_seed(0)
    mixer = Mamba(d_model=16, d_state=8, bimamba_type="v2", if_divide_out=True).eval()
    hidden = torch.randn(2, 13, 16)
    with torch.no_grad():
        fast = mixer.set_backend("torch")(hidden)
        ref = mixer.set_backend("ref")(hidden)
    assert fast.shape == hidden.shape
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
