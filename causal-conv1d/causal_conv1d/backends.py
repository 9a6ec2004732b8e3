"""Which implementation runs a causal-conv1d call, and the calling thread's backend choice.

Backend names, a closed set that packages built on this one share:
  "auto"  -- the default: the best implementation that can run (below);
  "ref"   -- the sequential pure-PyTorch reference kernels (slow, obviously correct);
  "torch" -- the fast pure-PyTorch kernels;
  "numba" -- compiled numba CPU kernels, for the ops that have them; the causal conv has none,
             so under "numba" it runs its torch kernel;
  "cuda"  -- upstream's compiled CUDA extension (here `causal_conv1d_cuda`).

Two ways to choose, for two kinds of callers:
  - the function-level API (`causal_conv1d_fn`, `causal_conv1d_update`) resolves on every call,
    as upstream's does: `use_backend(name)` sets the choice of the calling thread for the calls
    inside its `with` block;
  - a model resolves once, for its device (`conv_kernels` in `causal_conv1d_interface`), when it
    is built, moved or told a backend, and then calls what it holds.
Both go through `resolve_conv` (the one decision) and `route` (the CUDA part every op family
shares). Under "auto": a CUDA tensor goes to the extension when it imports and the family's
FORCE_FALLBACK variable is not true, else to "torch", with a one-time warning when the extension
is missing and nothing asked for the fallback (silent slowness is a bug); everything else runs
"torch". An explicit choice that cannot run raises RuntimeError saying why; it never falls back.

This is the only module of causal_conv1d that reads the environment, when a backend is resolved
(each function-level call; each kernel resolution of a model):
  CAUSAL_CONV1D_FORCE_FALLBACK  true/1/yes (any case): never `causal_conv1d_cuda` under "auto".
"""

import importlib
import os
import sys
import threading
import warnings
from contextlib import contextmanager

BACKENDS = ("auto", "ref", "torch", "numba", "cuda")
FORCE_FALLBACK_ENV = "CAUSAL_CONV1D_FORCE_FALLBACK"
EXTENSION = "causal_conv1d_cuda"
_TRUE_VALUES = ("true", "1", "yes")

_local = threading.local()  # the use_backend choice, per thread
_failed_imports = set()  # extensions whose import raised once: not retried
_warned = set()  # one-time warnings already given


def is_true(value):
    """Whether an environment variable's text means true: true/1/yes in any case, spaces ignored."""
    return (value or "").strip().lower() in _TRUE_VALUES


def check_name(name):
    """ValueError unless `name` is one of BACKENDS."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")


@contextmanager
def use_backend(name):
    """Run the function-level calls of this thread inside the `with` block on backend `name` (one
    of BACKENDS; "auto" undoes an outer choice); the previous choice is restored on exit. Models
    keep the kernels they resolved: tell them with their `set_backend` (a model run inside a block
    that chose another backend raises instead of ignoring the choice)."""
    check_name(name)
    previous = getattr(_local, "name", "auto")
    _local.name = name
    try:
        yield
    finally:
        _local.name = previous


def current_backend():
    """The backend chosen for this thread: a use_backend name, or "auto"."""
    return getattr(_local, "name", "auto")


def extension(name):
    """Upstream's compiled module `name`, or None. The import is attempted once; a module placed in
    sys.modules later (e.g. a test double) is still found."""
    module = sys.modules.get(name)
    if module is not None or name in _failed_imports:
        return module
    try:
        return importlib.import_module(name)
    except Exception:  # a broken CUDA build raises OSError/RuntimeError, not only ImportError
        _failed_imports.add(name)
        return None


def warn_once(key, message):
    """A RuntimeWarning with `message`, the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def device_type(x):
    """The device type a backend decision sees for tensor `x` ("cuda" when x.is_cuda)."""
    return "cuda" if x.is_cuda else x.device.type


def route(backend, device, *, module, force_env, force_fallback):
    """The part of a backend decision every op family shares: "ref", "torch" or "cuda", or None
    when the family decides itself ("numba", or "auto" off CUDA).

    backend: one of BACKENDS; device: a device type ("cpu", "cuda", "meta"...); module: the family's
    CUDA extension; force_env / force_fallback: its FORCE_FALLBACK variable's name and value.
    Raises RuntimeError when an explicit "cuda" cannot run.
    """
    if backend in ("ref", "torch"):
        return backend
    if backend == "cuda":
        if extension(module) is None:
            raise RuntimeError(f"backend 'cuda' needs upstream's compiled module {module}, which does not import "
                               f"here; install upstream's CUDA build or use backend 'torch'.")
        if device != "cuda":
            raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}.")
        return "cuda"
    if backend == "auto" and device == "cuda":
        if force_fallback:
            return "torch"
        if extension(module) is not None:
            return "cuda"
        warn_once(module, f"{module} is not installed: CUDA tensors are processed by the pure-PyTorch fallback, "
                          f"which is much slower. Install upstream's CUDA build, or set {force_env}=TRUE to "
                          f"silence this warning.")
        return "torch"
    return None


def resolve_conv(device, backend=None):
    """The implementation ("ref", "torch" or "cuda") a causal conv on `device` (a device type) runs
    under `backend` (None: this thread's choice). Raises RuntimeError when an explicit choice
    cannot run."""
    backend = current_backend() if backend is None else backend
    check_name(backend)
    force = backend == "auto" and device == "cuda" and is_true(os.environ.get(FORCE_FALLBACK_ENV))
    name = route(backend, device, module=EXTENSION, force_env=FORCE_FALLBACK_ENV, force_fallback=force)
    return name or "torch"  # no numba conv kernel: its torch kernel is part of the numba path


def backend_report(x):
    """What a function-level conv call on tensor `x` would use now, for logs: the thread's choice,
    the implementation, and whether the extension imports."""
    report = {"backend": current_backend()}
    try:
        report["causal_conv1d"] = resolve_conv(device_type(x))
    except RuntimeError as error:
        report["causal_conv1d"] = f"error: {error}"
    report[f"{EXTENSION}_importable"] = extension(EXTENSION) is not None
    return report
