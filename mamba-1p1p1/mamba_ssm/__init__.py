"""Mamba (with Vim's bidirectional mixers) on pure PyTorch; upstream's import paths and API."""

__version__ = "1.1.1+cpu"

from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.ops.backends import backend_report, use_backend, which_backend

__all__ = ["Mamba", "which_backend", "use_backend", "backend_report"]
