"""How a model learns its kernels: chosen once per module, held, and called.

A module that runs kernels (`Mamba`, `RMSNorm`) is a `KernelHolder`. It resolves its kernels
(`ops.kernel_sets.resolve_kernels`: one set for inference, one for autograd) for its backend,
device and dtype when it is
  - built (backend "auto"),
  - moved or cast (`.to`, `.cuda`, `.half`... all go through `nn.Module._apply`),
  - loaded (`load_state_dict`, also with assign=True from the meta device), copied or unpickled,
  - told a backend: `set_backend(model, name)`, or `model.set_backend(name)` on a holder or a
    Vision Mamba, which tells every holder inside.
The environment variables (`mamba_ssm.env`, CAUSAL_CONV1D_FORCE_FALLBACK) are read then, and an
explicit backend that cannot run raises RuntimeError with the reason then. A forward only picks
the set it holds for the grad mode: the inference set when autograd is off (no_grad,
inference_mode), else the autograd set; it resolves nothing and reads no variable.

`causal_conv1d.use_backend(name)` is the thread's choice for the function-level API; it does not
reach a model's held kernels, so a model run inside a block that chose another backend raises
RuntimeError (tell the model with `set_backend` instead) rather than ignore the choice.
"""

from dataclasses import dataclass

import torch

from causal_conv1d.backends import EXTENSION as CONV_EXTENSION
from causal_conv1d.backends import check_name, current_backend, extension
from mamba_ssm import env
from mamba_ssm.ops.backends import EXTENSION as SCAN_EXTENSION
from mamba_ssm.ops.kernel_sets import KernelSet, resolve_kernels

__all__ = ["KernelHolder", "set_backend", "kernel_report"]

# kernel-set role -> the key `kernel_report` gives it
_REPORT_KEYS = {"scan": "selective_scan", "conv": "causal_conv1d", "mixer": "mixer", "norm": "rms_norm"}


@dataclass(frozen=True)
class KernelPair:
    """What a holder runs: the backend it was told and its kernel set per mode."""

    backend: str
    inference: KernelSet
    autograd: KernelSet


def _reload_kernels(module, incompatible_keys):
    """load_state_dict post-hook: assigned tensors may come from another device or dtype."""
    module.refresh_kernels()


class KernelHolder:
    """Mixin (before nn.Module) for modules that run kernels. A subclass defines
    `_kernel_request()` -> dict(device (type), dtype, needs, and optionally channels, uniform) for
    `resolve_kernels`, calls `_init_kernels()` at the end of __init__, and may override
    `_kernels_changed()` (called after each resolution and after train()/eval())."""

    _backend = "auto"

    def _init_kernels(self):
        self.register_load_state_dict_post_hook(_reload_kernels)
        self.refresh_kernels()

    def _resolve(self, backend):
        request = self._kernel_request()
        return KernelPair(backend, resolve_kernels(backend, mode="inference", **request),
                          resolve_kernels(backend, mode="autograd", **request))

    def refresh_kernels(self):
        """Resolve this module's kernels again for its current backend, device and dtype (done for
        you at the events in the module docstring; call it after changing an environment variable)."""
        self._kernels = self._resolve(self._backend)
        self._kernels_changed()

    def _kernels_changed(self):
        pass

    def set_backend(self, name):
        """`set_backend(self, name)`; returns self."""
        return set_backend(self, name)

    def kernels_for_call(self):
        """The `KernelSet` of this forward: inference when autograd is off, else autograd. Raises
        RuntimeError inside a `use_backend` block that chose another backend than this module's."""
        chosen = current_backend()
        if chosen != "auto" and chosen != self._backend:
            raise RuntimeError(f"use_backend({chosen!r}) chooses for function calls; this {type(self).__name__} "
                               f"holds kernels of backend {self._backend!r}: call model.set_backend({chosen!r})")
        pair = self._kernels
        return pair.autograd if torch.is_grad_enabled() else pair.inference

    def train(self, mode=True):
        out = super().train(mode)
        self._kernels_changed()
        return out

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.refresh_kernels()
        return out

    def __getstate__(self):
        state = super().__getstate__()  # a copy
        state.pop("_kernels", None)  # functions chosen for this machine: resolved again on load
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.refresh_kernels()


def set_backend(model, name):
    """Run backend `name` (one of `causal_conv1d.backends.BACKENDS`) in every `KernelHolder` of
    `model` (any nn.Module): their kernels are resolved now, for each one's device and dtype.
    Returns model. Raises ValueError for an unknown name, RuntimeError (nothing changed) when the
    backend cannot run a kernel a module needs here, e.g. "numba" without numba or for a float64
    model (the numba kernels' refusal of autograd is raised by a forward that records it)."""
    check_name(name)
    holders = [m for m in model.modules() if isinstance(m, KernelHolder)]
    pairs = [m._resolve(name) for m in holders]
    for module, pair in zip(holders, pairs):
        module._backend, module._kernels = name, pair
        module._kernels_changed()
    return model


def kernel_report(model, mode="inference"):
    """Which kernels `model`'s forwards run in `mode` ("inference" or "autograd"), for logs and
    CLI reports: {"backend", "selective_scan", "causal_conv1d", "mixer" (Vim's v2 mixer),
    "rms_norm"} as implementation names ("ref", "torch", "numba", "cuda"; several joined by "+"),
    a key only when some module runs that kernel; plus SELECTIVE_SCAN_CPU_BACKEND and whether
    each CUDA extension imports. The conv of a fused numba v2 mixer runs in numba."""
    chosen, roles = set(), {}
    for module in model.modules():
        if isinstance(module, KernelHolder):
            chosen.add(module._backend)
            for role, name in getattr(module._kernels, mode).names:
                roles.setdefault(role, set()).add(name)
    report = {"backend": "+".join(sorted(chosen)) or "auto"}
    report.update({key: "+".join(sorted(roles[role])) for role, key in _REPORT_KEYS.items() if role in roles})
    try:
        report["cpu_scan_setting"] = env.cpu_backend()
    except ValueError as error:
        report["cpu_scan_setting"] = f"error: {error}"
    for name in (CONV_EXTENSION, SCAN_EXTENSION):
        report[f"{name}_importable"] = extension(name) is not None
    return report
