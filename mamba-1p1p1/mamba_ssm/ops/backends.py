"""The selective-scan family's view of `causal_conv1d.backends` (one module decides for both
packages): `which_backend`, and the loader that tells it whether the numba kernels run here.

The choice governs whole Mamba paths: under "ref" their convs use `causal_conv1d_ref`; the
stacked v2 paths ("torch", "numba") run their conv taps themselves; the upstream compositions
("cuda", and the v1/none mixers) call `causal_conv1d_fn`, which resolves its own family.
"""

from causal_conv1d import backends
from causal_conv1d.backends import backend_report, use_backend

__all__ = ["which_backend", "use_backend", "backend_report", "resolve_scan"]


def resolve_scan(x, *, needs_grad=False, numba_unsupported=None, numba_kernels="mixer"):
    """`backends.resolve` for the selective-scan family (see there)."""
    return backends.resolve("selective_scan", x, needs_grad=needs_grad, numba_unsupported=numba_unsupported,
                            numba_kernels=numba_kernels)


def which_backend(x):
    """Name of the backend ("ref", "torch", "numba" or "cuda") a Vim mixer's inference call on
    `x` would use now."""
    return resolve_scan(x)


def _load_numba_kernels(kernels):
    """None when the numba kernel set `kernels` ("mixer" or "scan") loads here, else a one-line
    reason. The mixer's kernels load as machine code without importing numba (fast start-up)."""
    try:
        if kernels == "mixer":
            from mamba_ssm.ops import bimamba_v2_numba as module
        else:
            from mamba_ssm.ops import selective_scan_numba as module
    except Exception as error:  # a broken numba or llvmlite fails in many ways
        return f"numba failed to import: {type(error).__name__}: {error}".splitlines()[0]
    return module.load_error()


backends.set_numba_loader(_load_numba_kernels)
