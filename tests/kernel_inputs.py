"""Random inputs and small mixers for the kernel tests, fed both to the code under test and to the
float64 oracles (tests/oracles.py). Every builder takes a seed, so a test sees the same values on
every run."""

import torch

from mamba_ssm import Mamba

D_MODEL, D_STATE = 8, 4  # the default small mixer: d_inner 16, dt_rank 1


def make_conv_inputs(b, d, l, w, dtype=torch.float32, seed=0):
    """Standard normal conv inputs: x (b, d, l), weight (d, w), bias (d,), initial_states (b, d, w-1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, l, generator=gen, dtype=dtype)
    weight = torch.randn(d, w, generator=gen, dtype=dtype)
    bias = torch.randn(d, generator=gen, dtype=dtype)
    init = torch.randn(b, d, w - 1, generator=gen, dtype=dtype)
    return x, weight, bias, init


def make_scan_inputs(b, d, n, l, groups=None, dtype=torch.float32, seed=0):
    """Selective-scan inputs in realistic ranges (A < 0, delta around softplus's knee), as the
    keyword arguments of selective_scan_fn: u, delta, z (b, d, l); A (d, n); B, C (b, n, l), or
    (b, groups, n, l) when groups is given; D, delta_bias (d,)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    bc_shape = (b, n, l) if groups is None else (b, groups, n, l)
    inputs = dict(
        u=rand(b, d, l), delta=rand(b, d, l) * 0.5 - 1.0, A=-torch.exp(rand(d, n) * 0.5),
        B=rand(*bc_shape), C=rand(*bc_shape), D=rand(d), z=rand(b, d, l), delta_bias=rand(d) * 0.3)
    return {k: v.to(dtype) for k, v in inputs.items()}


def make_mixer(bimamba_type="v2", seed=0, dtype=torch.float32, d_model=D_MODEL, d_state=D_STATE, **kwargs):
    """A Mamba mixer (layer 0, in training mode) with every parameter perturbed by N(0, 0.2^2), so
    the two directions of a v2 mixer differ and no bias or D keeps its constant init. kwargs go to
    Mamba."""
    torch.manual_seed(seed)
    kwargs.setdefault("layer_idx", 0)
    m = Mamba(d_model, d_state=d_state, bimamba_type=bimamba_type, **kwargs)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.to(dtype)


def hidden_states(b=2, l=7, dtype=torch.float32, seed=1, d_model=D_MODEL):
    """A standard normal mixer input (b, l, d_model)."""
    return torch.randn(b, l, d_model, generator=torch.Generator().manual_seed(seed), dtype=dtype)
