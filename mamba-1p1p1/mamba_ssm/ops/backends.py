"""Backend selection for the selective scan and the fused Mamba paths built on it.

Same rules and names as `causal_conv1d.backends` ("cuda", "fast", "ref"), with the variable
SELECTIVE_SCAN_FORCE_FALLBACK and upstream's compiled module `selective_scan_cuda`. This choice
governs whole Mamba paths: under "ref" their convs use `causal_conv1d_ref`; the stacked v2 path
("fast") runs its conv taps itself; the upstream compositions ("cuda", and v1/none on "fast")
call `causal_conv1d_fn`, which follows causal_conv1d's own switch.
"""

import causal_conv1d
from causal_conv1d.backends import BackendSwitch
from mamba_ssm.ops.selective_scan_fast import cpu_backend

switch = BackendSwitch(force_env="SELECTIVE_SCAN_FORCE_FALLBACK", extension="selective_scan_cuda")


def which_backend(x):
    """Name of the backend ("cuda", "fast" or "ref") a selective-scan call on `x` would use now."""
    return switch.which(x)


def use_backend(name):
    """Context manager forcing backend `name` for selective-scan and Mamba calls in this thread."""
    return switch.use(name)


def backend_report(x):
    """What a call on tensor `x` would use, for logs and CLI reports."""
    return {
        "selective_scan": switch.which(x),
        "causal_conv1d": causal_conv1d.which_backend(x),
        "cpu_scan_kernel": cpu_backend(),  # SELECTIVE_SCAN_CPU_BACKEND: "torch" or "numba"
        "selective_scan_cuda_importable": switch.extension() is not None,
        "causal_conv1d_cuda_importable": causal_conv1d.causal_conv1d_interface.switch.extension() is not None,
    }
