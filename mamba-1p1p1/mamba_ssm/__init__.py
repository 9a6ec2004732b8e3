"""Mamba (with Vim's bidirectional mixers) on pure PyTorch; upstream's import paths and API."""

__version__ = "1.1.1+cpu"

from mamba_ssm.modules.backend_choice import kernel_report, set_backend
from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.ops.backends import backend_report, which_backend
from causal_conv1d.backends import use_backend

__all__ = ["Mamba", "which_backend", "use_backend", "backend_report", "set_backend", "kernel_report"]
