"""Kernel sets: the functions a model runs, chosen once for its backend, device, dtype and mode.

A module resolves its kernels when it is built, moved (`.to`, `.half`...), loaded or told a
backend (`mamba_ssm.modules.backend_choice`), and then calls what it holds: a forward decides
nothing and reads no environment variable. Each kernel's implementation comes from the one
decision of its family (`causal_conv1d.backends.resolve_conv`, `ops.backends.resolve_scan`),
made here once instead of on every call:

    kernel       signature                                    implementations
    conv         causal_conv1d_ref's (and `conv_update`)      ref, torch, cuda
    scan         selective_scan_ref's                         ref, torch, numba, cuda
    inner        inner_no_out_proj's without conv, scan       (the conv's and the scan's)
                 (the v1 / causal mixers)
    mixer        (xz, V2Weights, if_divide_out) -> y          torch (stacked), numba (fused),
                 (Vim's v2 mixer, `ops.bimamba_v2`)           ref and cuda (composed); composed
                                                              on every backend when not fused
    norm         rms_norm_fn's (add + RMSNorm)                torch (the formula), numba (fused)

Two modes: "inference" (autograd off: numba may run) and "autograd" (training, or any forward
with autograd on). A kernel an explicit backend cannot run raises RuntimeError with the reason
when the set is resolved; in the autograd set of the numba backend, whose kernels record no
autograd, such a kernel is kept as a `Refusal` that raises that reason when called.
"""

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from causal_conv1d.causal_conv1d_interface import conv_kernels
from mamba_ssm.ops import bimamba_v2
from mamba_ssm.ops.backends import resolve_scan
from mamba_ssm.ops.selective_scan_interface import SCAN_IMPLS, inner_no_out_proj, numba_unsupported
from mamba_ssm.ops import norms

KERNELS = ("mixer", "inner", "scan", "conv", "norm")  # resolved in this order: a mixer's report names come first
MODES = ("inference", "autograd")
_MIXERS = {"torch": bimamba_v2.bimamba_v2_fast, "numba": bimamba_v2.bimamba_v2_fused}
_NORMS = {"numba": norms.rms_norm_fused}


@dataclass(frozen=True)
class Refusal:
    """A kernel the backend cannot run in this mode: calling it raises RuntimeError(reason)."""

    reason: str

    def __call__(self, *args, **kwargs):
        raise RuntimeError(self.reason)


@dataclass(frozen=True)
class KernelSet:
    """The kernels of one module for one mode (see the module docstring for their signatures).

    backend: what was asked ("auto", "ref", ...); mode: "inference" or "autograd"; names:
    ((role, implementation), ...) for reports, where the roles are "conv", "scan", "mixer" and
    "norm" (a v2 mixer's conv and scan are what its implementation runs them on: the fused
    numba mixer runs both in numba); a kernel not asked for is None.
    `mixer_reads_stacked`: the v2 mixer reads `V2Weights.stacked` (torch and numba do).
    """

    backend: str
    mode: str
    names: tuple = ()
    conv: Optional[Callable] = None
    conv_update: Optional[Callable] = None
    scan: Optional[Callable] = None
    inner: Optional[Callable] = None
    mixer: Optional[Callable] = None
    norm: Optional[Callable] = None
    mixer_reads_stacked: bool = False


def resolve_kernels(backend, device, dtype, *, mode, needs, channels=None, uniform=True, fused_mixer=True):
    """The `KernelSet` of `needs` (kernels of KERNELS) for a module on `device` (a device type).

    dtype: the activations' dtype (a mixer's in_proj output, a norm's weight); uniform: every
    weight the kernels read has that dtype (the fused numba kernels read them raw); channels: the
    scan's channels per group of B/C (a mixer's d_inner), for the numba scan's constraint;
    fused_mixer: False runs the v2 mixer composed (upstream's unfused path) on any backend.
    Reads CAUSAL_CONV1D_FORCE_FALLBACK and mamba_ssm's variables (`mamba_ssm.env`) now.
    Raises RuntimeError when an explicit backend cannot run a needed kernel (inference mode),
    ValueError for an unknown backend or variable value.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    unknown = set(needs) - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; kernels: {', '.join(KERNELS)}")
    autograd = mode == "autograd"
    fused_unsupported = (None if dtype == torch.float32 and uniform
                         else "float32 activations and weights on the CPU only" if uniform
                         else f"{dtype} activations with weights of other dtypes (float32 on the CPU only)")

    def scan_name(kernels, unsupported):
        return resolve_scan(device, backend=backend, needs_grad=autograd, numba_unsupported=unsupported,
                            numba_kernels=kernels)

    names, kernels = {}, {}
    conv = conv_kernels(backend, device) if {"conv", "inner", "mixer"} & set(needs) else None
    for kernel in sorted(needs, key=KERNELS.index):
        try:
            if kernel == "conv":
                names.setdefault("conv", conv.name)
                kernels.update(conv=conv.fn, conv_update=conv.update)
            elif kernel in ("scan", "inner"):
                name = scan_name("scan", numba_unsupported(dtype, channels or 0))
                names.setdefault("scan", name)
                kernels["scan"] = SCAN_IMPLS[name]
                if kernel == "inner":
                    names.setdefault("conv", conv.name)
                    kernels["inner"] = functools.partial(inner_no_out_proj, conv.name, name)
            elif kernel == "mixer" and not fused_mixer:
                name = scan_name("scan", numba_unsupported(dtype, channels or 0))
                names.update(mixer=name, conv=conv.name, scan=name)
                kernels["mixer"] = functools.partial(bimamba_v2.bimamba_v2_composed, conv.name, name)
            elif kernel == "mixer":
                name = scan_name("fused", fused_unsupported)
                stacked = name in _MIXERS
                names.update(mixer=name, conv=name if stacked else conv.name, scan=name)
                kernels["mixer"] = _MIXERS[name] if stacked else functools.partial(bimamba_v2.bimamba_v2_composed,
                                                                                 conv.name, name)
                kernels["mixer_reads_stacked"] = stacked
            else:  # norm
                name = scan_name("fused", None if dtype == torch.float32 else "float32 only")
                names["norm"] = "numba" if name == "numba" else "torch"
                kernels["norm"] = _NORMS.get(name, norms.rms_norm_formula)
        except RuntimeError as error:
            if not (autograd and backend == "numba"):
                raise
            for refused in ("inner", "scan") if kernel == "inner" else (kernel,):
                names["scan" if refused == "inner" else refused] = "refused"
                kernels[refused] = Refusal(str(error))
    return KernelSet(backend=backend, mode=mode, names=tuple(names.items()), **kernels)
