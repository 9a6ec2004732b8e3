"""Every environment variable mamba_ssm reads, in one module (`causal_conv1d.backends` reads the
conv's own CAUSAL_CONV1D_FORCE_FALLBACK).

They are read when a backend is resolved: on each call of the function-level API
(`selective_scan_fn`, `mamba_inner_fn`, `rms_norm_fn`...), and when a model resolves its kernels
(built, moved, loaded or told a backend: see `mamba_ssm.modules.backend_choice`), never during
a model's forward.

  SELECTIVE_SCAN_FORCE_FALLBACK  true/1/yes (any case): never upstream's `selective_scan_cuda`
      under backend "auto";
  SELECTIVE_SCAN_CPU_BACKEND  auto (default) | torch | numba: mamba_ssm's CPU inference kernels
      under backend "auto": the selective scan and the kernels built on it, Vim's fused v2 mixer
      and the block's add + RMSNorm that runs beside it (one switch: the fused mixer and norm
      come from one compiled module, `ops.bimamba_v2_numba`).
  NUMBA_CACHE_DIR  numba's own variable: where the compiled kernels are cached (alone; see
      `ops.kernel_cache`), read when the kernels are first loaded;
  XDG_CACHE_HOME  the user's cache directory [~/.cache], where they go otherwise.
"""

import os
import pathlib

from causal_conv1d.backends import is_true

SCAN_FORCE_FALLBACK_ENV = "SELECTIVE_SCAN_FORCE_FALLBACK"
CPU_BACKEND_ENV = "SELECTIVE_SCAN_CPU_BACKEND"
CPU_BACKENDS = ("auto", "torch", "numba")


def scan_force_fallback():
    """SELECTIVE_SCAN_FORCE_FALLBACK is true."""
    return is_true(os.environ.get(SCAN_FORCE_FALLBACK_ENV))


def cpu_backend():
    """SELECTIVE_SCAN_CPU_BACKEND as one of CPU_BACKENDS (unset or empty: "auto"); ValueError for
    another value."""
    value = os.environ.get(CPU_BACKEND_ENV, "").strip().lower() or "auto"
    if value not in CPU_BACKENDS:
        raise ValueError(f"{CPU_BACKEND_ENV} must be one of {', '.join(CPU_BACKENDS)}, got {value!r}")
    return value


def numba_cache_dir():
    """NUMBA_CACHE_DIR as a path, or None when it is unset or empty."""
    value = os.environ.get("NUMBA_CACHE_DIR")
    return pathlib.Path(value) if value else None


def user_cache_dir():
    """$XDG_CACHE_HOME, else ~/.cache. Raises RuntimeError or KeyError when there is no home
    directory (a service without HOME or a passwd entry)."""
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
