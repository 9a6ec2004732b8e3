"""scripts/setup_rpi.sh refuses machines it cannot set up, with one clear message."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "setup_rpi.sh"


def _run(tmp_path, machine, *args, python="python3"):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    uname = fake / "uname"
    uname.write_text(f"#!/bin/sh\necho {machine}\n")
    uname.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "VENV": str(tmp_path / "venv"), "PYTHON": python}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("machine", ["armv7l", "armv6l"])
def test_32_bit_os_is_refused_with_advice(tmp_path, machine):
    result = _run(tmp_path, machine)
    assert result.returncode == 1
    assert "32-bit" in result.stderr and "64-bit" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_unknown_machine_and_option(tmp_path):
    result = _run(tmp_path, "riscv64")
    assert result.returncode == 1 and "riscv64" in result.stderr
    result = _run(tmp_path, "aarch64", "--fast")
    assert result.returncode == 2 and "--fast" in result.stderr


def test_missing_python_is_reported(tmp_path):
    result = _run(tmp_path, "aarch64", python="python3-that-does-not-exist")
    assert result.returncode == 1 and "not found" in result.stderr


def test_system_site_packages_is_an_option(tmp_path):
    result = _run(tmp_path, "riscv64", "--system-site-packages", "--minimal")
    assert result.returncode == 1 and "riscv64" in result.stderr  # parsed, then the machine is refused
