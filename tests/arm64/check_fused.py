"""Emulated Raspberry Pi checks: the fused numba kernels of the v2 mixer against float64.

aarch64 numba compiles the kernels for the emulated CPU (Pi 4: cortex-a72, Pi 5: cortex-a76),
llvmlite loads the object (its memory manager keeps AArch64's relocations in range) and torch's
OpenMP team runs them. Small shapes; run by scripts/ci_arm64.sh, never by the x86 pytest run.
"""
import pytest
import torch

from check_kernels import conv_reference, scan_reference
from mamba_ssm import Mamba
from mamba_ssm.env import CPU_BACKEND_ENV
from mamba_ssm.ops import bimamba_v2_numba as fused


def mixer_reference(mixer, hidden):
    """float64 v2 mixer from the module's parameters: hidden (b, l, d_model) -> (b, l, d_model)."""
    p = {k: v.double() for k, v in mixer.state_dict().items()}
    x, z = (hidden.double() @ p["in_proj.weight"].T).transpose(1, 2).chunk(2, dim=1)  # (b, d, l) each

    def direction(x, z, s):
        xc, _ = conv_reference(x, p[f"conv1d{s}.weight"][:, 0], p[f"conv1d{s}.bias"], activation="silu")
        r, n = p[f"dt_proj{s}.weight"].shape[1], p[f"A{s}_log"].shape[1]
        x_dbl = torch.einsum("bdl,ed->bel", xc, p[f"x_proj{s}.weight"])  # (b, r + 2n, l)
        delta = torch.einsum("brl,dr->bdl", x_dbl[:, :r], p[f"dt_proj{s}.weight"])
        y, _ = scan_reference(xc, delta, -torch.exp(p[f"A{s}_log"]), x_dbl[:, r:r + n], x_dbl[:, r + n:],
                              p[f"D{s}"], z, p[f"dt_proj{s}.bias"], delta_softplus=True)
        return y

    y = (direction(x, z, "") + direction(x.flip(-1), z.flip(-1), "_b").flip(-1)) / 2
    return y.transpose(1, 2) @ p["out_proj.weight"].T


@pytest.mark.parametrize("b, l, d_model, d_state, threads", [
    (2, 13, 16, 8, 1),
    (1, 3, 24, 4, 2),  # fewer tokens than the conv width, d_inner 48 (a partial channel block)
    (3, 20, 64, 16, 4),  # Vim's state size, batch rows split over the Pi's four cores
])
def test_fused_mixer_matches_float64(monkeypatch, b, l, d_model, d_state, threads):
    assert fused.load_error() is None
    assert fused._kernels().openmp is not None  # found torch's OpenMP runtime: parallel on its threads
    calls = []
    real = fused.bimamba_v2_numba
    monkeypatch.setattr(fused, "bimamba_v2_numba", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setenv(CPU_BACKEND_ENV, "numba")
    torch.manual_seed(b * 100 + l)
    mixer = Mamba(d_model, d_state=d_state, bimamba_type="v2", if_divide_out=True).eval()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    hidden = torch.randn(b, l, d_model)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = mixer(hidden)
    finally:
        torch.set_num_threads(old)
    assert len(calls) == 1
    want = mixer_reference(mixer, hidden)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() <= 1e-4
