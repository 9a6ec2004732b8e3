"""Process-level tuning for CPU inference: thread count, glibc malloc thresholds, peak memory.

Used by the classifier (`vim_rpi.Classifier`) and the benchmark, once per process, before the
first forward.
"""

import ctypes
import logging
import os
import resource
import sys

import torch

from mamba_ssm.ops.kernel_sets import resolve_kernels
from vim_rpi.errors import ConfigError

__all__ = ["set_threads", "tune_malloc", "peak_rss_mb", "check_device", "check_backend"]

_log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit (HEAP_MAX_SIZE / 2); larger values are refused.
_MMAP_THRESHOLD_BYTES = 32 << 20
_TRIM_THRESHOLD_BYTES = 128 << 20
# Set by the user, these environment variables win over tune_malloc().
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def set_threads(n: int) -> None:
    """Use `n` (>= 1) intra-op threads for torch on the CPU."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"thread count must be an integer >= 1, got {n!r}")
    torch.set_num_threads(n)


def tune_malloc() -> bool:
    """Keep freed big blocks inside the process instead of handing them back to the OS.

    By default glibc serves blocks above its mmap threshold with fresh mmap()s and unmaps
    them on free, and trims the heap top above the trim threshold. A forward pass allocates
    and frees the same multi-MB temporaries on every call, so each call page-faults them in
    again (tens of thousands of minor faults per image). Raising both thresholds lets the
    memory be reused; peak RSS stays the same because the working set is needed anyway.

    Returns True when the thresholds were changed; False (no-op) on non-glibc platforms or
    when the user already tunes malloc through the environment.
    """
    if any(var in os.environ for var in _MALLOC_ENV):
        _log.debug("malloc tuned through the environment; leaving it alone")
        return False
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        _log.debug("not glibc: malloc thresholds left unchanged")
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1 and ok
    if not ok:
        _log.debug("mallopt refused the thresholds")
    return ok


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (what ps and top call MB).

    Linux: VmHWM from /proc/self/status, because ru_maxrss of a process started by a large
    parent can start at the parent's size. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def check_device(name) -> torch.device:
    """The torch.device for `name` if it can run here (cpu, or cuda with a GPU), else a ConfigError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: {name!r} is not a device name; use cpu") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available here (CPU-only torch or no GPU); use --device cpu")
    return device


def check_backend(backend, device) -> None:
    """A ConfigError unless kernel backend `backend` can run a float32 Vim model's inference kernels
    on `device` here (an unknown name, an unavailable extension or numba, a CUDA backend for the
    CPU, a bad SELECTIVE_SCAN_CPU_BACKEND): the check a front end makes before loading anything;
    the model's own `set_backend` decides with the same resolver. Loads the numba kernels when
    they will be used."""
    try:
        resolve_kernels(backend, torch.device(device).type, torch.float32, mode="inference", needs=("mixer", "norm"))
    except (RuntimeError, ValueError) as error:
        raise ConfigError(str(error)) from None
