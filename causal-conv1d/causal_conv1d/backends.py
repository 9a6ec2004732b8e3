"""Choosing, per call, which implementation runs an op.

Backend names form one closed set:
  "cuda" -- upstream's compiled extension (only for CUDA tensors, only when it is importable);
  "fast" -- the pure-PyTorch kernels built for speed (what every CPU uses);
  "ref"  -- the plain sequential pure-PyTorch kernels (slow, obviously correct).

The choice is made at call time, never at import time:
  1. a `use(name)` context manager, if active, wins (an unavailable choice is an error);
  2. the package's FORCE_FALLBACK environment variable, read on every call, means "fast";
  3. CUDA tensors go to the extension when it imports, otherwise to "fast" with a one-time
     warning (silent slowness is a bug);
  4. everything else is "fast".

The same mechanism serves `causal_conv1d` and `mamba_ssm` (each with its own variable and
extension), so it lives here, in the lower layer.
"""

import importlib
import os
import sys
import threading
import warnings
from contextlib import contextmanager

BACKENDS = ("cuda", "fast", "ref")
_TRUE_VALUES = ("true", "1", "yes")


def env_flag(name):
    """True when environment variable `name` is true/1/yes in any case; anything else is false."""
    return os.environ.get(name, "").strip().lower() in _TRUE_VALUES


class BackendSwitch:
    """Backend selection for one package.

    Args:
        force_env: name of the FORCE_FALLBACK environment variable.
        extension: top-level module name of upstream's compiled CUDA extension.
    """

    def __init__(self, force_env, extension):
        self.force_env = force_env
        self.extension_name = extension
        self._import_failed = False
        self._warned_cuda_fallback = False
        self._local = threading.local()

    def extension(self):
        """The compiled extension module, or None. Import is attempted once; a module placed in
        sys.modules later (e.g. by tests) is still found."""
        module = sys.modules.get(self.extension_name)
        if module is not None or self._import_failed:
            return module
        try:
            return importlib.import_module(self.extension_name)
        except Exception:  # a broken CUDA build raises OSError/RuntimeError, not only ImportError
            self._import_failed = True
            return None

    def forced_fallback(self):
        return env_flag(self.force_env)

    def override(self):
        return getattr(self._local, "name", None)

    def which(self, x):
        """Name of the backend a call on tensor `x` would use now."""
        name = self.override()
        if name is not None:
            if name == "cuda":
                self._require_cuda(x)
            return name
        if self.forced_fallback():
            return "fast"
        if x.is_cuda:
            if self.extension() is not None:
                return "cuda"
            if not self._warned_cuda_fallback:
                self._warned_cuda_fallback = True
                warnings.warn(
                    f"{self.extension_name} is not installed: CUDA tensors are processed by the "
                    f"pure-PyTorch fallback, which is much slower. Install upstream's CUDA build, or "
                    f"set {self.force_env}=TRUE to silence this warning.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return "fast"

    def _require_cuda(self, x):
        if self.extension() is None:
            raise RuntimeError(
                f"backend 'cuda' needs upstream's compiled module {self.extension_name}, which does "
                f"not import here; install upstream's CUDA build or use backend 'fast'."
            )
        if not x.is_cuda:
            raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got a tensor on {x.device}.")

    @contextmanager
    def use(self, name):
        """Force backend `name` ("cuda", "fast" or "ref") inside a `with` block (this thread only);
        the previous choice is restored on exit."""
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
        previous = self.override()
        self._local.name = name
        try:
            yield
        finally:
            self._local.name = previous
