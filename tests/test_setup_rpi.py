"""scripts/setup_rpi.sh: machines it cannot set up are refused with one clear message; what it
asks pip for (torchvision matching torch, no CUDA build, the system's numpy kept).

The install tests run the script with a stand-in interpreter (fake_python below) as both the
system python and the venv's: it answers the script's questions from FAKE_* variables, runs its
other checks on the real interpreter, and records every pip command (arguments and
PIP_CONSTRAINT) in a JSON-lines file instead of installing anything. The real installs are
proven on emulated Pis by scripts/ci_fresh_pi.sh.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "setup_rpi.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

FAKE_PYTHON = r'''
import json, os, subprocess, sys

args = sys.argv[1:]
role = os.environ["FAKE_ROLE"]  # "system", or "venv" for the venv's interpreter

if args[:2] == ["-m", "venv"]:
    bin_dir = os.path.join(args[-1], "bin")
    os.makedirs(bin_dir, exist_ok=True)
    with open(os.path.join(bin_dir, "python"), "w") as f:
        f.write(f"#!/bin/sh\nFAKE_ROLE=venv exec {sys.executable} {__file__} \"$@\"\n")
    os.chmod(os.path.join(bin_dir, "python"), 0o755)
    with open(os.path.join(args[-1], "venv-args.json"), "w") as f:
        json.dump(args[2:-1], f)
    sys.exit(0)
if args[:2] == ["-m", "pip"]:
    with open(os.environ["FAKE_PIP_LOG"], "a") as f:
        f.write(json.dumps({"argv": args[2:], "constraint": os.environ.get("PIP_CONSTRAINT")}) + "\n")
    sys.exit(0)
if args == ["-"]:  # the smoke test
    sys.stdin.read()
    print("ok: smoke test (stand-in)")
    sys.exit(0)
if args == ["-m", "mamba_ssm.kernel_check"]:
    print("ok: the fused numba kernels match the pure-PyTorch path (stand-in)")
    sys.exit(0)
code = args[args.index("-c") + 1]
# Anything else runs on the real interpreter, with numpy and torch's metadata as FAKE_* say.
prelude = """
import importlib.metadata, json, os, sys, types
numpy_env = "FAKE_SYSTEM_NUMPY" if os.environ["FAKE_ROLE"] == "system" else "FAKE_VENV_NUMPY"
if os.environ.get(numpy_env):
    version, _, where = os.environ[numpy_env].partition("@")
    sys.modules["numpy"] = types.SimpleNamespace(__version__=version, __file__=where.replace("PREFIX", sys.prefix))
else:
    sys.modules["numpy"] = None
importlib.metadata.requires = lambda name: json.loads(os.environ.get("FAKE_TORCH_REQUIRES", "[]"))
"""
sys.exit(subprocess.run([sys.executable, *args[:args.index("-c")], "-c", prelude + code, *args[args.index("-c") + 2:]]).returncode)
'''


def _run(tmp_path, machine, *args, python="python3", env=None):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    uname = fake / "uname"
    uname.write_text(f"#!/bin/sh\necho {machine}\n")
    uname.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "VENV": str(tmp_path / "venv"), "PYTHON": python,
           **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def _install(tmp_path, *args, machine="aarch64", **env):
    """Run the set-up with the stand-in python; (result, [pip commands as {"argv", "constraint"}])."""
    fake = tmp_path / "fake_python.py"
    fake.write_text(FAKE_PYTHON)
    python = tmp_path / "python3-fake"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {fake} \"$@\"\n")
    python.chmod(0o755)
    log = tmp_path / "pip.jsonl"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH", "PIP_CONSTRAINT"))} | {
        "FAKE_ROLE": "system", "FAKE_PIP_LOG": str(log), **env}
    result = _run(tmp_path, machine, *args, python=str(python), env=env)
    return result, [json.loads(line) for line in log.read_text().splitlines()]


def _installs(calls):
    return [c for c in calls if c["argv"][0] == "install"]


def _requirements(call):
    return [a for a in call["argv"][1:] if not a.startswith("-") and "://" not in a]


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


@pytest.mark.parametrize("torch_version, torchvision", [(None, "0.24.*"), ("2.9.0", "0.24.*"), ("2.13.0", "0.28.*"),
                                                        ("2.1.2", "0.16.*")])
def test_torchvision_follows_the_torch_version(tmp_path, torch_version, torchvision):
    env = {"TORCH_VERSION": torch_version} if torch_version else {}
    result, calls = _install(tmp_path, machine="x86_64", **env)
    assert result.returncode == 0, result.stderr
    torch_call = _installs(calls)[0]
    assert _requirements(torch_call) == [f"torch=={torch_version or '2.9.1'}", f"torchvision=={torchvision}"]
    assert torch_call["argv"][-4:-2] == ["--index-url", CPU_INDEX]
    assert "ok: smoke test (stand-in)" in result.stdout


def test_torchvision_version_can_be_given_and_minimal_needs_none(tmp_path):
    result, calls = _install(tmp_path, TORCH_VERSION="2.9.1", TORCHVISION_VERSION="0.24.0")
    assert result.returncode == 0, result.stderr
    assert _requirements(_installs(calls)[0]) == ["torch==2.9.1", "torchvision==0.24.0"]

    result, calls = _install(tmp_path, TORCH_VERSION="2.10.0.dev20250101")
    assert result.returncode == 1 and calls == []
    assert "TORCHVISION_VERSION" in result.stderr and "Traceback" not in result.stderr

    result, calls = _install(tmp_path, "--minimal", TORCH_VERSION="2.10.0.dev20250101")
    assert result.returncode == 0, result.stderr
    assert _requirements(_installs(calls)[0]) == ["torch==2.10.0.dev20250101"]


CUDA_TORCH = ['nvidia-cublas-cu12==12.8.4.1; platform_system == "Linux"', "filelock", 'triton==3.5.1; platform_system == "Linux"',
              'sympy>=1.13.3']


def test_a_cuda_build_from_another_index_is_refused_before_its_packages(tmp_path):
    result, calls = _install(tmp_path, machine="x86_64", TORCH_INDEX_URL="", FAKE_TORCH_REQUIRES=json.dumps(CUDA_TORCH))
    assert result.returncode == 1
    assert "CUDA build of torch 2.9.1" in result.stderr and "nvidia-cublas-cu12 triton" in result.stderr
    assert CPU_INDEX in result.stderr and "Traceback" not in result.stderr
    # torch alone (no dependencies) was fetched, then removed; nothing else was installed
    assert [c["argv"] for c in calls] == [["install", "--disable-pip-version-check", "--no-deps", "torch==2.9.1"],
                                          ["uninstall", "--disable-pip-version-check", "-q", "-y", "torch"]]


def test_a_cpu_build_from_another_index_is_installed(tmp_path):
    # CUDA packages required only on another platform do not count
    requires = ['nvidia-cublas-cu12==12.8.4.1; platform_machine == "s390x"', "filelock"]
    result, calls = _install(tmp_path, TORCH_INDEX_URL="https://mirror.example/simple",
                             FAKE_TORCH_REQUIRES=json.dumps(requires))
    assert result.returncode == 0, result.stderr
    first, second = _installs(calls)[:2]
    assert first["argv"][-2:] == ["--no-deps", "torch==2.9.1"] and "https://mirror.example/simple" in first["argv"]
    assert _requirements(second) == ["torch==2.9.1", "torchvision==0.24.*"]
    # PyTorch's CPU index needs no such look-ahead
    result, calls = _install(tmp_path, FAKE_TORCH_REQUIRES=json.dumps(CUDA_TORCH))
    assert result.returncode == 0, result.stderr
    assert not [c for c in calls if "--no-deps" in c["argv"]]


def _constraints(call):
    return [Path(p).read_text().split() for p in (call["constraint"] or "").split()]


def test_system_site_packages_keeps_the_system_numpy(tmp_path):
    # The venv holds numpy 2 from an earlier plain set-up; apt's numpy is 1.24.2.
    result, calls = _install(tmp_path, "--system-site-packages",
                             FAKE_SYSTEM_NUMPY="1.24.2@/usr/lib/python3/dist-packages/numpy/__init__.py",
                             FAKE_VENV_NUMPY="2.4.6@PREFIX/lib/python3.11/site-packages/numpy/__init__.py")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "venv" / "venv-args.json").read_text()) == ["--system-site-packages"]
    assert calls[0]["argv"] == ["uninstall", "--disable-pip-version-check", "-y", "numpy"]
    installs = _installs(calls)
    assert len(installs) == 2
    assert "scripts/requirements-camera.txt" in installs[1]["argv"] and "scripts/requirements-numba.txt" in installs[1]["argv"]
    for call in installs:  # torch/torchvision, then numpy, OpenCV, numba...: all held to apt's numpy
        assert _constraints(call) == [["numpy==1.24.2"]], call
    assert "keeping the system's numpy 1.24.2" in result.stdout


def test_system_site_packages_with_the_system_numpy_in_front(tmp_path):
    # The venv's python already finds the system's numpy: nothing to remove, the pin still holds.
    result, calls = _install(tmp_path, "--system-site-packages", PIP_CONSTRAINT="/etc/my-constraints.txt",
                             FAKE_SYSTEM_NUMPY="2.2.4@/usr/lib/python3/dist-packages/numpy/__init__.py",
                             FAKE_VENV_NUMPY="2.2.4@/usr/lib/python3/dist-packages/numpy/__init__.py")
    assert result.returncode == 0, result.stderr
    assert not [c for c in calls if c["argv"][0] == "uninstall"]
    first = _installs(calls)[0]
    assert first["constraint"].split()[0] == "/etc/my-constraints.txt"  # the user's constraints are kept
    assert Path(first["constraint"].split()[1]).read_text().split() == ["numpy==2.2.4"]


def test_without_system_numpy_or_without_the_option_nothing_is_pinned(tmp_path):
    result, calls = _install(tmp_path, "--system-site-packages")
    assert result.returncode == 0, result.stderr
    assert "has no numpy" in result.stdout
    assert all(c["constraint"] is None for c in calls)
    # a plain run after a --system-site-packages one drops the pin
    (tmp_path / "venv" / "system-numpy.txt").write_text("numpy==1.24.2\n")
    result, calls = _install(tmp_path, FAKE_SYSTEM_NUMPY="1.24.2@/usr/lib/python3/dist-packages/numpy/__init__.py")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "venv" / "venv-args.json").read_text()) == []
    assert all(c["constraint"] is None for c in calls)
    assert not (tmp_path / "venv" / "system-numpy.txt").exists()
