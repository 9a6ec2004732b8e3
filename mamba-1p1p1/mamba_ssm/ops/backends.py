"""Which implementation runs a selective-scan-family call: the scan, the Mamba inner paths, Vim's
v2 mixer and the add + RMSNorm beside it. Built on `causal_conv1d.backends` (the backend names,
`use_backend`, the CUDA routing); this module adds the numba CPU kernels.

`resolve_scan` is the one decision. The function-level API calls it on every call, with this
thread's `use_backend` choice; `ops.kernel_sets.resolve_kernels` calls it once per model kernel
with the model's backend. Under "auto":
  - CUDA: `selective_scan_cuda` when it imports and SELECTIVE_SCAN_FORCE_FALLBACK is not true,
    else "torch" (warned once when the extension is missing);
  - CPU: a call that numba can take (inference, a supported shape and dtype) follows
    SELECTIVE_SCAN_CPU_BACKEND (`mamba_ssm.env`): "numba" when it says numba (an error if
    numba cannot run), or says auto (or is unset) and numba is installed; otherwise "torch".
    When numba is installed but its kernels cannot be loaded, "auto" runs "torch" with a
    one-time warning naming the cause. Other CPU calls (autograd, unsupported shapes) run "torch";
  - anything else (e.g. the meta device a checkpoint is loaded on) runs "torch".
An explicit choice that cannot run raises RuntimeError saying why; it never falls back.

The numba kernels come in two sets, loaded on first use and kept for the process:
  "fused" -- `bimamba_v2_numba`: Vim's fused v2 mixer and add + RMSNorm, loaded as machine code
             without importing numba;
  "scan"  -- `selective_scan_numba`: the selective scan alone (imports numba).
"""

import functools
import importlib.util

from causal_conv1d import backends
from causal_conv1d.backends import current_backend, device_type, route
from mamba_ssm import env

EXTENSION = "selective_scan_cuda"
NUMBA_SETS = ("fused", "scan")

_numba_errors = {}  # numba kernel set -> None or why it cannot run, once its loader ran


@functools.lru_cache(maxsize=None)
def numba_installed():
    """Whether numba can be imported (looked up once per process, without importing it)."""
    return importlib.util.find_spec("numba") is not None


def _load(kernels):
    try:
        if kernels == "fused":
            from mamba_ssm.ops import bimamba_v2_numba as module
        else:
            from mamba_ssm.ops import selective_scan_numba as module
    except Exception as error:  # a broken numba or llvmlite fails in many ways
        return f"numba failed to import: {type(error).__name__}: {error}".splitlines()[0]
    return module.load_error()


def numba_error(kernels):
    """None when the numba kernel set `kernels` (one of NUMBA_SETS) can run here, else why not (not
    installed, import or compile failure). Loads it on first use; the answer is kept."""
    if not numba_installed():
        return "numba is not installed (pip install numba)"
    if kernels not in NUMBA_SETS:
        raise ValueError(f"numba kernel sets: {', '.join(NUMBA_SETS)}; got {kernels!r}")
    if kernels not in _numba_errors:
        _numba_errors[kernels] = _load(kernels)
    return _numba_errors[kernels]


def resolve_scan(device, *, backend=None, needs_grad=False, numba_unsupported=None, numba_kernels="fused"):
    """The implementation ("ref", "torch", "numba" or "cuda") a selective-scan-family call runs.

    device: a device type ("cpu", "cuda", "meta"...); backend: one of BACKENDS (None: this thread's
    `use_backend` choice); needs_grad: the call records autograd (numba cannot); numba_unsupported:
    why the numba kernel cannot take the call's shapes or dtypes, or None; numba_kernels: the numba
    kernel set it would use (see NUMBA_SETS).
    Raises RuntimeError when an explicit choice cannot run, ValueError for an unknown backend or
    a bad SELECTIVE_SCAN_CPU_BACKEND.
    """
    backend = current_backend() if backend is None else backend
    backends.check_name(backend)
    routed = route(backend, device, module=EXTENSION, force_env=env.SCAN_FORCE_FALLBACK_ENV,
                   force_fallback=backend == "auto" and device == "cuda" and env.scan_force_fallback())
    if routed is not None:
        return routed
    if backend == "numba":
        return _explicit_numba(device, needs_grad, numba_unsupported, numba_kernels, "backend 'numba'")
    if device != "cpu":
        return "torch"
    setting = env.cpu_backend()
    if setting == "torch" or needs_grad or numba_unsupported:
        return "torch"  # the variable picks the kernel of the inference calls numba can take
    if setting == "numba":  # asked for by name: numba must be able to run
        return _explicit_numba(device, needs_grad, numba_unsupported, numba_kernels, f"{env.CPU_BACKEND_ENV}=numba")
    if not numba_installed():
        return "torch"
    error = numba_error(numba_kernels)
    if error is not None:
        backends.warn_once(numba_kernels, f"numba kernels unavailable ({error}); running the pure-PyTorch kernels")
        return "torch"
    return "numba"


def _explicit_numba(device, needs_grad, numba_unsupported, numba_kernels, via):
    if device != "cpu":
        raise RuntimeError(f"{via} runs on the CPU, got tensors on {device}; use backend 'auto'.")
    if needs_grad:
        raise RuntimeError(f"{via}: the numba kernels run inference only (no autograd); use backend "
                           f"'torch' or 'auto' for training, or run under torch.no_grad().")
    if numba_unsupported:
        raise RuntimeError(f"{via} cannot run this call: {numba_unsupported}; use backend 'torch' or 'auto'.")
    error = numba_error(numba_kernels)
    if error is not None:
        raise RuntimeError(f"{via}: {error}; use backend 'torch' or 'auto'.")
    return "numba"


def which_backend(x):
    """Name of the backend ("ref", "torch", "numba" or "cuda") a function-level inference call of
    the family on tensor `x` (a Vim mixer's, say) would use now."""
    return resolve_scan(device_type(x))


def backend_report(x):
    """What function-level calls on tensor `x` would use now, for logs: this thread's choice, the
    conv's and the scan family's implementation, SELECTIVE_SCAN_CPU_BACKEND and whether each CUDA
    extension imports. (A model's kernels: `mamba_ssm.kernel_report(model)`.)"""
    report = backends.backend_report(x)
    try:
        report["selective_scan"] = which_backend(x)
    except (RuntimeError, ValueError) as error:
        report["selective_scan"] = f"error: {error}"
    try:
        report["cpu_scan_setting"] = env.cpu_backend()
    except ValueError as error:
        report["cpu_scan_setting"] = f"error: {error}"
    report[f"{EXTENSION}_importable"] = backends.extension(EXTENSION) is not None
    return report
