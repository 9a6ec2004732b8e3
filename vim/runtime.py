"""Process-level tuning for CPU inference: thread count, glibc malloc thresholds, peak memory.

Used by infer_rpi.py and the benchmark, once per process, before the first forward.
"""

import ctypes
import logging
import os
import resource
import sys

import torch

__all__ = ["set_threads", "tune_malloc", "peak_rss_mb"]

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


def escape_unencodable_stdout() -> None:
    """Print what stdout's encoding cannot hold (e.g. a file name that is not valid UTF-8)
    backslash-escaped instead of failing with UnicodeEncodeError."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def check_common_args(parser, model_name, device_name):
    """The checks infer_rpi.py and main.py share, as usage errors (parser.error, exit 2): the
    model name, the SELECTIVE_SCAN_CPU_BACKEND setting, and the device (cpu, or cuda when
    available). Returns the torch.device."""
    import models_mamba
    from mamba_ssm.ops.selective_scan_fast import cpu_backend

    try:
        if model_name is not None:
            models_mamba.resolve_model_name(model_name)
        cpu_backend()
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))
    try:
        device = torch.device(device_name)
    except RuntimeError:
        parser.error(f"--device: {device_name!r} is not a device name; use cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (CPU-only torch or no GPU); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {device_name}: only cpu and cuda are supported")
    return device


def add_checkpoint_arguments(parser):
    """--ema and --trust-checkpoint, spelled and explained the same in every script."""
    parser.add_argument("--ema", action="store_true",
                        help="use the checkpoint's model_ema weights instead of model")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow the checkpoint to unpickle arbitrary Python objects; this can "
                             "run code, so only for files you trust")

