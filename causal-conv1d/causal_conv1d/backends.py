"""Which implementation runs a kernel call: the one backend module of `causal_conv1d` and
`mamba_ssm` (it lives here, in the lower package, so both can use it).

Backend names, a closed set:
  "auto"  -- the default: each call gets the best implementation that can run it (below);
  "ref"   -- the sequential pure-PyTorch reference kernels (slow, obviously correct);
  "torch" -- the fast pure-PyTorch kernels;
  "numba" -- compiled numba kernels for CPU inference: the selective scan and Vim's v2 mixer.
             Ops without a numba kernel (the causal conv) run their torch kernel;
  "cuda"  -- upstream's compiled extensions (`causal_conv1d_cuda`, `selective_scan_cuda`).

Ops come in two families, each with its FORCE_FALLBACK variable and CUDA extension:
"causal_conv1d" and "selective_scan" (the scan and the Mamba paths built on it).

"auto" resolves per call:
  - a CUDA tensor goes to the family's extension when it imports and the family's
    FORCE_FALLBACK variable is not true, else to "torch" (with a one-time warning when the
    extension is missing and nothing asked for the fallback: silent slowness is a bug);
  - a CPU selective-scan call that numba can take (inference, a supported shape and dtype)
    follows SELECTIVE_SCAN_CPU_BACKEND: "numba" when it says numba (an error if numba cannot
    run), or says auto (or is unset) and numba is installed; otherwise "torch". When numba is
    installed but its kernels cannot be loaded, "auto" runs "torch" with a one-time warning
    naming the cause. Other CPU scan calls (autograd, unsupported shapes) run "torch";
  - everything else runs "torch".
An explicit choice (`use_backend`) that cannot run a call raises a RuntimeError saying why;
it never falls back silently.

This module is the only place that reads the environment, on every call:
  CAUSAL_CONV1D_FORCE_FALLBACK, SELECTIVE_SCAN_FORCE_FALLBACK  true/1/yes (any case): never the
      family's CUDA extension under "auto";
  SELECTIVE_SCAN_CPU_BACKEND  auto (default) | torch | numba: the CPU inference kernels (the
      selective scan, Vim's fused mixer and add + RMSNorm) under "auto".
"""

import functools
import importlib
import importlib.util
import os
import sys
import threading
import warnings
from contextlib import contextmanager

BACKENDS = ("auto", "ref", "torch", "numba", "cuda")
FAMILIES = {
    # family -> (FORCE_FALLBACK variable, upstream's compiled module)
    "causal_conv1d": ("CAUSAL_CONV1D_FORCE_FALLBACK", "causal_conv1d_cuda"),
    "selective_scan": ("SELECTIVE_SCAN_FORCE_FALLBACK", "selective_scan_cuda"),
}
CPU_BACKEND_ENV = "SELECTIVE_SCAN_CPU_BACKEND"
CPU_BACKENDS = ("auto", "torch", "numba")
_TRUE_VALUES = ("true", "1", "yes")

_local = threading.local()  # the use_backend override, per thread
_failed_imports = set()  # extensions whose import raised once: not retried
_warned = set()  # one-time warnings already given
_numba_loader = None  # set by mamba_ssm: loader(kernels) loads a set of numba kernels, returns None or why not
_numba_errors = {}  # kernel set -> the loader's answer, once it ran


def env_flag(name):
    """True when environment variable `name` is true/1/yes in any case; anything else is false."""
    return os.environ.get(name, "").strip().lower() in _TRUE_VALUES


def _check_name(name, allowed=BACKENDS):
    if name not in allowed:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(allowed)}")


@contextmanager
def use_backend(name):
    """Run the calls of this thread inside the `with` block on backend `name` (one of BACKENDS;
    "auto" undoes an outer choice). The previous choice is restored on exit."""
    _check_name(name)
    previous = getattr(_local, "name", "auto")
    _local.name = name
    try:
        yield
    finally:
        _local.name = previous


def current_backend():
    """The backend chosen for this thread: a use_backend name, or "auto"."""
    return getattr(_local, "name", "auto")


def extension(family):
    """Upstream's compiled module of `family`, or None. The import is attempted once; a module
    placed in sys.modules later (e.g. a test double) is still found."""
    name = FAMILIES[family][1]
    module = sys.modules.get(name)
    if module is not None or name in _failed_imports:
        return module
    try:
        return importlib.import_module(name)
    except Exception:  # a broken CUDA build raises OSError/RuntimeError, not only ImportError
        _failed_imports.add(name)
        return None


def cpu_scan_setting():
    """SELECTIVE_SCAN_CPU_BACKEND as one of CPU_BACKENDS (unset or empty: "auto")."""
    value = os.environ.get(CPU_BACKEND_ENV, "").strip().lower() or "auto"
    if value not in CPU_BACKENDS:
        raise ValueError(f"{CPU_BACKEND_ENV} must be one of {', '.join(CPU_BACKENDS)}, got {value!r}")
    return value


def set_numba_loader(loader):
    """Register the function that loads a set of numba kernels (mamba_ssm does, at import):
    loader(kernels) returns None when they load, else a one-line reason. It runs at the first
    call that wants that set. The sets: "mixer" (Vim's fused v2 mixer and add + RMSNorm, loaded
    as machine code without importing numba) and "scan" (the selective scan, which imports numba)."""
    global _numba_loader
    _numba_loader = loader


@functools.lru_cache(maxsize=None)
def numba_installed():
    """Whether numba can be imported (looked up once per process, without importing it: resolve
    runs on every kernel call)."""
    return importlib.util.find_spec("numba") is not None


def numba_error(kernels="mixer"):
    """None when the numba kernel set `kernels` can run here, else why not (not installed, import
    or compile failure). Loads it on first use; the answer is kept for the process."""
    if not numba_installed():
        return "numba is not installed (pip install numba)"
    if _numba_loader is None:
        return "no numba kernels are registered (import mamba_ssm)"
    if kernels not in _numba_errors:
        _numba_errors[kernels] = _numba_loader(kernels)
    return _numba_errors[kernels]


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(family, x, *, needs_grad=False, numba_unsupported=None, numba_kernels="mixer"):
    """The backend a call of `family` on tensor `x` runs on now: "ref", "torch", "numba" or "cuda".

    needs_grad: the call must record autograd (the numba kernels cannot).
    numba_unsupported: why the numba kernel cannot take this call's shapes/dtypes, or None.
    numba_kernels: the numba kernel set the call would use ("mixer" or "scan", see set_numba_loader).
    Raises RuntimeError when an explicit choice cannot run the call, ValueError for a bad
    SELECTIVE_SCAN_CPU_BACKEND value.
    """
    name = current_backend()
    if name in ("ref", "torch"):
        return name
    if name == "cuda":
        return _explicit_cuda(family, x)
    if name == "numba":
        return _explicit_numba(family, x, needs_grad, numba_unsupported, numba_kernels)
    force_env, module = FAMILIES[family]
    if x.is_cuda:
        if env_flag(force_env):
            return "torch"
        if extension(family) is not None:
            return "cuda"
        _warn_once(module, f"{module} is not installed: CUDA tensors are processed by the pure-PyTorch "
                           f"fallback, which is much slower. Install upstream's CUDA build, or set "
                           f"{force_env}=TRUE to silence this warning.")
        return "torch"
    if family != "selective_scan" or x.device.type != "cpu":
        return "torch"
    setting = cpu_scan_setting()
    if setting == "torch":
        return "torch"
    if needs_grad or numba_unsupported:
        return "torch"  # the variable picks the kernel of the inference calls numba can take
    if setting == "numba":  # asked for by name: numba must be able to run
        return _explicit_numba(family, x, needs_grad, numba_unsupported, numba_kernels,
                               via=f"{CPU_BACKEND_ENV}=numba")
    if not numba_installed():
        return "torch"
    error = numba_error(numba_kernels)
    if error is not None:
        _warn_once(numba_kernels, f"numba kernels unavailable ({error}); running the pure-PyTorch kernels")
        return "torch"
    return "numba"


def _explicit_cuda(family, x):
    module = FAMILIES[family][1]
    if extension(family) is None:
        raise RuntimeError(f"backend 'cuda' needs upstream's compiled module {module}, which does not import "
                           f"here; install upstream's CUDA build or use backend 'torch'.")
    if not x.is_cuda:
        raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got a tensor on {x.device}.")
    return "cuda"


def _explicit_numba(family, x, needs_grad, numba_unsupported, numba_kernels, via="backend 'numba'"):
    if family != "selective_scan":
        return "torch"  # no numba kernel for this op: its torch kernel is part of the numba path
    if x.is_cuda or x.device.type != "cpu":
        raise RuntimeError(f"{via} runs on the CPU, got a tensor on {x.device}; use backend 'auto'.")
    if needs_grad:
        raise RuntimeError(f"{via}: the numba kernels run inference only (no autograd); use backend "
                           f"'torch' or 'auto' for training, or run under torch.no_grad().")
    if numba_unsupported:
        raise RuntimeError(f"{via} cannot run this call: {numba_unsupported}; use backend 'torch' or 'auto'.")
    error = numba_error(numba_kernels)
    if error is not None:
        raise RuntimeError(f"{via}: {error}; use backend 'torch' or 'auto'.")
    return "numba"


def backend_report(x):
    """What calls on tensor `x` would use now, for logs and CLI reports ("selective_scan": what a
    Vim mixer runs on)."""
    report = {"backend": current_backend()}
    for family in FAMILIES:
        try:
            report[family] = resolve(family, x)
        except (RuntimeError, ValueError) as error:
            report[family] = f"error: {error}"
    try:
        report["cpu_scan_setting"] = cpu_scan_setting()
    except ValueError as error:
        report["cpu_scan_setting"] = f"error: {error}"
    for family, (_, module) in FAMILIES.items():
        report[f"{module}_importable"] = extension(family) is not None
    return report
