"""Causal depthwise conv1d with upstream's API; pure-PyTorch kernels, CUDA extension optional."""

__version__ = "1.4.0+cpu"

from causal_conv1d.causal_conv1d_interface import (
    ConvKernels,
    causal_conv1d_fast,
    causal_conv1d_fn,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_fast,
    causal_conv1d_update_ref,
    conv_kernels,
    which_backend,
)
from causal_conv1d.backends import backend_report, use_backend

__all__ = [
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "causal_conv1d_ref",
    "causal_conv1d_fast",
    "causal_conv1d_update_ref",
    "causal_conv1d_update_fast",
    "which_backend",
    "use_backend",
    "backend_report",
    "conv_kernels",
    "ConvKernels",
]
