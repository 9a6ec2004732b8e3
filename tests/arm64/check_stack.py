"""Emulated Raspberry Pi checks: the software stack itself (run by scripts/ci_arm64.sh).

Files here are named check_*.py so the normal x86 pytest run over tests/ never collects them;
they need the aarch64 wheels and the qemu profile set up by ci_arm64.sh.
"""
import ctypes
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROFILE = os.environ.get("VIM_ARM64_PROFILE", "")
PIN_FILE = Path(__file__).resolve().parents[2] / "scripts" / "arm64" / "requirements-aarch64.txt"

AT_HWCAP = 16
HWCAP_ASIMDDP = 1 << 20  # dot product: Cortex-A76 (Pi 5) has it, Cortex-A72 (Pi 4) does not
HWCAP_SVE = 1 << 22  # no Pi has SVE; qemu's default "max" CPU does


def _wheel_dists():
    """Distributions installed from wheels (our own source packages have no WHEEL file)."""
    return [d for d in importlib.metadata.distributions() if d.read_text("WHEEL") is not None]


def _pins():
    pins = {}
    for line in PIN_FILE.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def test_interpreter_is_aarch64_python311():
    assert platform.machine() == "aarch64"
    assert sys.version_info[:2] == (3, 11)


def test_installed_wheels_are_the_pinned_aarch64_ones():
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in _wheel_dists()}
    assert installed == _pins()
    for dist in _wheel_dists():
        tags = [line.split(":", 1)[1].strip() for line in dist.read_text("WHEEL").splitlines()
                if line.startswith("Tag:")]
        assert tags and all(t.endswith("-any") or t.endswith("aarch64") for t in tags), (
            dist.metadata["Name"], tags)


def test_wheel_requirements_are_met_on_aarch64():
    """What pip would install on the Pi (markers evaluated here, natively) is all pinned."""
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in _wheel_dists()}
    unmet = []
    for dist in _wheel_dists():
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = installed.get(canonicalize_name(req.name))
            if have is None or not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{dist.metadata['Name']} needs {req}, have {have}")
    assert not unmet


def test_torch_is_a_cpu_only_build():
    assert torch.version.cuda is None
    assert not torch.cuda.is_available()


def test_cpu_features_match_the_profile():
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.argtypes, getauxval.restype = (ctypes.c_ulong,), ctypes.c_ulong
    hwcap = getauxval(AT_HWCAP)
    assert not hwcap & HWCAP_SVE
    assert bool(hwcap & HWCAP_ASIMDDP) == (PROFILE == "pi5")
    assert "SVE" not in torch.backends.cpu.get_cpu_capability()


def test_guest_sees_the_pi_cpu_description():
    """qemu finds /proc and /sys files under its prefix first: the Pi's, not the host's."""
    part = {"pi4": 0xD08, "pi5": 0xD0B}[PROFILE]  # Cortex-A72, Cortex-A76
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert "Raspberry Pi" in cpuinfo and f"CPU part\t: {part:#05x}" in cpuinfo
    midr = Path("/sys/devices/system/cpu/cpu0/regs/identification/midr_el1").read_text()
    assert (int(midr, 16) >> 4) & 0xFFF == part


def test_torch_math_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(17, 33, generator=gen)
    b = torch.randn(33, 9, generator=gen)
    expected = a.double().numpy() @ b.double().numpy()
    np.testing.assert_allclose((a @ b).numpy(), expected, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 11, 13, generator=gen)
    w = torch.randn(4, 3, 3, 3, generator=gen)
    out = torch.nn.functional.conv2d(x, w)
    patches = x.unfold(2, 3, 1).unfold(3, 3, 1)  # (2, 3, 9, 11, 3, 3)
    manual = torch.einsum("bchwij,ocij->bohw", patches.double(), w.double())
    torch.testing.assert_close(out.double(), manual, rtol=1e-5, atol=1e-5)


def test_child_processes_run_the_emulated_python():
    # Without torch: a second torch import costs ~15 s emulated, and check_infer.py pays it.
    code = "import platform, sys; print(platform.machine(), sys.executable)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["aarch64", sys.executable]
