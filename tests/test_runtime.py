"""runtime: thread count validation, malloc tuning measured by page faults, peak RSS."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from vim_rpi import runtime

VIM_DIR = pathlib.Path(runtime.__file__).resolve().parent


def test_set_threads():
    before = torch.get_num_threads()
    try:
        runtime.set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(ValueError, match=">= 1"):
            runtime.set_threads(bad)


def _proc_status_mib(field):
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # the kernel reports kB (KiB)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_rss_mb_tracks_a_big_allocation():
    before = _proc_status_mib("VmRSS")
    block = bytearray(200 * 2**20)  # zero-filled by CPython, so every page is touched
    peak = runtime.peak_rss_mb()
    assert peak >= before + 190
    assert abs(peak - _proc_status_mib("VmHWM")) < 2
    del block


_FAULTS_SCRIPT = """
import ctypes, resource
from vim_rpi import runtime

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)

def step(size):
    # Several multi-MB temporaries alive at once, then freed: a forward pass's pattern.
    blocks = [libc.malloc(size) for _ in range(8)]
    for block in blocks:
        libc.memset(block, 1, size)
    for block in reversed(blocks):
        libc.free(block)

def faults_per_step(size, n=5):
    step(size)
    step(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        step(size)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n

plain = faults_per_step(4 << 20)
print(runtime.tune_malloc(), plain, faults_per_step(4 << 20))
"""


@pytest.mark.skipif("CS_GNU_LIBC_VERSION" not in getattr(os, "confstr_names", {}),
                    reason="malloc tuning is glibc-only")
def test_tune_malloc_removes_page_faults_of_repeated_temporaries():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env["PYTHONPATH"] = str(VIM_DIR)
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    tuned, plain, after = out[0], float(out[1]), float(out[2])
    assert tuned == "True"
    pages = 8 * (4 << 20) / os.sysconf("SC_PAGESIZE")
    # By default glibc trims the freed 32 MB off the heap and faults every page in again.
    assert plain > 0.9 * pages
    assert after < 0.01 * pages


def test_tune_malloc_leaves_a_users_setting_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert runtime.tune_malloc() is False
