"""Start-up hook for the emulated aarch64 python of scripts/ci_arm64.sh.

Without binfmt_misc the host kernel cannot exec an aarch64 binary, so children started through
sys.executable (subprocess, multiprocessing "spawn") have to go through the qemu wrapper script
that ci_arm64.sh writes and names in VIM_ARM64_PYTHON.
"""
import os
import sys

_wrapper = os.environ.get("VIM_ARM64_PYTHON")
if _wrapper:
    sys.executable = _wrapper
    sys._base_executable = _wrapper
